# imagepushd — developer entry points. Every target works on a fresh Debian 12 machine as root.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
APT_PACKAGES := containerd docker-registry skopeo strace nginx prometheus docker.io curl openssl \
                systemd-container mmdebstrap libsystemd-dev pkg-config gcc python3-dev python3-venv
PYTEST_ARGS ?=

.PHONY: apt test lint typecheck unit deps venv demo bench-scan bench-busy clean deb dist

## make test: install everything needed, then lint, type-check and run the whole suite.
test: deps lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

## make demo: the main job (see README).
demo: deps
	$(BIN)/python demo/demo.py

deps: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(BIN)/imagepushd

$(BIN)/imagepushd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

LINT_PATHS := $(wildcard daemon tests bench demo packaging)

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: venv
	$(BIN)/mypy

bench-scan: deps
	$(BIN)/python bench/scan.py

bench-busy: deps
	$(BIN)/python bench/busy.py

## make deb: dist/imagepushd_<version>_all.deb with Debian's tooling (dh + pybuild), then lintian.
deb:
	bash packaging/build-deb.sh

## make dist: wheel and sdist in dist/ (python -m build: the sdist, then the wheel from it).
dist: venv
	$(BIN)/pip install -q build
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info daemon/*.egg-info .pytest_cache .mypy_cache .ruff_cache
