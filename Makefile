# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.txt

.PHONY: venv test test-slow demo clean-demo

# Re-installs only when requirements.txt differs from what the venv was built from.
venv:
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@if ! cmp -s requirements.txt $(STAMP); then \
		$(VPY) -m pip install --upgrade pip && \
		$(VPY) -m pip install -r requirements.txt && \
		cp requirements.txt $(STAMP); \
	else echo "venv up to date ($(VENV))"; fi

test: venv
	$(VPY) -m pytest

# Real-size architectures (SDXL base with random weights): ~15 GB of RAM, tens of minutes on a CPU.
test-slow: venv
	$(VPY) -m pytest -m slow

demo: venv
	$(VPY) examples/digits/run_demo.py

clean-demo:
	rm -rf outputs/digits
