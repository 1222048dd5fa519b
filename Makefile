# turnout: one place for set-up, tests, lint, demo and benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install generate check-generated demo test test-fast test-tools lint bench bench-peers \
	bench-tools image-tools base-image image image-cuda image-test clean

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
	$(VENV)/bin/ruff check gateway monitor turnout turnout_contract tests bench deploy
	$(VENV)/bin/ruff format --check gateway monitor turnout turnout_contract tests bench deploy
	$(VENV)/bin/mypy gateway monitor turnout turnout_contract deploy/image

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

# The container image (deploy/Containerfile, docs/deploy.md), built with buildah from a
# Debian base made here from Debian's packages: no image registry is needed. Slow (minutes,
# packages from PyPI), so not part of `make test`; `make image-test` smoke-tests the image.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE_IMAGE ?= localhost/turnout-base:bookworm
IMAGE ?= localhost/turnout:$(VERSION)
ONNXRUNTIME ?= onnxruntime
# A CA bundle pip trusts during the build (a TLS-intercepting proxy's); mounted, not kept.
IMAGE_CA ?= /etc/ssl/certs/ca-certificates.crt
BUILDAH := buildah

image-tools:
	@command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah mmdebstrap >/dev/null)

# Built once; `buildah rmi $(BASE_IMAGE)` makes the next `make image` build it again.
base-image: image-tools
	@$(BUILDAH) inspect --type image $(BASE_IMAGE) >/dev/null 2>&1 || deploy/image/base.sh $(BASE_IMAGE)

image: base-image
	$(BUILDAH) bud --isolation chroot --format docker --layers -f deploy/Containerfile \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg ONNXRUNTIME='$(ONNXRUNTIME)' \
	  $(if $(wildcard $(IMAGE_CA)),--volume $(IMAGE_CA):/run/build-ca.pem:ro --build-arg PIP_CERT=/run/build-ca.pem) \
	  -t $(IMAGE) .
	@$(BUILDAH) images --format '{{.Name}}:{{.Tag}} {{.Size}}' $(IMAGE)

image-cuda:
	$(MAKE) image ONNXRUNTIME='onnxruntime-gpu[cuda,cudnn]' IMAGE=$(IMAGE)-cuda

# Serves the image's demo models from inside it (buildah run, chroot isolation: the host's
# network) and sends real requests with tritonclient from the host.
image-test: $(STAMP) image-tools
	$(PY) deploy/image/smoke_test.py --image $(IMAGE)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-models
