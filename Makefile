# turnout: one place for set-up, tests, lint, demo and benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install generate check-generated demo test test-fast test-tools lint bench bench-peers bench-tools clean

install: $(STAMP)

# Re-install only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Rebuild the descriptor sets (committed; each is loaded into a private pool by
# gateway/grpc/messages.py). Pairs of descriptor set = .proto file; --include_imports makes
# each set self-contained, and protoc's output is byte-for-byte stable for one grpcio-tools.
DESCRIPTORS := gateway/grpc/inference.desc=protos/inference.proto \
	gateway/admin/traffic.desc=protos/turnout/admin/v1/traffic.proto \
	gateway/admin/rollout.desc=protos/turnout/admin/v1/rollout.proto \
	gateway/feedback.desc=protos/turnout/monitor/v1/feedback.proto
PROTOC := $(PY) -m grpc_tools.protoc -Iprotos --include_imports

generate: $(STAMP)
	@for pair in $(DESCRIPTORS); do \
	  $(PROTOC) --descriptor_set_out=$${pair%%=*} $${pair#*=} && echo "wrote $${pair%%=*}" || exit 1; \
	done

check-generated: $(STAMP)
	@tmp=$$(mktemp -d); stale=0; \
	for pair in $(DESCRIPTORS); do \
	  $(PROTOC) --descriptor_set_out=$$tmp/d $${pair#*=} && cmp -s $$tmp/d $${pair%%=*} \
	    || { echo "$${pair%%=*} is stale: run make generate"; stale=1; }; \
	done; rm -rf $$tmp; \
	[ $$stale = 0 ] && echo "generated descriptors are up to date"

demo: $(STAMP)
	$(VENV)/bin/turnout demo

# promtool (Debian's prometheus) checks the exposition formats in the tests.
test-tools:
	@command -v promtool >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)

# CI runs exactly this: generated code, lint (ruff + mypy --strict) and every test.
test: $(STAMP) check-generated lint test-tools
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway monitor turnout turnout_contract tests bench
	$(VENV)/bin/ruff format --check gateway monitor turnout turnout_contract tests bench
	$(VENV)/bin/mypy gateway monitor turnout turnout_contract

# Load generators come from Debian: hey (HTTP) and h2load (gRPC, nghttp2-client).
bench-tools:
	@command -v hey >/dev/null && command -v h2load >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey nghttp2-client)

bench: $(STAMP) bench-tools
	$(PY) -m bench.serving

# turnout side by side with Triton, KServe, MLServer, LitServe and BentoML; each peer is
# installed (once) into a venv of its own under bench/.peers/, which downloads ~2 GB.
bench-peers: $(STAMP) bench-tools
	$(PY) -m bench.peers

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-models
