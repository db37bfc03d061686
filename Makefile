# fsserve: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsserve-installed

.PHONY: install demo test test-slow gpu-check clean protos

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU wheel that lies on disk instead of a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,dev,serve,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	bash examples/demo.sh

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

gpu-check: install
	bash benchmarks/gpu_check.sh

clean:
	rm -rf runs build *.egg-info .pytest_cache

# Regenerate the KServe v2 gRPC stubs from fsserve/serving/protos/grpc_predict_v2.proto (committed).
protos: install
	$(PY) fsserve/serving/protos/generate.py
