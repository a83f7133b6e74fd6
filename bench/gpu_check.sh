#!/usr/bin/env bash
# The GPU checks of docs/energy.md in one run, under 8 minutes on one GPU:
#   0. bench/nvml_counter_period.py: how often the NVML energy counter moves (idle, load; 2 x 5 s);
#   1. bench/nvml_check.py: GreenRoute's NVML meter against nvidia-smi's power.draw (30 s load);
#   2. bench/gpu_attribution_check.py: concurrent matmul "requests" of two sizes, attributed
#      by GreenRoute's Device and Track, against each size's solo joules (4 x 15 s phases).
# Usage: bench/gpu_check.sh [GPU index, default 0]   (from the repository root, after
#        pip install -e '.[gpu]' torch). Exit status: 0 both passed, 1 a check failed,
#        2 no GPU / torch / NVML here (each script says which).
set -u
gpu="${1:-0}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
status=0
echo "== nvml_counter_period (GPU $gpu)"
timeout 60 "$python" bench/nvml_counter_period.py --gpu "$gpu" --seconds 5
echo "== nvml_check (GPU $gpu)"
timeout 180 "$python" bench/nvml_check.py --gpu "$gpu" --seconds 30 || status=$?
if [ "$status" -eq 2 ]; then exit 2; fi
echo "== gpu_attribution_check (GPU $gpu)"
timeout 240 "$python" bench/gpu_attribution_check.py --gpu "$gpu" --seconds 15 || {
    code=$?; [ "$status" -eq 0 ] && status=$code; }
exit "$status"
