#!/usr/bin/env bash
# The prepared GPU check for the lent machine (one H100, no internet; its image has Python 3.12, torch 2.11 with
# CUDA 13, lightning 2.6.6, torchmetrics 1.9, tensorboard, scikit-learn, matplotlib, setuptools; no faiss,
# torch-fidelity, jsonargparse or diffusers). Whole check: about 5 minutes, each step under its own timeout,
# at most 8 minutes in all. Every step writes its output to OUTDIR (default $OUT, else runs/gpu_check).
#   0. install: the project from this tree (`pip install --no-deps --no-build-isolation --no-index`), after the
#      wheels carried in .whl/ if there are any;
#   1. environment: torch, CUDA device, bf16 screen rule, faiss (absent: its rows are skipped);
#   2. the exact search on CUDA, m = 10,000, n = 10^6, d = 1,024 (issue 24's target: under 10 s, bf16 screen
#      >= 2x the float32 path), uniform and near-tie-dense (saturated) data, each checked against float64;
#   3. the property tests of the search on CPU (every backend here), as a regression check of the image.
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [OUTDIR]
#   --dry-run: the same steps at smoke sizes on the CPU (CUDA-less torch), without installing, the tests only
#   collected: what tests/metrics/test_knn_gpu_check.py runs, so that the script cannot rot unseen.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
fi
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a timeout, output to OUTDIR/NAME.txt; a failure is reported
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if timeout "$limit" "$@" >"$out/$name.txt" 2>&1; then
        tail -n 25 "$out/$name.txt"
    else
        echo "step $name FAILED (exit $?): see $out/$name.txt"
        tail -n 40 "$out/$name.txt"
        failed=1
    fi
}
failed=0
if [[ $dry == 1 ]]; then
    device=cpu sizes=(--n 512 --m 40 --d 16 --repeats 1)
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    tests=(tests/metrics/test_knn_bounds.py --collect-only)
else
    device=cuda sizes=(--n 1000000 --m 10000 --d 1024 --repeats 3)
    tests=(tests/metrics/test_knn_bounds.py)
    if compgen -G ".whl/*.whl" >/dev/null; then
        step install_wheels 120 "$py" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
    fi
    step install 120 "$py" -m pip install -q --no-deps --no-build-isolation --no-index .
fi
step env 120 "$py" -c "
import torch
from lightning_memwatch.metrics.knn import available_backends, has_fast_bfloat16
from lightning_memwatch.metrics.knn.backends import import_faiss
cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if cuda else 'none')
faiss = import_faiss()
print('faiss', faiss.__version__ if faiss else 'absent (its rows are skipped)')
device = 'cuda' if cuda else 'cpu'
print('backends on', device, available_backends(device), 'bf16 screen by auto:', has_fast_bfloat16(device))
"
step knn_uniform 200 "$py" benchmarks/knn_gpu.py --device "$device" --data uniform "${sizes[@]}"
step knn_saturated 200 "$py" benchmarks/knn_gpu.py --device "$device" --data saturated "${sizes[@]}"
step knn_property_tests 120 "$py" -m pytest -q -p no:randomly -p no:cacheprovider "${tests[@]}"
echo "outputs in $out"
exit $failed
