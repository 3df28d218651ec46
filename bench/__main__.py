"""`python -m bench TIER`: run one tier (or chunk) and keep its raw samples; `report` merges a run.

    python -m bench micro    [--run ID] [--quick]
    python -m bench control  [--run ID] [--quick]
    python -m bench datapath [--run ID] [--quick] [--rounds N] [--chunk K] [--seed S]
    python -m bench cluster  [--run ID] [--quick]
    python -m bench l7       [--run ID] [--quick]
    python -m bench flows    [--run ID] [--quick]
    python -m bench soak     [--run ID] [--minutes N] [--seed S]
    python -m bench report   [--run ID] [--latest]

A run is a folder bench/results/ID/ holding one JSON file per tier or chunk; `report`
writes bench/results/ID.json (every raw sample), ID.md (the tables) and ID.png (the plot).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bench.common import RESULTS, Interrupted, new_run_id, write_raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="cellgate benchmark suite")
    parser.add_argument("tier", choices=("micro", "control", "datapath", "cluster", "l7", "flows", "soak", "report"))
    parser.add_argument("--run", default=os.environ.get("BENCH_RUN", ""), help="run ID (default: a new timestamp)")
    parser.add_argument("--quick", action="store_true", help="one short round (development)")
    parser.add_argument("--rounds", type=int, default=2, help="datapath rounds in this chunk [2]")
    parser.add_argument("--chunk", type=int, default=0, help="datapath chunk number within the run [0]")
    parser.add_argument(
        "--seed", type=int, default=0, help="shuffle seed [derived from the chunk]; soak: rule-set seed [random]"
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="soak: how long [30]")
    parser.add_argument("--latest", action="store_true", help="report: also copy to results/latest.md/.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pyroute2", "datapath", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_id = args.run or new_run_id()
    if args.tier != "report" and os.geteuid() != 0:
        print("bench: the benchmark tiers need root", file=sys.stderr)
        return 2
    try:
        if args.tier == "micro":
            from bench.micro import run_micro

            out = run_micro(samples=7 if args.quick else 15, calls=100 if args.quick else 250)
            write_raw(run_id, "micro", out)
        elif args.tier == "control":
            from bench.control import run_control

            out = run_control(quick=args.quick, seed=args.seed)
            write_raw(run_id, "control", out)
        elif args.tier == "cluster":
            from bench.cluster import markdown, run_cluster

            out = run_cluster(quick=args.quick)
            write_raw(run_id, "cluster", out)
            print(markdown(out))
        elif args.tier == "l7":
            from bench.l7 import markdown as l7_markdown
            from bench.l7 import run_l7

            out = run_l7(quick=args.quick)
            write_raw(run_id, "l7", out)
            print(l7_markdown(out))
        elif args.tier == "flows":
            from bench.flows import markdown as flows_markdown
            from bench.flows import run_flows

            out = run_flows(quick=args.quick)
            write_raw(run_id, "flows", out)
            print(flows_markdown(out))
        elif args.tier == "soak":
            from bench.soak import markdown as soak_markdown
            from bench.soak import run_soak

            out = run_soak(minutes=args.minutes, seed=args.seed)
            write_raw(run_id, "soak", out)
            print(soak_markdown(out))
            if not out["passed"]:
                return 1
        elif args.tier == "datapath":
            from bench.datapath import run_datapath

            seed = args.seed or 43 + args.chunk
            if args.quick:
                out = run_datapath(1, 1.0, 1.0, 0.3, seed, args.chunk)
            else:
                out = run_datapath(args.rounds, 3.0, 2.0, 0.5, seed, args.chunk)
            write_raw(run_id, f"datapath-{args.chunk}", out)
        else:
            from bench.report import report

            print(report(RESULTS / run_id, latest=args.latest))
    except Interrupted as exc:
        print(f"bench: interrupted ({exc}); everything this run made has been removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
