# The two commands of the README:
#   make demo   sets up .venv if needed, then explains the bundled sample photos (writes ./cnnscope-out)
#   make test   sets up .venv if needed, then runs ruff and the whole test suite
#   make test-zoo  sets up .venv-zoo if needed (torch + torchvision + timm, about 5.5 GB), then runs the tests
#                  marked zoo (real torchvision/timm architectures, Captum, ONNX through onnx2torch)
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= requirements/constraints-cpu.txt
OUT ?= cnnscope-out
BIN := $(VENV)/bin
STAMP := $(VENV)/.cnnscope-installed

.PHONY: demo test lint bench setup setup-zoo test-zoo

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cnnscope demo -o $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	@scripts/ensure-chromium
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev,bench]'
	$(BIN)/python bench/gradcam.py
	$(BIN)/python bench/methods.py
	$(BIN)/python bench/perturbation.py
	$(BIN)/python bench/features.py

# The zoo environment: its own torch (torchvision does not import beside the CPU torch of .venv), pinned in
# requirements/zoo.txt, plus the package's own dependencies read from pyproject.toml. cnnscope itself is put on
# the path with a .pth file (no build in the source tree, so it can be set up beside a working .venv).
ZOO_VENV ?= .venv-zoo
ZOO_BIN := $(ZOO_VENV)/bin
ZOO_STAMP := $(ZOO_VENV)/.cnnscope-installed

setup-zoo: $(ZOO_STAMP)

$(ZOO_STAMP): pyproject.toml requirements/zoo.txt
	@test -x $(ZOO_BIN)/python || $(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(p['dependencies'] + p['optional-dependencies']['web']))" > $(ZOO_VENV)/cnnscope-requirements.txt
	$(ZOO_BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/zoo.txt \
	    -r $(ZOO_VENV)/cnnscope-requirements.txt
	$(ZOO_BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" | \
	    xargs -I{} sh -c 'echo "$(CURDIR)/src" > {}/cnnscope-src.pth'
	@touch $(ZOO_STAMP)

test-zoo: $(ZOO_STAMP)
	$(ZOO_BIN)/python -m pytest -q -m zoo tests/zoo
