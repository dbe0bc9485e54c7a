# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

# torch and torchvision come from the registry together (their CUDA build also runs on CPU).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch torchvision
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

# The main job, offline: iDLG on the DLG sigmoid LeNet against a bundled real photograph.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/lightning-gi fit --config configs/idlg_lenet.yaml

# The fast suite (CI runs exactly this target through .ci/run).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# Slow checks (minutes to tens of minutes on CPU): the demos reach the quality they claim, a FedAvg label
# assignment search recovers the batch, ImageNet-size configs run on stand-in weights, the large fuzz profile.
test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow

# Speed and quality benchmarks (python -m benchmarks.<name>; add --smoke for a seconds-long check): one JSON
# envelope each in benchmarks/results/ (CPU: tens of minutes each).
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.loop_overhead
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.speed
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.dlg_vs_idlg
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.objectives_bench wdlg
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.objectives_bench inverting
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.objectives_bench speed
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.attack_vs_defense
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.restarts_throughput
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.stepwise_labels
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.stepwise_inversion
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.gias_bench

clean:
	rm -rf runs lightning_logs .pytest_cache
