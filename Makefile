# cellgate: `make demo` shows it working, `make test` proves it. Both run `make setup` first.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

# Simulated cluster (docs/cluster.md): NODES node namespaces + the host's Docker as one more node.
NODES  ?= 5
TUNNEL ?= vxlan

.PHONY: cluster cluster-down demo-cluster
.PHONY: setup run demo test test-unit test-kernel test-e2e lint typecheck clean bench bench-quick bench-micro bench-cluster bench-l7 bench-lb bench-flows bench-soak bench-deps install-cni image plugin

setup:            ## apt packages, kernel headers link, .venv with cellgate installed (idempotent)
	@bash .ci/setup.sh

run: setup        ## run the agent in the foreground
	$(VENV)/bin/cellgate agent

demo: setup       ## real dockerd + cellgate network + two containers talking
	@bash examples/demo.sh

cluster: setup    ## N simulated nodes + etcd + the host as a node; description in /run/cellgate-cluster/cluster.json
	@docker info >/dev/null 2>&1 || { echo "starting dockerd (left running; log /var/log/cellgate-dockerd.log)"; \
	  setsid dockerd >/var/log/cellgate-dockerd.log 2>&1 & \
	  for i in $$(seq 150); do docker info >/dev/null 2>&1 && break; sleep 0.2; done; }
	$(PY) -m tests.simcluster up --nodes $(NODES) --tunnel $(TUNNEL) --docker

cluster-down: setup  ## remove what `make cluster` made
	$(PY) -m tests.simcluster down

demo-cluster: setup  ## two nodes, cross-node policy by identity, the monitor naming the remote sender
	$(PY) -m examples.demo_cluster

test: setup       ## every tier: unit, kernel (netns + BPF), e2e (real dockerd)
	$(PYTEST) tests -q

test-unit: setup
	$(PYTEST) tests/unit -q

test-kernel: setup
	$(PYTEST) tests/kernel -q

test-e2e: setup
	$(PYTEST) tests/e2e -q

install-cni: setup  ## the cellgate-cni plugin into /opt/cni/bin (CNI_BIN_DIR=... to change)
	$(VENV)/bin/cellgate install-cni --dir $(or $(CNI_BIN_DIR),/opt/cni/bin)

# Packaging (docs/packaging.md). Both talk to the dockerd of DOCKER_HOST (default socket otherwise).
# The Debian rootfs is cached in /var/cache/cellgate by a hash of its package list: minutes once,
# seconds after that. `plugin/` is a folder, hence .PHONY.
IMAGE  ?= cellgate:$(shell sed -n 's/^version *= *//p' setup.cfg)
PLUGIN ?= cellgate

image: setup      ## the agent image $(IMAGE) (Dockerfile): Debian rootfs + cellgate, no registry
	@bash plugin/managed/build.sh image $(IMAGE)

plugin: setup     ## the Docker managed plugin $(PLUGIN) from the same rootfs; then: docker plugin enable $(PLUGIN)
	@bash plugin/managed/build.sh plugin $(PLUGIN) $(IMAGE)

# Benchmarks (root; every run makes and removes its own cgb… namespaces, links, containers, chains
# and agents). Results: bench/results/$(BENCH_RUN).{json,md,png}. See bench/README.md.
BENCH_RUN := $(or $(BENCH_RUN),$(shell date +%Y%m%dT%H%M%S))
BENCH := $(PY) -m bench

bench-deps: setup
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[bench]'

bench: bench-deps  ## every tier; about 20 min in chunks, each command < 10 min
	$(BENCH) micro --run $(BENCH_RUN)
	$(BENCH) control --run $(BENCH_RUN)
	$(BENCH) datapath --run $(BENCH_RUN) --rounds 2 --chunk 0
	$(BENCH) datapath --run $(BENCH_RUN) --rounds 2 --chunk 1
	$(BENCH) datapath --run $(BENCH_RUN) --rounds 2 --chunk 2
	$(BENCH) report --run $(BENCH_RUN) --latest

bench-quick: bench-deps  ## one short round of every tier (< 3 min), for development
	$(BENCH) micro --run $(BENCH_RUN) --quick
	$(BENCH) control --run $(BENCH_RUN) --quick
	$(BENCH) datapath --run $(BENCH_RUN) --quick
	$(BENCH) report --run $(BENCH_RUN)

bench-cluster: bench-deps  ## cross-node RR/CRR vs plain VXLAN, identity propagation, keys/RSS (~5 min)
	$(BENCH) cluster --run $(BENCH_RUN)

bench-l7: bench-deps  ## HTTP through the L7 proxy vs L4 only vs nginx; 1,000 connections; Kafka produce (~3 min)
	$(BENCH) l7 --run $(BENCH_RUN)

bench-lb: bench-deps  ## services: socket LB vs straight and vs kube-proxy DNAT (1k/10k), create→effective, 10k loaded (~7 min)
	$(PY) -m bench.lb --run $(BENCH_RUN)

bench-flows: bench-deps  ## flow export: CRR with a follower vs without, a 100k-flow ring's memory, --last 10000 (~2 min)
	$(BENCH) flows --run $(BENCH_RUN)

SOAK_MINUTES ?= 30
bench-soak: bench-deps  ## 3-node soak: CNI churn 5/s, policy changes, cross-node probes; resources flat (SOAK_MINUTES=30)
	@$(BENCH) soak --run $(BENCH_RUN) --minutes $(SOAK_MINUTES); status=$$?; \
	$(BENCH) report --run $(BENCH_RUN) >/dev/null; exit $$status

bench-micro: bench-deps  ## BPF_PROG_TEST_RUN of the real programs (< 1 min; CI runs it)
	$(BENCH) micro --run $(BENCH_RUN)
	$(BENCH) report --run $(BENCH_RUN)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
