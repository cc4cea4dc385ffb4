# Two commands: `make run` serves the app, `make test` installs what the tests need and runs them.
# Either leaves .venv behind, and with it the command line: `.venv/bin/python -m chatproxy --help`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 5000

.PHONY: run test lint install system-deps clean bench soak

$(VENV)/.installed: requirements.txt
	$(PYTHON) -c 'import sys; sys.exit("chatproxy needs Python 3.11+") if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) devserver.py --port $(PORT)

# Debian packages the tests drive for real (Chromium for the page tests, nginx for the deploy tests, curl for
# the README's examples).
# Installed with apt when we are root and they are missing; elsewhere the tests that need them skip
# naming the package, and with CI=true a skip fails the run.
system-deps:
	@missing=""; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="$$missing nginx-light"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not root: install$$missing yourself or those tests skip"; fi; \
	fi

# The tests that run real gunicorn, once more under the other worker class (gunicorn.conf.py: gthread by default):
# both stay supported. tests/helpers.py passes CHATPROXY_WORKER_CLASS on to every gunicorn it starts.
SERVER_TESTS := tests/test_deploy.py tests/test_streaming.py tests/test_soak.py tests/test_concurrency.py

test: install system-deps
	CHATPROXY_WORKER_CLASS=gthread $(PY) -m pytest
	CHATPROXY_WORKER_CLASS=gevent $(PY) -m pytest $(SERVER_TESTS)

# ruff, configured in pyproject.toml: the lint rules and the formatting, checked (`ruff format .` fixes the latter).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# LiteLLM's proxy for bench path E, in a virtualenv of its own (bench/litellm-requirements.txt); a failed
# install leaves no bench/.litellm/bin/litellm, and the bench then runs without path E.
LITELLM := bench/.litellm/bin/litellm
$(LITELLM): bench/litellm-requirements.txt
	test -x bench/.litellm/bin/python || $(PYTHON) -m venv bench/.litellm
	-bench/.litellm/bin/python -m pip install --quiet -r bench/litellm-requirements.txt

# The benchmark (bench/run.py, under 10 minutes): writes BENCHMARKS.md, docs/bench.png and README's Performance figures.
bench: install $(LITELLM)
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) bench/run.py

# The soak and fault drill (tests/soak.py, about 6 minutes, loopback only): writes docs/RELIABILITY.md.
soak: install
	$(PY) tests/soak.py

clean:
	rm -rf $(VENV) .pytest_cache artifacts
