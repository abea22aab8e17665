# hpcdask: the README's verbs, each a thin call of a script or the CLI.
#   make run    create .venv from the lock and run the main job (default workload, LocalCluster)
#   make test   install what the tests need (apt + .venv-test) and run every test, cluster ones included
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TVENV := .venv-test
LOCK := containers/requirements.lock
DEVLOCK := tests/requirements-dev.lock
ARGS ?=
PYTEST_ARGS ?=
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: help run test test-unit lock venv sif docker image compose-test cluster-up cluster-down \
        cluster-env cluster-login cluster-deps host-deps bench clean

help:
	@echo "make run | test | lock | sif | docker | image | compose-test | cluster-up | cluster-login | cluster-down | cluster-env | bench | clean"

# --- environments -----------------------------------------------------------------------------
# .venv is exactly the lock (+ hpcdask itself): what `make run` uses and what the lock test checks.
$(VENV)/.done: $(LOCK) pyproject.toml
	@$(PYTHON) -c 'import sys; v=sys.version_info[:2]; sys.exit(0 if v==(3,11) else "hpcdask: the lock is for Python 3.11, found %d.%d; run: make PYTHON=python3.11 ..." % v)'
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/pip install $(PIP_QUIET) --no-deps --no-build-isolation --no-index -e .
	touch $@

# .venv-test is the same lock plus the test tools (tests/requirements-dev.lock).
$(TVENV)/.done: $(LOCK) $(DEVLOCK) pyproject.toml
	rm -rf $(TVENV) && $(PYTHON) -m venv $(TVENV)
	$(TVENV)/bin/pip install $(PIP_QUIET) --require-hashes --no-deps -r $(LOCK) -r $(DEVLOCK)
	$(TVENV)/bin/pip install $(PIP_QUIET) --no-deps --no-build-isolation --no-index -e .
	touch $@

venv: $(VENV)/.done

# --- the two commands -------------------------------------------------------------------------
run: $(VENV)/.done
	$(VENV)/bin/hpcdask run $(ARGS)

host-deps:
	bash tests/setup-host.sh

test: host-deps $(VENV)/.done $(TVENV)/.done
	$(TVENV)/bin/python -m pytest $(PYTEST_ARGS)

test-unit: $(VENV)/.done $(TVENV)/.done
	$(TVENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

# --- the lock ---------------------------------------------------------------------------------
lock:
	$(PYTHON) -m venv .venv-tools && .venv-tools/bin/pip install $(PIP_QUIET) pip-tools
	.venv-tools/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	    -o $(LOCK) containers/requirements.in
	cd tests && ../.venv-tools/bin/pip-compile --quiet --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links \
	    --strip-extras -o requirements-dev.lock requirements-dev.in

# --- images -----------------------------------------------------------------------------------
# With a real Apptainer on PATH: apptainer build. Without: the test image's root filesystem
# (debootstrap + the def's sections, tests/cluster/image.py) assembled into a SIF like Apptainer's
# builder does (tests/cluster/sif.py: mksquashfs + siftool; needs root). Says which path it took.
sif:
	@a=$$(command -v apptainer || true); \
	if [ -n "$$a" ] && ! grep -q 'bubblewrap test runner' "$$a" 2>/dev/null; then \
	    echo "make sif: building with Apptainer ($$a): apptainer build dask.sif containers/dask.def"; \
	    apptainer build dask.sif containers/dask.def; \
	else \
	    echo "make sif: no Apptainer on PATH: debootstrap root filesystem + the def's sections, assembled into a SIF with mksquashfs and siftool (tests/cluster/sif.py)"; \
	    $(PYTHON) tests/cluster/sif.py build --out dask.sif; \
	fi

# DOCKER_BUILD_ARGS: more `docker build` options, e.g. where no registry is reachable a local
# base (--build-arg BASE_IMAGE=..., as tests/cluster/docker.sh does) or --network host.
DOCKER_BUILD_ARGS ?=
docker:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make docker: no running Docker engine; start one, or use podman: bash tests/cluster/podman.sh build" >&2; exit 2; }
	docker build -f containers/Dockerfile --build-arg LOCK_SHA256=$$(sha256sum $(LOCK) | cut -d' ' -f1) -t hpcdask:latest $(DOCKER_BUILD_ARGS) .

image: $(TVENV)/.done
	$(TVENV)/bin/python tests/cluster/image.py build

compose-test: host-deps $(TVENV)/.done
	$(TVENV)/bin/python -m pytest -m compose -s tests/integration/test_compose.py tests/integration/test_compose_docker.py $(PYTEST_ARGS)

# --- the test cluster -------------------------------------------------------------------------
cluster-deps:
	bash tests/cluster/cluster.sh deps

cluster-up: host-deps
	bash tests/cluster/cluster.sh up

cluster-down:
	bash tests/cluster/cluster.sh down

cluster-env:
	@bash tests/cluster/cluster.sh env

cluster-login:
	bash tests/cluster/cluster.sh login

# --- benchmarks -------------------------------------------------------------------------------
bench: host-deps $(VENV)/.done
	$(VENV)/bin/python bench/run.py $(if $(QUICK),--quick,) $(ARGS)

clean:
	rm -rf $(VENV) $(TVENV) .venv-tools hpcdask-output .pytest_cache
