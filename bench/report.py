"""Merge a run's raw files into ID.json, and write ID.md (tables, goals) and ID.png (plot).

Ratios between datapath configurations are paired: the ratio is taken within each round
(the same minute of the same machine) and the median of those ratios is reported with its
IQR, which cancels most of the slow drift of a shared VM.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import log, quantile, summary

BASE, CEILING, AGAIN, BRIDGE = "routed", "vethpair", "vethpair_again", "docker_bridge"
ORDER = ("lo", "vethpair", "vethpair_again", "routed", "docker_bridge", "ipt_1k", "ipt_10k", "ipt_10k_est",
         "cg_open", "cg_policy", "cg_policy_100k", "docker_bridge_ns", "cg_policy_ns")


def load(run_dir: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {"run": run_dir.name, "files": {}}
    for path in sorted(run_dir.glob("*.json")):
        merged["files"][path.stem] = json.loads(path.read_text())
    return merged


def datapath_samples(merged: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, data in merged["files"].items():
        if name.startswith("datapath"):
            out.extend(data["samples"])
    return out


def metric(sample: dict[str, Any]) -> float | None:
    return sample.get("gbit_s") if sample["mode"] == "stream" else sample.get("tps")


def values(samples: Sequence[dict[str, Any]], config: str, mode: str, key: str = "") -> list[float]:
    out = []
    for s in samples:
        if s["config"] == config and s["mode"] == mode:
            v = s.get("lat_us", {}).get(key) if key else metric(s)
            if v is not None:
                out.append(float(v))
    return out


def paired(samples: Sequence[dict[str, Any]], config: str, base: str, mode: str) -> list[float]:
    """Per-round ratios config / base for one mode."""
    by_round: dict[tuple[int, int], dict[str, float]] = {}
    for s in samples:
        if s["mode"] == mode and s["config"] in (config, base) and metric(s):
            by_round.setdefault((s["chunk"], s["round"]), {})[s["config"]] = float(metric(s) or 0)
    return [r[config] / r[base] for r in by_round.values() if config in r and base in r and r[base]]


def fmt_ratio(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    if len(ratios) < 3:
        return f"{statistics.median(ratios):.2f}"
    return f"{statistics.median(ratios):.2f} ({quantile(ratios, 0.25):.2f}-{quantile(ratios, 0.75):.2f})"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def share_table(samples: list[dict[str, Any]], configs: list[str]) -> list[str]:
    """Each configuration's share of the veth ceiling and of Docker's bridge, paired per round,
    against the noise band: the ceiling measured twice in each round (vethpair_again / vethpair)."""
    lines = ["#### Shares of the veth ceiling and of Docker's bridge (paired per round: median (IQR))", "",
             "| config | RR xveth | RR xbridge | CRR xveth | CRR xbridge |", "|---|---|---|---|---|"]
    for c in configs:
        cells = [c]
        for mode in ("rr", "crr"):
            cells += [fmt_ratio(paired(samples, c, CEILING, mode)), fmt_ratio(paired(samples, c, BRIDGE, mode))]
        lines.append("| " + " | ".join(cells) + " |")
    bands = []
    for mode in ("rr", "crr"):
        xs = paired(samples, AGAIN, CEILING, mode)
        if xs:
            bands.append(f"{mode.upper()} {min(xs):.2f}-{max(xs):.2f} (IQR {quantile(xs, .25):.2f}-"
                         f"{quantile(xs, .75):.2f}, {len(xs)} rounds)")
    if bands:
        lines += ["", "Noise band, the ceiling against itself in the same rounds: " + "; ".join(bands)
                  + ". A share inside that band of 1.0 is no difference."]
    return lines


def datapath_tables(samples: list[dict[str, Any]]) -> list[str]:
    configs = [c for c in ORDER if any(s["config"] == c for s in samples)]
    rounds = len({(s["chunk"], s["round"]) for s in samples})
    lines = [f"### Datapath ({rounds} rounds, medians; ratios are paired per round, median (IQR))", "",
             "| config | n | RR tps [IQR] | RR xrouted | RR xveth | RR p50/p99 µs | CRR tps [IQR] | CRR xrouted "
             "| CRR xveth | CRR p50/p99 µs | stream Gbit/s [min-max] |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        rr, crr, st = values(samples, c, "rr"), values(samples, c, "crr"), values(samples, c, "stream")
        cells = [c, str(len(rr))]
        for mode, xs in (("rr", rr), ("crr", crr)):
            if xs:
                cells.append(f"{med(xs):.0f} [{quantile(xs, .25):.0f}-{quantile(xs, .75):.0f}]")
            else:
                cells.append("-")
            cells.append(fmt_ratio(paired(samples, c, BASE, mode)))
            cells.append(fmt_ratio(paired(samples, c, CEILING, mode)))
            cells.append(f"{med(values(samples, c, mode, 'p50')):.1f}/{med(values(samples, c, mode, 'p99')):.0f}")
        cells.append(f"{med(st):.1f} [{min(st):.1f}-{max(st):.1f}]" if st else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *share_table(samples, configs)]
    cpu = [s for s in samples if "agent_cpu_s" in s and s["mode"] == "crr"]
    if cpu:
        share = [s["agent_cpu_s"] / s["seconds"] for s in cpu if s.get("seconds")]
        lines += ["", f"Agent CPU while cellgate CRR ran: median {med(share) * 100:.0f}% of one CPU "
                  f"(max {max(share) * 100:.0f}%)."]
    return lines


CONTROL_ROWS = (
    ("agent_restart_s", "agent restart: spawn → API answers (pinned programs reused, 10 endpoints)", 1000, "ms"),
    ("agent_start_s", "agent first start: spawn → API answers (compile + restore, 10 endpoints)", 1000, "ms"),
    ("endpoint_create_ms", "endpoint create in the agent (Server-Timing of /v1/cni/add)", 1, "ms"),
    ("endpoint_delete_ms", "endpoint delete in the agent (Server-Timing of /v1/cni/del)", 1, "ms"),
    ("endpoint_create_at_scale_ms", "endpoint create, 0 → 1,000 endpoints (Server-Timing)", 1, "ms"),
    ("endpoint_delete_at_scale_ms", "endpoint delete, 1,000 → 0 endpoints (Server-Timing)", 1, "ms"),
    ("cni_add_ms", "CNI ADD: the cellgate-cni binary, wall", 1, "ms"),
    ("cni_del_ms", "CNI DEL: the cellgate-cni binary, wall", 1, "ms"),
    ("docker_run_cellgate_s", "`docker run --rm … true` on a cellgate network", 1000, "ms"),
    ("docker_run_bridge_s", "`docker run --rm … true` on Docker's default bridge", 1000, "ms"),
    ("policy_import_enforced_ms", "policy import → in the map: 1k rules, 100 endpoints (API)", 1, "ms"),
    ("policy_import_cli_s", "`cellgate policy import` of 1k rules (CLI process, wall)", 1000, "ms"),
    ("policy_load_100k_s", "100k policy entries written (agent executor, batch)", 1000, "ms"),
    ("policy_unload_100k_s", "100k policy entries removed (agent executor)", 1000, "ms"),
    ("policy_load_100k_per_element_s", "100k policy entries, one syscall each (reference)", 1000, "ms"),
)


def control_tables(data: dict[str, Any]) -> list[str]:
    samples = data["samples"]
    lines = ["### Control plane (p50 / p95 over n runs)", "", "| operation | n | p50 | p95 | min | max |",
             "|---|---|---|---|---|---|"]
    for key, label, scale, unit in CONTROL_ROWS:
        xs = [s["value"] * scale for s in samples if s["metric"] == key]
        if xs:
            st = summary(xs)
            lines.append(f"| {label} | {st['n']} | {st['median']:.1f} {unit} | {st['p95']:.1f} {unit} | "
                         f"{st['min']:.1f} | {st['max']:.1f} |")
    rss = [s for s in samples if s["metric"] == "rss_kib"]
    if rss:
        lines += ["", "| agent RSS at endpoints | VmRSS MiB | anonymous MiB | file-backed MiB |", "|---|---|---|---|"]
        for s in rss:
            lines.append(f"| {s['endpoints']} | {s['VmRSS'] / 1024:.0f} | {s['RssAnon'] / 1024:.0f} | "
                         f"{s['RssFile'] / 1024:.0f} |")
    return lines


MICRO_CASES = ("established", "reply", "new", "new-monitored", "denied", "non-ip", "many-flows")


def micro_tables(data: dict[str, Any]) -> list[str]:
    rows = data["summary"]
    sizes = sorted({r["size"] for r in rows})
    cases = [c for c in MICRO_CASES if any(
        r["case"] == c for r in rows)]
    head = " | ".join(f"{s:,} entries: ns [IQR], xempty" for s in sizes)
    lines = [f"### Micro: BPF_PROG_TEST_RUN of cg_from_container ({data['settings']['samples']} samples; "
             "empty program measured alongside)", "", f"| packet | {head} |", "|---|" + "---|" * len(sizes)]
    for case in cases:
        cells = [case]
        for size in sizes:
            r = next((x for x in rows if x["case"] == case and x["size"] == size), None)
            if r is None:
                cells.append("-")
                continue
            extra = f", {r['vs_single_flow']['median']:.2f}x one flow" if "vs_single_flow" in r else ""
            cells.append(f"{r['ns']['median']:.0f} [{r['ns']['q1']:.0f}-{r['ns']['q3']:.0f}], "
                         f"{r['ratio']['median']:.1f}x{extra}")
        lines.append("| " + " | ".join(cells) + " |")
    empty = [r["empty_ns"]["median"] for r in rows if r["case"] != "many-flows"]
    lines += ["", f"Empty program: {med(empty):.0f} ns per run ({data['settings']['repeat']} repetitions per call); "
              "many-flows runs one packet per call (10k flows), so its baseline is the empty program called "
              "the same way."]
    return lines


def goals(merged: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of the issue with its measured value and met/missed (only what this run measured)."""
    out: list[dict[str, Any]] = []
    dp = datapath_samples(merged)

    def ratio_goal(name: str, a: str, b: str, mode: str, want: float, above: bool = True) -> None:
        xs = paired(dp, a, b, mode)
        if xs:
            v = statistics.median(xs)
            out.append({"goal": name, "value": round(v, 3), "target": want,
                        "met": v >= want if above else v <= want})

    ratio_goal("cg_policy RR ≥ 0.95x veth ceiling", "cg_policy", CEILING, "rr", 0.95)
    ratio_goal("cg_policy RR ≥ 1.35x routed baseline", "cg_policy", BASE, "rr", 1.35)
    ratio_goal("cg_policy CRR ≥ 0.9x veth ceiling", "cg_policy", CEILING, "crr", 0.9)
    ratio_goal("cg_policy CRR ≥ 1.2x Docker's bridge", "cg_policy", BRIDGE, "crr", 1.2)
    ratio_goal("cg_policy CRR ≥ 20x bridge + 10k iptables rules", "cg_policy", "ipt_10k", "crr", 20)
    for mode in ("rr", "crr"):
        xs = paired(dp, "cg_policy_100k", "cg_policy", mode)
        if xs:
            v = statistics.median(xs)
            out.append({"goal": f"1 → 100k policy entries moves {mode.upper()} ≤ 5%", "value": round(v, 3),
                        "target": "0.95-1.05", "met": abs(v - 1) <= 0.05})
    ctl = merged["files"].get("control")
    if ctl:
        s = ctl["samples"]

        def p50(key: str) -> float | None:
            xs = [x["value"] for x in s if x["metric"] == key]
            return statistics.median(xs) if xs else None

        checks = (("endpoint create ≤ 8 ms p50 (in the agent)", p50("endpoint_create_ms"), 8.0),
                  ("endpoint create ≤ 8 ms p50 while 0 → 1,000 endpoints", p50("endpoint_create_at_scale_ms"), 8.0),
                  ("policy import → enforced ≤ 30 ms p50", p50("policy_import_enforced_ms"), 30.0),
                  ("agent restart → API ready ≤ 300 ms p50", p50("agent_restart_s"), 0.3),
                  ("agent first start ≤ 2 s p50", p50("agent_start_s"), 2.0))
        for name, v, want in checks:
            if v is not None:
                out.append({"goal": name, "value": round(v, 3), "target": want, "met": v <= want})
        cg, br = p50("docker_run_cellgate_s"), p50("docker_run_bridge_s")
        if cg and br:
            out.append({"goal": "docker run on cellgate ≤ 1.0x Docker's bridge", "value": round(cg / br, 3),
                        "target": 1.0, "met": cg / br <= 1.0})
        rss = [x for x in s if x["metric"] == "rss_kib" and x["endpoints"] >= 1000]
        if rss:
            mb = rss[-1]["VmRSS"] * 1024 / 1e6
            out.append({"goal": "agent RSS ≤ 100 MB (10^6 bytes) at 1,000 endpoints", "value": round(mb, 1),
                        "target": 100, "met": mb <= 100})
    micro = merged["files"].get("micro")
    for case, want in (("new", 450.0), ("established", 250.0)) if micro else ():
        worst = max((r["ns"]["median"] for r in micro["summary"] if r["case"] == case), default=None)
        if worst is not None:
            out.append({"goal": f"micro {case} ≤ {want:.0f} ns (at every filler size)", "value": round(worst, 1),
                        "target": want, "met": worst <= want})
    return out


def soak_goals(merged: dict[str, Any]) -> list[dict[str, Any]]:
    """The soak tier's goals: no failed allowed probe, no denied probe that connected, flat resources."""
    soak = merged["files"].get("soak")
    if not soak:
        return []
    t, a = soak["probes"]["totals"], soak["analysis"]
    minutes = f"{soak['settings']['minutes']:g} min"
    return [
        {"goal": f"soak ({minutes}): 0 failed allowed probes", "value": t["allowed_failed"], "target": 0,
         "met": t["allowed_failed"] == 0},
        {"goal": f"soak ({minutes}): 0 denied probes connected", "value": t["denied_connected"], "target": 0,
         "met": t["denied_connected"] == 0},
        {"goal": f"soak ({minutes}): RSS, fds and map entries flat", "value": ", ".join(a["growing"]) or "flat",
         "target": "flat", "met": a["verdict"] == "flat"},
    ]


def plot(merged: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is missing (pip install '.[bench]'): no plot")
        return False
    dp = datapath_samples(merged)
    micro = merged["files"].get("micro")
    panels = (1 if dp else 0) * 2 + (1 if micro else 0)
    if not panels:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
    axes = axes[0]
    i = 0
    if dp:
        configs = [c for c in ORDER if any(s["config"] == c for s in dp)]
        for mode_i, mode in enumerate(("rr", "crr")):
            ax = axes[i]
            i += 1
            ratios = [paired(dp, c, BASE, mode) for c in configs]
            meds = [med(r) for r in ratios]
            lo = [m - quantile(r, .25) if r else 0 for m, r in zip(meds, ratios, strict=True)]
            hi = [quantile(r, .75) - m if r else 0 for m, r in zip(meds, ratios, strict=True)]
            colors = ["#4c72b0" if c.startswith("cg_") else "#999999" if c in ("lo", "vethpair", "routed")
                      else "#dd8452" for c in configs]
            ax.bar(configs, meds, yerr=[lo, hi], color=colors, capsize=3)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_title(f"TCP_{mode.upper()} rate / routed baseline (paired, median, IQR)")
            ax.tick_params(axis="x", rotation=60)
            for x, m in enumerate(meds):
                ax.annotate(f"{m:.2f}", (x, m), ha="center", va="bottom", fontsize=7)
            _ = mode_i
    if micro:
        ax = axes[i]
        rows = micro["summary"]
        sizes = sorted({r["size"] for r in rows})
        cases = [c for c in MICRO_CASES
                 if any(r["case"] == c for r in rows)]
        width = 0.8 / len(sizes)
        for j, size in enumerate(sizes):
            ys = [next((r["ratio"]["median"] for r in rows if r["case"] == c and r["size"] == size), 0)
                  for c in cases]
            ax.bar([x + j * width for x in range(len(cases))], ys, width, label=f"{size:,} entries")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, rotation=30)
        ax.set_title("cg_from_container per call / empty program")
        ax.legend()
    fig.suptitle(f"cellgate benchmark {merged['run']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine_line(merged: dict[str, Any]) -> str:
    for data in merged["files"].values():
        m = data.get("machine")
        if m:
            return (f"{m.get('cpu', '?')}, {m.get('vcpus')} vCPU, Linux {m.get('kernel')}, "
                    f"{m.get('iptables', '')}, {m.get('dockerd', '')}, BCC {m.get('bcc', '?')}")
    return "?"


def report(run_dir: Path, latest: bool = False) -> str:
    if not run_dir.is_dir():
        raise SystemExit(f"no such run: {run_dir}")
    merged = load(run_dir)
    merged["goals"] = goals(merged) + soak_goals(merged)
    (run_dir.parent / f"{run_dir.name}.json").write_text(json.dumps(merged, indent=1))
    lines = [f"# cellgate benchmark {run_dir.name}", "", f"Machine: {machine_line(merged)}.", ""]
    if merged["goals"]:
        lines += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
        for g in merged["goals"]:
            lines.append(f"| {g['goal']} | {g['value']} | {'met' if g['met'] else '**missed**'} |")
        lines.append("")
    dp = datapath_samples(merged)
    if dp:
        lines += [*datapath_tables(dp), ""]
    if "control" in merged["files"]:
        lines += [*control_tables(merged["files"]["control"]), ""]
    if "micro" in merged["files"]:
        lines += [*micro_tables(merged["files"]["micro"]), ""]
    if "soak" in merged["files"]:
        from bench.soak import markdown as soak_markdown

        lines += [soak_markdown(merged["files"]["soak"])]
    png = run_dir.parent / f"{run_dir.name}.png"
    if plot(merged, png):
        lines.append(f"![plot]({png.name})")
    text = "\n".join(lines) + "\n"
    (run_dir.parent / f"{run_dir.name}.md").write_text(text)
    if latest:  # the summary bench/README.md quotes, kept in git
        (run_dir.parent / "latest.md").write_text(text.replace(f"]({png.name})", "](latest.png)"))
        if png.exists():
            shutil.copy(png, run_dir.parent / "latest.png")
    return text
