# λScale — `make run` starts a local cluster, `make test` runs the tests.
# Both bootstrap .venv on first use (Python >= 3.11 and make are all a fresh machine needs).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first and pinned: unpinned, pip would choose a multi-GB CUDA build
TORCH  ?= torch==2.13.0
EXECUTORS ?= 2
HTTP_PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run test test-clients lint typecheck bench clean venv image compose-smoke compose-two-hosts chaos bench-burst bench-burst-sweep

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "λScale needs Python >= 3.11, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lscale up --executors $(EXECUTORS) --http-port $(HTTP_PORT)

# pytest exits 5 when it collected no test: that is a broken suite, never a pass.
test: $(STAMP)
	@$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests — failing on purpose" >&2; exit 1; fi; \
	exit $$rc

# --- Docker (needs an engine: ../shared/tools/docker-engine.sh starts one here) -------------
# The image; prints its size and checks the runtime stage holds no build tools. Where no image
# registry answers it builds on the local base with the torch wheel and CA bundle on disk.
IMAGE ?= lscale:latest
image:
	PYTHON=$(PYTHON) bash compose/build-image.sh $(IMAGE)

# Build, up, serve through the router with the openai client, lscale top/status, scale to 3,
# kill an executor and see it replaced, down -v leaves nothing (tests/deploy, marker docker).
compose-smoke: $(STAMP)
	LSCALE_IMAGE=$(IMAGE) $(VENV)/bin/pytest -m docker -s -p no:cacheprovider tests/deploy/test_compose_up.py

# Two compose projects on this machine: the cluster, and an executors-only "host" joining it;
# the second host's executors receive the model by multicast and serve (events printed).
compose-two-hosts: $(STAMP)
	LSCALE_IMAGE=$(IMAGE) $(VENV)/bin/pytest -m docker -s -p no:cacheprovider tests/deploy/test_two_hosts.py

# lm-eval-harness (vs its own hf backend) and guidellm, unchanged, against a real lscale up
test-clients: $(STAMP)
	$(VENV)/bin/pytest -m clients -p no:cacheprovider tests/cluster/test_clients.py

# SIGKILL / SIGSTOP of every service kind and of nats-server (one node of a 3-node NATS cluster,
# and the only one) under a steady load and during a multicast; prints the table (README,
# "Reliability"). A few minutes; run it on a quiet machine: its bounds are seconds.
CHAOS_TABLE ?= chaos-table.md
chaos: $(STAMP)
	LSCALE_CHAOS_TABLE=$(CHAOS_TABLE) $(VENV)/bin/pytest -m chaos -p no:cacheprovider tests/chaos

# The burst headline (issue 15, docs/BENCH_BURST.md): every scenario x BURST_REPEATS on the scaled
# testbed (EMULATED: the h100-llama-2-13b profile's rates and pacing), 8 executors, the conversation
# trace's busiest 20 s; JSON per scenario and plots per run under BURST_OUT. Needs root (network
# namespaces). About 8-10 min per scenario run on a quiet 2-core machine (x repeats): run it with
# the machine to itself, or the CPU check marks the runs invalid.
BURST_OUT ?= results/bench-burst
BURST_REPEATS ?= 3
BURST_SCENARIOS ?= warm host cold
BURST_ARGS ?=
bench-burst: $(STAMP)
	@mkdir -p $(BURST_OUT)
	@for s in $(BURST_SCENARIOS); do \
	  echo "bench-burst: scenario $$s x $(BURST_REPEATS)" >&2; \
	  $(PY) -m loadgen bench-e2e --scenario $$s --repeats $(BURST_REPEATS) --json \
	    --out $(BURST_OUT)/$$s $(BURST_ARGS) > $(BURST_OUT)/$$s.json || exit 1; \
	done

# Where execute-while-load wins and loses: the warm scenario with the network link at several
# multiples of the local disk's rate (no keep-alive sweep: one episode per mode and ratio).
BURST_RATIOS ?= 0.5,1,2,4
bench-burst-sweep: $(STAMP)
	@mkdir -p $(BURST_OUT)
	$(PY) -m loadgen bench-e2e --scenario warm --link-disk-ratios $(BURST_RATIOS) \
	  --keep-alive-sweep "" --json --out $(BURST_OUT)/ratio-sweep $(BURST_ARGS) \
	  > $(BURST_OUT)/ratio-sweep.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy shared services loadgen tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
