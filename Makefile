# Two commands on a fresh clone:  make up  (the whole stack)  ·  make test  (the suite).
VENV ?= .venv
PY := $(VENV)/bin/python
OLLAMA ?= http://127.0.0.1:11434
JS := tests/js/node_modules/.installed
# The dashboard's browser tests drive Debian's chromium through chromedriver (apt, as root or
# with sudo); OSHEPHERD_SKIP_BROWSER=1 skips both the install and those tests.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: up test lint bench clean browser venv

up: $(VENV)/.installed
	$(VENV)/bin/oshepherd up $(foreach url,$(OLLAMA),--ollama $(url))

venv: $(VENV)/.installed  # the virtualenv alone (make up and make test make it too)

test: $(VENV)/.installed $(JS) browser
	$(PY) -m pytest

browser:
ifneq ($(OSHEPHERD_SKIP_BROWSER),1)
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }
endif

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check oshepherd tests bench
	$(VENV)/bin/ruff format --check oshepherd tests bench
	$(VENV)/bin/mypy oshepherd tests bench

bench: $(VENV)/.installed
	$(PY) -m bench

$(VENV)/.installed: pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# ollama-js, for the conformance tests only.
$(JS): tests/js/package-lock.json
	npm ci --prefix tests/js --silent --no-audit --no-fund
	touch $@

clean:
	rm -rf $(VENV) tests/js/node_modules
