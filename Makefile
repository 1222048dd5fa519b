# turnout: one place for set-up, tests, lint, demo and benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := protos/inference.proto

.PHONY: install generate check-generated demo test test-fast lint bench bench-tools clean

install: $(STAMP)

# Re-install only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Rebuild the OIP descriptor set (committed; loaded into a private pool by gateway/grpc/messages.py).
DESCRIPTOR := gateway/grpc/inference.desc
generate: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --descriptor_set_out=$(DESCRIPTOR) $(PROTOS)

check-generated: $(STAMP)
	@tmp=$$(mktemp -d) && $(PY) -m grpc_tools.protoc -Iprotos --descriptor_set_out=$$tmp/d $(PROTOS) \
	  && cmp -s $$tmp/d $(DESCRIPTOR) && echo "generated descriptors are up to date" \
	  || { echo "$(DESCRIPTOR) is stale: run make generate"; rm -rf $$tmp; exit 1; }; rm -rf $$tmp

demo: $(STAMP)
	$(VENV)/bin/turnout demo

test: $(STAMP) check-generated
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway monitor tests bench
	$(VENV)/bin/ruff format --check gateway monitor tests bench
	$(VENV)/bin/mypy gateway monitor

# Load generators come from Debian: hey (HTTP) and h2load (gRPC, nghttp2-client).
bench-tools:
	@command -v hey >/dev/null && command -v h2load >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey nghttp2-client)

bench: $(STAMP) bench-tools
	$(PY) -m bench.serving

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-models
