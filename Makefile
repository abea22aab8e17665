# hpcdask: the README's verbs, each a thin call of a script or the CLI.
#   make run    create .venv from the lock and run the main job (default workload, LocalCluster)
#   make test   install what the tests need (apt + .venv-test) and run every test, cluster ones included
#   make docs   build the documentation (docs/, Sphinx) into docs/_build/html, warnings as errors
SHELL := /bin/bash
# shq: TEXT single-quoted for the shell.
shq = '$(subst ','\'',$(1))'
PYTHON ?= python3
VENV := .venv
TVENV := .venv-test
LOCK := containers/requirements.lock
DEVLOCK := tests/requirements-dev.lock
ARGS ?=
PYTEST_ARGS ?=
PIP_QUIET := --quiet --disable-pip-version-check
# The test cluster's batch system: tests/testcluster/$(BATCH).sh (slurm or sge).
BATCH ?= slurm
CLUSTER := BATCH=$(BATCH) bash tests/testcluster/cluster.sh
# The image builder used when there is no Apptainer (containers/imagebuild), run from the root.
IMAGEBUILD := PYTHONPATH=$(CURDIR)/containers
# cluster-login: CMD runs as AS (default hpcuser) on the login node; without CMD, a login shell.
# (AS is also make's assembler: its built-in default counts as unset.)
LOGIN_AS := $(if $(filter default undefined,$(origin AS)),hpcuser,$(AS))
CMD ?=

.PHONY: help run test test-unit docs lock debian-lock venv sif sif-check docker image compose-test cluster-up cluster-down \
        cluster-env cluster-login cluster-deps host-deps bench clean

help:
	@echo "make run | test | test-unit | docs | lock | sif | sif-check | docker | image | compose-test | cluster-up | cluster-down | cluster-env | bench | clean"
	@echo "make cluster-login [CMD='squeue'] [AS=otheruser]   (BATCH=slurm|sge selects the test cluster's batch system)"

# --- environments -----------------------------------------------------------------------------
# Every Client in a venv proves its identity to the scheduler: the venv's own Dask configuration
# (<venv>/etc/dask) names hpcdask's client preload, as the image's does (containers/install.sh).
CLIENT_PROOF := src/hpcdask/etc/hpcdask-client.yaml

# .venv is exactly the lock (+ hpcdask itself): what `make run` uses and what the lock test checks.
$(VENV)/.done: $(LOCK) pyproject.toml $(CLIENT_PROOF)
	@$(PYTHON) -c 'import sys; v=sys.version_info[:2]; sys.exit(0 if v==(3,11) else "hpcdask: the lock is for Python 3.11, found %d.%d; run: make PYTHON=python3.11 ..." % v)'
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/pip install $(PIP_QUIET) --no-deps --no-build-isolation --no-index -e .
	install -D -m 0644 $(CLIENT_PROOF) $(VENV)/etc/dask/hpcdask-client.yaml
	touch $@

# .venv-test is the same lock plus the test tools (tests/requirements-dev.lock).
$(TVENV)/.done: $(LOCK) $(DEVLOCK) pyproject.toml $(CLIENT_PROOF)
	rm -rf $(TVENV) && $(PYTHON) -m venv $(TVENV)
	$(TVENV)/bin/pip install $(PIP_QUIET) --require-hashes --no-deps -r $(LOCK) -r $(DEVLOCK)
	$(TVENV)/bin/pip install $(PIP_QUIET) --no-deps --no-build-isolation --no-index -e .
	install -D -m 0644 $(CLIENT_PROOF) $(TVENV)/etc/dask/hpcdask-client.yaml
	touch $@

# The test-cluster package (tests/testcluster) and the image builder (containers/imagebuild),
# importable in a venv: a .pth with their folders (the bench imports both; pytest has them
# through pyproject.toml's pythonpath).
%/.paths: %/.done
	$*/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
	    | { read d; printf '%s\n' "$(CURDIR)/tests" "$(CURDIR)/containers" >"$$d/hpcdask-checkout.pth"; }
	touch $@

venv: $(VENV)/.done

# --- the two commands -------------------------------------------------------------------------
run: $(VENV)/.done
	$(VENV)/bin/hpcdask run $(ARGS)

host-deps:
	bash tests/setup-host.sh

# The 40 slowest steps at the end of the log: CI's budget is 45 minutes for the whole suite.
test: host-deps $(VENV)/.done $(TVENV)/.done
	$(TVENV)/bin/python -m pytest --durations=40 $(PYTEST_ARGS)

# No root, no image, no cluster: under a minute (on every core: pytest-xdist).
test-unit: $(VENV)/.done $(TVENV)/.done
	$(TVENV)/bin/python -m pytest -n auto tests/unit $(PYTEST_ARGS)

# --- the documentation -----------------------------------------------------------------------
# Offline: -n (nitpicky) and MyST's heading anchors make every link between the pages an error when
# it does not resolve, and docs/_ext/local_links.py checks README.md's relative links; nothing is
# fetched. make test builds it too (tests/unit/test_docs.py).
docs: $(TVENV)/.done
	$(TVENV)/bin/python -m sphinx -W --keep-going -n -b html docs docs/_build/html

# --- the locks --------------------------------------------------------------------------------
# requirements.lock (pip-compile) and debian.lock: every Debian package of the image, exactly
# (containers/debian.in installed into the base; needs root: the builder's debootstrap base).
lock: debian-lock
	$(PYTHON) -m venv .venv-tools && .venv-tools/bin/pip install $(PIP_QUIET) pip-tools
	.venv-tools/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	    -o $(LOCK) containers/requirements.in
	cd tests && ../.venv-tools/bin/pip-compile --quiet --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links \
	    --strip-extras -o requirements-dev.lock requirements-dev.in

debian-lock:
	$(IMAGEBUILD) $(PYTHON) -m imagebuild.image debian-lock

# --- images -----------------------------------------------------------------------------------
# With a real Apptainer on PATH: apptainer build. Without: the test image's root filesystem
# (debootstrap + the def's sections, containers/imagebuild/image.py) assembled into a SIF like
# Apptainer's builder does (containers/imagebuild/sif.py: mksquashfs + siftool; needs root).
# Says which path it took.
# Reproducible: SOURCE_DATE_EPOCH (every time the image records) is the last commit touching
# containers/, src/ or pyproject.toml unless set (`python -m imagebuild.image epoch` prints it).
# `make sif-check SIF=path` rebuilds in a fresh cache and says whether SIF is byte-identical.
IMAGE_EPOCH = $${SOURCE_DATE_EPOCH:-$$($(IMAGEBUILD) $(PYTHON) -m imagebuild.image epoch)}
sif:
	@a=$$(command -v apptainer || true); \
	if [ -n "$$a" ] && ! grep -q 'bubblewrap test runner' "$$a" 2>/dev/null; then \
	    echo "make sif: building with Apptainer ($$a): apptainer build dask.sif containers/dask.def"; \
	    SOURCE_DATE_EPOCH=$(IMAGE_EPOCH) apptainer build dask.sif containers/dask.def; \
	else \
	    echo "make sif: no Apptainer on PATH: debootstrap root filesystem + the def's sections, assembled into a SIF with mksquashfs and siftool (containers/imagebuild/sif.py)"; \
	    $(IMAGEBUILD) $(PYTHON) -m imagebuild.sif build --out dask.sif; \
	fi

SIF ?= dask.sif
sif-check:
	$(IMAGEBUILD) $(PYTHON) -m imagebuild.sif check $(SIF)

# DOCKER_BUILD_ARGS: more `docker build` options, e.g. where no registry is reachable a local
# base (--build-arg BASE_IMAGE=..., as tests/compose/docker.sh does) or --network host.
DOCKER_BUILD_ARGS ?=
docker:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make docker: no running Docker engine; start one, or use podman: bash tests/compose/podman.sh build" >&2; exit 2; }
	docker build -f containers/Dockerfile --build-arg LOCK_SHA256=$$(sha256sum $(LOCK) | cut -d' ' -f1) \
	    --build-arg SOURCE_DATE_EPOCH=$(IMAGE_EPOCH) -t hpcdask:latest $(DOCKER_BUILD_ARGS) .

image: $(TVENV)/.done
	$(IMAGEBUILD) $(TVENV)/bin/python -m imagebuild.image build

compose-test: host-deps $(TVENV)/.done
	$(TVENV)/bin/python -m pytest -m compose -s tests/compose/test_compose.py tests/compose/test_compose_docker.py $(PYTEST_ARGS)

# --- the test cluster -------------------------------------------------------------------------
cluster-deps:
	$(CLUSTER) deps

cluster-up: host-deps
	$(CLUSTER) up

cluster-down:
	$(CLUSTER) down

cluster-env:
	@$(CLUSTER) env

# make cluster-login CMD='squeue -u hpcuser' [AS=otheruser]: one command, its exit status passed on.
cluster-login:
	@$(CLUSTER) login -u $(LOGIN_AS) $(if $(strip $(value CMD)),bash -lc $(call shq,$(value CMD)),)

# --- benchmarks -------------------------------------------------------------------------------
bench: host-deps $(VENV)/.done $(VENV)/.paths
	$(VENV)/bin/python bench/run.py $(if $(QUICK),--quick,) $(ARGS)

clean:
	rm -rf $(VENV) $(TVENV) .venv-tools hpcdask-output .pytest_cache docs/_build
