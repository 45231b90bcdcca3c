#!/usr/bin/env bash
# The prepared GPU check (one short run, ~5-8 min on one H100): the checks issues 2, 3 and 6 ask for on CUDA.
#   1. environment: CUDA device, faiss GPU count (faiss-gpu comes from the `gpu` extra);
#   2. benchmarks/knn.py on CUDA: faiss-gpu / torch / torch-bf16 backends vs float64 brute force, GFLOP/s table,
#      the screen on a low-rank set, and the sharded index (2 gloo processes, CPU);
#   3. benchmarks/overhead.py at the paper's scale (W=32, 2,048 DDIM-100 samples, n=32,768);
#   4. a reduced CelebA-like run: the paper's U-Net (W=32) on digits upscaled to 32x32, MemWatch with f_mem
#      (faiss-gpu) and a pixel-space Frechet distance, 2,000 steps.
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (outputs and logs under OUTDIR, default $OUT or runs/gpu_check)
set -euo pipefail
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
py="${PYTHON:-python}"
"$py" - <<'PY' | tee "$out/env.txt"
import faiss, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("faiss", faiss.__version__, "GPUs seen by faiss:", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
PY
"$py" benchmarks/knn.py --device cuda --repeats 3 | tee "$out/knn_cuda.txt"   # includes torch-bf16 (screen)
# issue 15: the split-bf16 screen on CUDA on structured data, and the sharded index (gloo, 2 processes)
"$py" benchmarks/knn.py --device cuda --data lowrank --m 1000 --repeats 2 | tee "$out/knn_cuda_lowrank.txt"
"$py" benchmarks/knn.py --shards 1 2 --m 1000 --backend torch-bf16 --repeats 2 | tee "$out/knn_shards.txt"
"$py" benchmarks/overhead.py --width 32 --num-samples 2048 --sample-batch-size 1024 --sample-steps 100 \
    --train-size 32768 --batch-size 512 --steps 200 --every 100 --fid conv | tee "$out/overhead_cuda.txt"
"$py" -m lightning_memwatch.apps.cli fit --config recipes/quick_unet_digits.yaml \
    --trainer.accelerator gpu --trainer.max_steps 2000 --trainer.default_root_dir "$out/unet_digits32" \
    --data.init_args.image_size 32 --data.init_args.n 256 \
    --model.init_args.denoiser.init_args.base_width 32 --model.init_args.sample_autocast true \
    2>&1 | tee "$out/unet_digits32.txt" | grep -E "MemWatch|tau_|Error" || true
