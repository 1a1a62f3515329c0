#!/usr/bin/env bash
# One GPU run of moco_tf's performance numbers, on a machine with one NVIDIA GPU (H100/H200 class).
#
#   bash benchmarks/gpu.sh            # installs into .venv-gpu, then measures; about 8 minutes
#   GPU_BENCH_PYTHON=python3 bash benchmarks/gpu.sh   # use an interpreter that already has
#                                                     # tensorflow[and-cuda], torch and requirements.txt
#
# Prints, in order:
#   1. ResNet-50 224 MoCo v2 images/s at the largest float32 batch that fits, in float32, mixed
#      bfloat16 and mixed float16 (loss scaling), each with and without XLA, and bf16 + XLA with the
#      colour stage in the step; peak GPU memory of each (benchmarks/gpu_bench.py).
#   2. The PyTorch reference step (the official builder.py step) on the same GPU, float32, at the
#      same batch, against moco_tf's float32 step (benchmarks/step_time.py --torch).
#   3. Host pipeline pairs/s with all cores at 224: the whole pipeline (--color_stage=host) and the
#      host's share under --color_stage=device (benchmarks/augment_throughput.py).
# Fails at once, with one line, where no NVIDIA GPU is visible. Every part has a time limit, so
# the whole run ends within about 8 minutes even if one part hangs.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU on this machine (nvidia-smi finds none); run it where one is" >&2
    exit 2
fi
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "CPU cores: $(nproc), load average: $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD 2>/dev/null)"

PY=${GPU_BENCH_PYTHON:-}
if [ -z "$PY" ]; then
    python3 -m venv .venv-gpu || exit 1
    # TF's CUDA wheels and torch's: torch's CUDA libraries live in torch's own nvidia-* packages.
    .venv-gpu/bin/pip install -q -r requirements.txt "tensorflow[and-cuda]==2.21.0" torch==2.14.1 || exit 1
    PY=.venv-gpu/bin/python
    echo "installed in $(( $(date +%s) - start )) s"
fi
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1

echo "== 1. moco_tf ResNet-50 224 MoCo v2 step, one GPU"
out=$(timeout 330 "$PY" benchmarks/gpu_bench.py --budget_s 240 --steps 10 | tee /dev/stderr)
batch=$(echo "$out" | sed -n 's/^BATCH=//p')
batch=${batch:-128}

echo "== 2. PyTorch reference step vs moco_tf, float32, batch $batch"
TF_FORCE_GPU_ALLOW_GROWTH=true timeout 120 "$PY" benchmarks/step_time.py --arch=resnet50 --image_size=224 \
    --mlp --bn_groups=1 --queue_size=65536 --batch_size="$batch" --steps=5 --rounds=2 --torch \
    || echo "step_time.py --torch did not finish within 120 s"

echo "== 3. host pipeline, $(nproc) workers, pairs/s"
timeout 90 "$PY" benchmarks/augment_throughput.py --seconds 10 --rounds 1 --num_large 1000 --num_small 0 \
    || echo "augment_throughput.py did not finish within 90 s"
echo "gpu.sh: done in $(( $(date +%s) - start )) s"
