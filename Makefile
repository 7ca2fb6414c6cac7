PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: test demo study bench clean

$(VENV_STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(VENV_STAMP)

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

# The whole pipeline on a tiny LLaMA it builds itself, FFT against HFT (demo/run.py; README
# "The demo").
demo: $(VENV_STAMP)
	$(PY) demo/run.py

# Every method (FFT, HFT, the ablations, replay) x seeds 0-2 on the demo's world and base, and the
# pilot; runs/study/study.json and study.md (demo/study.py; README "The study"). About 40 minutes
# on 2 cores, more when the base is not cached yet; a rerun reuses every finished chain.
study: $(VENV_STAMP)
	$(PY) demo/run.py --study

# FFT against HFT (and HFT with frozen tensors replicated): step time, memory, bytes (README
# "Benchmark").
bench: $(VENV_STAMP)
	mkdir -p runs && $(PY) bench.py --modes fft,hft,hft-rep --out runs/bench.json

clean:
	rm -rf runs .pytest_cache
