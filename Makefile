# The two commands of the README: `make serve` (the main job) and `make test`.
# Each creates .venv/ and installs what it needs.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MP2A := $(VENV)/bin/mp2a
STAMP := $(VENV)/.installed
DATA := data/digits
SHIFT := data/shift
SHIFT_DOMAINS := printed,handwritten,textured,street,lcd,dotmatrix
TARGET ?= handwritten
PORT ?= 3000
RUNS := runs
DEFAULT_RUN := $(RUNS)/default

.PHONY: venv test test-deps lint serve zeroshot-table results clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The test prerequisites, from Debian packages when missing: a real Prometheus (scrape test,
# promtool for the dashboard), PostgreSQL (initdb + pg_ctl; the tests start it themselves in a
# temp folder) and pgbouncer (the fleet's pooled connections). The packages' own services do
# not matter. The one place that installs them: `make test` here and in CI (.ci/run).
TEST_DEPS_MISSING = $(strip \
  $(if $(shell command -v prometheus),,prometheus) \
  $(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql) \
  $(if $(shell command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null),,pgbouncer))

test-deps:
	@need="$(TEST_DEPS_MISSING)"; if [ -n "$$need" ]; then \
	  command -v apt-get >/dev/null || { echo "make test needs: $$need (install them)"; exit 2; }; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	  echo "installing the test prerequisites: $$need"; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$need; \
	fi

test: lint test-deps
	$(PY) -m pytest

$(DATA)/meta.json: | venv
	$(MP2A) data digits --out $(DATA)

# The embedded default: DigitsDA -> MP2A adaptation to $(TARGET) -> ONNX export -> serve.
$(DEFAULT_RUN)/export/image_encoder.onnx: | venv $(DATA)/meta.json
	$(MP2A) adapt --data $(DATA) --target $(TARGET) --method mp2a --out $(DEFAULT_RUN) --quiet
	$(MP2A) export $(DEFAULT_RUN) --format onnx

serve: venv $(DEFAULT_RUN)/export/image_encoder.onnx
	@echo "mp2a: serving $(DEFAULT_RUN) on port $(PORT). Try:"
	@echo "  curl -F image=@$$(ls $(DATA)/$(TARGET)/three/*.png | head -1) http://127.0.0.1:$(PORT)/predict"
	$(MP2A) serve $(DEFAULT_RUN) --port $(PORT)

zeroshot-table: venv $(DATA)/meta.json
	@for d in printed handwritten textured street; do \
	  $(MP2A) adapt --data $(DATA) --target $$d --method zeroshot --out $(RUNS)/zeroshot-$$d \
	    --quiet > /dev/null || exit 1; \
	done
	$(PY) -m adapt.report zeroshot $(RUNS)/zeroshot-{printed,handwritten,textured,street}

clean:
	rm -rf $(RUNS) $(DATA) $(SHIFT)

$(SHIFT)/meta.json: | venv
	$(MP2A) data digits --out $(SHIFT) --domains $(SHIFT_DOMAINS)

# DigitsDA leave-one-domain-out + the shift styles: 6 methods x 6 targets x 3 seeds
results: venv $(SHIFT)/meta.json
	$(PY) -m adapt.results --data $(SHIFT) --runs $(RUNS)/results --docs docs
