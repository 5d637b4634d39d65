# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
REQS := requirements.txt requirements-dev.txt constraints.txt
STAMP := $(VENV)/.requirements-stamp

.PHONY: venv test test-slow demo clean-demo

# Installs the requirements under the pinned constraints; re-installs only when one of the three
# files differs from what the venv was built from (the stamp is their concatenation).
venv:
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@if ! cat $(REQS) | cmp -s - $(STAMP); then \
		$(VPY) -m pip install --upgrade pip && \
		$(VPY) -m pip install -r requirements.txt -r requirements-dev.txt -c constraints.txt && \
		cat $(REQS) > $(STAMP); \
	else echo "venv up to date ($(VENV))"; fi

test: venv
	$(VENV)/bin/ruff check .
	$(VPY) -m pytest

# Real-size architectures (SDXL base, SD3.5 medium; random weights): their time, memory and disk in docs/testing.md.
test-slow: venv
	$(VPY) -m pytest -m slow

demo: venv
	$(VPY) examples/digits/run_demo.py

clean-demo:
	rm -rf outputs/digits
