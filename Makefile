# relayd — the two commands of the quick start: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck sysdeps bench clean

$(STAMP): pyproject.toml relayd/_scan.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p var/spool var/state var/outbox
	$(BIN)/relayd -c etc/relayd.dev.yaml run

# Debian packages the tests use: postfix (interop smarthost), systemd (systemd-analyze),
# php-cli (real mail() through relayd-sendmail), swaks (AUTH over TLS against the submission
# listener), postgresql (the fleet tests' throwaway cluster), opendkim-tools (DKIM verifier),
# opendkim (benchmark milter). Installed only when missing.
sysdeps:
	@bash tests/support/install-sysdeps.sh

test: $(STAMP) sysdeps
	$(BIN)/ruff check relayd tests tools
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/relay_bench.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache
