# The two commands in the README: `make demo` (the local demo mesh) and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
APT_PACKAGES := iproute2 iptables procps
BENCH_APT_PACKAGES := nginx haproxy wrk iperf3 nghttp2-client

.PHONY: setup system-deps test test-fast demo bench

system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi; \
	fi

setup: system-deps
	$(PIP) install -q --disable-pip-version-check -e '.[test]'

test: setup
	$(PYTHON) -m pytest -q

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow and not root"

demo: setup
	$(PYTHON) -m isthmus demo

bench: setup
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi; \
	fi
	$(PYTHON) -m bench.run_all
