# The two entry points a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test test-slow setup clean

$(STAMP): pyproject.toml constraints.txt package.json package-lock.json
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: anything else pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[all,dev]"
	# onnxruntime-web for convert --target web, pinned by package-lock.json; without npm, a warning only
	if command -v npm >/dev/null 2>&1; then npm ci --ignore-scripts --no-audit --no-fund --loglevel=error; \
	else echo "warning: npm not found: convert --target web needs it (install Node.js and npm, then run npm ci here)" >&2; fi
	touch $(STAMP)

setup: $(STAMP)

# the InstaFlow recipe on the bundled digits, end to end (resumes if interrupted; see README)
demo: $(STAMP)
	$(BIN)/instaflow-edge demo -o runs/demo

demo-quick: $(STAMP)
	$(BIN)/instaflow-edge demo --quick -o runs/demo-quick

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) runs
