# Quick start:  make demo   (whole DELG pipeline on the embedded photos)
#               make test   (the test suite)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp

.PHONY: demo test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) setup.py pyproject.toml $(wildcard protos/*.proto)
	$(PY) -m pip install -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m delg_tf.demo --output_dir=demo_output

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/extract.py
	$(PY) bench/rerank.py

clean:
	rm -rf build dist *.egg-info demo_output delg_tf/protos/*_pb2.py
