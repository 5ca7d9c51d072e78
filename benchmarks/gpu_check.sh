#!/usr/bin/env bash
# The GPU checks, in one short run on a CUDA machine (never part of CI):
#   benchmarks/gpu_check.sh OUT_DIR [OFFICIAL_CHECKOUT] [DATA_DIR]
# 1. tests/test_cuda.py: our forms and model on CUDA against the CPU, bf16 within its bound, and the Triton kernels
#    of mlstm_kernels as the cell (needs: pip install mlstm_kernels);
# 2. benchmarks/throughput.py --device cuda: images/s and memory of the fast path, the plain reference path (which
#    makes the official code's number of operations: benchmarks/op_count.py), the fast path with the Triton
#    chunkwise kernel as its cell, and (with OFFICIAL_CHECKOUT, a checkout of NX-AI/vision-lstm) the official code;
# 3. with DATA_DIR (holding mnist/): one epoch of the MNIST recipe on CUDA, with our cell and with the Triton one.
# Every step runs even if one before it failed; the logs go to OUT_DIR.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [OFFICIAL_CHECKOUT] [DATA_DIR]}
official=${2:-}
data=${3:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton, mlstm_kernels; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'mlstm_kernels', getattr(mlstm_kernels, '__version__', '?'))"
} 2>&1 | tee "$out/env.txt"

python3 -m pytest -q -s -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
status=$((status | ${PIPESTATUS[0]}))

python3 benchmarks/throughput.py --device cuda --configs vil_tiny_cifar,recipe_cifar10 --paths fast,reference,kernels \
  ${official:+--official "$official"} --seconds 2 --skip-seqlen --output "$out" --tag gpu 2>&1 \
  | tee "$out/throughput.log"
status=$((status | ${PIPESTATUS[0]}))

if [ -n "$data" ]; then
  for cell in parallel kernels:chunkwise--triton_xl_chunk; do
    name=${cell##*-}
    start=$SECONDS
    python3 train.py --dataset mnist --model-arg "mlstm_mode=$cell" --device cuda --epochs 1 \
      --data-dir "$data" --no-download --output "/tmp/gpu-check-run-$name" --quiet 2>&1 | tee "$out/train-$name.log"
    status=$((status | ${PIPESTATUS[0]}))
    echo "wall $((SECONDS - start)) s" | tee -a "$out/train-$name.log"
  done
fi
exit $status
