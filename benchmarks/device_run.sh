#!/usr/bin/env bash
# The one prepared script for a lent GPU (H100/H200): Triton kernels tested on the GPU, the W4A4 benchmark, then
# time-budgeted training of the small synthetic model (variants side by side on the one GPU), each exported as a
# float16 model folder and packed with its log for the trip back.
#   OUT=/tmp/out TOTAL_S=560 bash benchmarks/device_run.sh
# Training gets what is left of TOTAL_S after the kernel checks (less 100 s for rendering the pools and exporting),
# or TRAIN_MINUTES if set. Variants: "name|extra quantvggt-train arguments", separated by ';' in VARIANTS.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
START=$(date +%s)
OUT=${OUT:-/tmp/device-out}
TOTAL_S=${TOTAL_S:-560}
KERNEL_CHECKS=${KERNEL_CHECKS:-1}
VARIANTS=${VARIANTS:-"main|--init-from quantvggt/assets/vggt-tiny-synthetic --lr 3e-4 --batch-size 32 --pool-scenes 3000 --pool-refresh-every 4 --workers 12"}
mkdir -p "$OUT" runs
if [ "${MODE:-train}" = bench ]; then  # issue #14/#15: kernel tests on the GPU, then whole-model timings, no training
  { nvidia-smi --query-gpu=name,memory.total --format=csv
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_prep.py tests/kernels/test_triton_w4mma.py tests/kernels/test_triton_w4a4.py tests/kernels/test_triton_attention.py
    timeout $(( TOTAL_S - ($(date +%s) - START) - 10 )) python3 benchmarks/gpu_e2e.py --out "$OUT/e2e" --budget-s $(( TOTAL_S - ($(date +%s) - START) - 90 ))
  } 2>&1 | tee "$OUT/bench.log"
  exit 0
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  if [ "$KERNEL_CHECKS" = 1 ]; then
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_w4a4.py
    timeout 180 python3 benchmarks/gpu_w4a4.py
  fi
} 2>&1 | tee "$OUT/kernels.log"

TRAIN_MINUTES=${TRAIN_MINUTES:-$(python3 -c "print(max(0.5, round(($TOTAL_S - ($(date +%s) - $START) - 100) / 60, 2)))")}
echo "training for $TRAIN_MINUTES minutes" | tee -a "$OUT/kernels.log"
IFS=';' read -ra specs <<< "$VARIANTS"
pids=()
for spec in "${specs[@]}"; do
  name=${spec%%|*}; args=${spec#*|}
  # shellcheck disable=SC2086
  (timeout $(( ${TRAIN_MINUTES%.*} * 60 + 150 )) python3 -m quantvggt.cli train --out "runs/gpu-$name" --device "${DEVICE:-cuda}" \
     --max-minutes "$TRAIN_MINUTES" --schedule-by-time --export "runs/gpu-$name-export" $args > "runs/gpu-$name.log" 2>&1) &
  pids+=($!)
done
wait "${pids[@]}"
for spec in "${specs[@]}"; do
  name=${spec%%|*}
  cp "runs/gpu-$name/log.jsonl" "runs/gpu-$name-export/" 2>/dev/null
  cp "runs/gpu-$name/loss.png" "runs/gpu-$name-export/" 2>/dev/null
  cp "runs/gpu-$name.log" "runs/gpu-$name-export/train.log" 2>/dev/null || cp "runs/gpu-$name.log" "$OUT/"
  tail -n 3 "runs/gpu-$name.log"
  tar -czf "$OUT/gpu-$name.tar.gz" -C runs "gpu-$name-export" 2>/dev/null
done
ls -la "$OUT"
