#!/usr/bin/env bash
# Issue 17's GPU suite: one prepared script, under 8 minutes on one H200, JSON out.
#
# First, host syncs inside the step (case sync_free_step: Inverting Gradients with the DivergenceGuard under
# torch.cuda.set_sync_debug_mode("warn"); bar 0 per step). Then ms/iteration and peak memory, each case against a
# plain PyTorch loop in the same run (alternating pairs):
#   Inverting Gradients ResNet-18 224 batch 1 and 8 (eager and, with compile, compiled), the stepwise recipe
#   ResNet-34 224 batch 8, R=8 restarts vectorised vs sequential vs auto, GIAS StyleGAN2 256 and 512 (random
#   weights). Output: benchmarks/results/speed_gpu.json (with --smoke: speed_smoke.json in the temp directory
#   lightning_gi_bench_smoke/, or --out PATH.json / --results-dir DIR).
#
#   bash benchmarks/gpu_suite.sh            # on a GPU machine (about 5-7 minutes incl. one cold compile)
#   bash benchmarks/gpu_suite.sh --smoke    # tiny sizes on the CPU, seconds: checks the script end to end
#   extra arguments are passed to python -m benchmarks.speed (e.g. --pairs 3 --cases ig_resnet18_224_b8)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
SMOKE=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--smoke" ]; then SMOKE=1; else ARGS+=("$a"); fi
done
if [ "$SMOKE" = 1 ]; then
  exec "$PY" -m benchmarks.speed --suite gpu --smoke --device cpu --pairs 1 ${ARGS[@]+"${ARGS[@]}"}
fi
# TORCHINDUCTOR cache on disk: a second run of the suite starts compiled steps in seconds
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
exec timeout 470 "$PY" -m benchmarks.speed --suite gpu --device cuda --pairs 3 --scale 1.0 --compile ${ARGS[@]+"${ARGS[@]}"}
