# kdcache pipeline. `make distill` on a fresh clone sets up .venv and runs data -> teachers -> cache -> distill -> eval.
# CONFIG picks the run (default: the embedded demo); outputs go to runs/<config name>/.
CONFIG ?= configs/demo.yaml
NAME := $(shell sed -n 's/^name: *//p' $(CONFIG) | head -n1)
RUN := runs/$(NAME)
VENV ?= .venv
PY := $(VENV)/bin/python
KD := $(VENV)/bin/kdcache
# torch goes in first, so that pip never pulls a multi-GB CUDA build where none is wanted; override TORCH_SPEC at will.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
# torchrun for several processes: `make distill LAUNCH="torchrun --nproc_per_node 4"`
LAUNCH ?=
RUNPY = $(if $(LAUNCH),$(LAUNCH) -m kdcache.cli,$(KD))

.PHONY: setup data teachers cache distill eval study test bench clean
.DELETE_ON_ERROR:

setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

data: $(RUN)/.data.done
$(RUN)/.data.done: $(CONFIG) $(VENV)/.installed
	$(KD) data --config $(CONFIG)
	touch $@

teachers: $(RUN)/.teachers.done
$(RUN)/.teachers.done: $(RUN)/.data.done
	$(RUNPY) teachers --config $(CONFIG) --resume
	touch $@

cache: $(RUN)/.cache.done
$(RUN)/.cache.done: $(RUN)/.teachers.done
	$(RUNPY) precompute --config $(CONFIG)
	touch $@

distill: $(RUN)/.distill.done eval
$(RUN)/.distill.done: $(RUN)/.cache.done
	$(RUNPY) distill --config $(CONFIG) --resume --baseline
	touch $@

eval: $(RUN)/.distill.done
	$(KD) eval --config $(CONFIG)

# Several students from one cache, each study variant over several seeds: runs/<name>/study/study.md
study: $(RUN)/.cache.done
	$(RUNPY) study --config $(CONFIG)

# Two pytest workers of one torch thread each: the 2-core machine is busy on both cores (5.4 min vs 8.8 in one).
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

# `make bench SECTION=vocab`: that section alone, spliced into docs/benchmarks.md
bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py --out docs/benchmarks.md $(if $(SECTION),--section $(SECTION))

clean:
	rm -rf $(RUN)
