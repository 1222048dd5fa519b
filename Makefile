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

# Regenerate the protobuf/gRPC modules (committed; CI checks they match the .proto files).
generate: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Igateway/_generated=protos \
	  --python_out=. --grpc_python_out=. --mypy_out=quiet:. --mypy_grpc_out=quiet:. $(PROTOS)

check-generated: $(STAMP)
	@tmp=$$(mktemp -d) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc \
	  -Igateway/_generated=protos --python_out=$$tmp --grpc_python_out=$$tmp \
	  --mypy_out=quiet:$$tmp --mypy_grpc_out=quiet:$$tmp $(PROTOS) && \
	  diff -r -x __init__.py -x __pycache__ $$tmp/gateway/_generated gateway/_generated \
	  && echo "generated code is up to date"; rc=$$?; rm -rf $$tmp; exit $$rc

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
