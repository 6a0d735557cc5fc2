# The README's two commands. Both set up .venv from requirements.lock when it is missing or when
# pyproject.toml or the lock changed, then run. Rerunning with nothing changed skips the install.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.t2id-installed
LOCK   := requirements.lock
PYTEST_ARGS ?=

# IaC linters live in their own venv (checkov pins its own dependency set); `make test` runs them.
IAC_VENV ?= .venv-iac
IAC_STAMP := $(IAC_VENV)/.t2id-iac-installed
IAC_LOCK := requirements-iac.lock
K8S_VERSION ?= 1.33.0

# `make lock` only: the resolver, pinned, in a venv of its own.
LOCK_VENV ?= .venv-lock
UV_SPEC ?= uv==0.13.9
# The lock is universal (every platform, Python >= 3.11) so the GPU image's Python resolves from
# it too; hashes make pip refuse anything but the locked files.
UV_COMPILE := $(LOCK_VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes

.PHONY: demo test install lock clean-demo lint-iac

install: $(STAMP)

# Exactly the lock: install it hash-checked, then remove whatever the venv holds beyond it (a
# package dropped from the lock must not linger), then t2id itself without touching deps.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@$(PY) .ci/venv_prune.py $(LOCK)
	$(PY) -m pip check
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/t2id demo

# The two venvs install side by side (pip unpacks on one core each; they share only pip's cache,
# whose writes are atomic), then the IaC lint, then the tests.
test:
	@$(MAKE) --no-print-directory -j2 $(STAMP) $(IAC_STAMP)
	@$(MAKE) --no-print-directory lint-iac
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Regenerate the locks from pyproject.toml (+ requirements.in) and requirements-iac.in with the
# newest releases the ranges allow, and the CPU image's lock from requirements.lock (standard
# library only). Run it after changing a dependency or to take updates, then `make test` and
# commit the locks with the change.
lock:
	@test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q '$(UV_SPEC)'; }
	$(UV_COMPILE) pyproject.toml requirements.in --extra test -o $(LOCK)
	$(UV_COMPILE) requirements-iac.in -o $(IAC_LOCK)
	$(PYTHON) .ci/cpu_lock.py

$(IAC_STAMP): $(IAC_LOCK)
	@test -x $(IAC_VENV)/bin/python || $(PYTHON) -m venv $(IAC_VENV)
	$(IAC_VENV)/bin/python -m pip install -q --require-hashes -r $(IAC_LOCK)
	@$(IAC_VENV)/bin/python .ci/venv_prune.py $(IAC_LOCK)
	@touch $(IAC_STAMP)

# hadolint on every Dockerfile; checkov on terraform/ and k8s/ (skips are justified inline);
# core kinds of every kustomize build against the Kubernetes schemas. No terraform binary is
# installable here (not on PyPI or Debian): checkov and tests/test_iac.py cover terraform/.
lint-iac: $(IAC_STAMP)
	$(IAC_VENV)/bin/hadolint docker/Dockerfile.*
	$(IAC_VENV)/bin/checkov --quiet --compact --skip-download -d terraform --framework terraform
	$(IAC_VENV)/bin/checkov --quiet --compact --skip-download -d k8s --framework kubernetes kustomize
	@set -e; out=$$(mktemp -d); for d in k8s/base k8s/stages k8s/overlays/*; do \
	  f=$$out/$$(echo $$d | tr / -).yaml; $(IAC_VENV)/bin/kubectl kustomize $$d > $$f; \
	  $(IAC_VENV)/bin/kubernetes-validate --quiet --no-warn --strict -k $(K8S_VERSION) $$f; done; rm -rf $$out

clean-demo:
	rm -rf t2id-demo
