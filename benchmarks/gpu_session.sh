#!/usr/bin/env bash
# The GPU checks of a lent device session, in one run (about 8 minutes on one H200):
#   bash benchmarks/gpu_session.sh            # on the device; results land in benchmarks/results/
#   DEVICE=cpu PRECISION=32 SMALL=1 bash benchmarks/gpu_session.sh   # the same commands, tiny, to try them here
# 1. the fixed cost per client and rounds of 1, 8 and 32 clients sharing 1024 samples (bf16 autocast);
# 2. the 10-client, 5-per-round, 20-round federation at CREMA-D shapes, FedAvg and FedCMI.
set -euo pipefail
cd "$(dirname "$0")"
DEVICE="${DEVICE:-cuda}"
PRECISION="${PRECISION:-bf16-mixed}"  # bf16 autocast on a CPU is far slower than float32: try it with PRECISION=32
if [ "${SMALL:-0}" = 1 ]; then
  THROUGHPUT=(--samples 16 --batch-size 8 --clients 1 2 --fixed-cost 2 --algorithms fedavg)
  FEDERATION=(--samples 40 --test 8 --rounds 2 --batch-size 8 --algorithms fedavg)
  OUT="${OUT:-$(mktemp -d)}"
  THROUGHPUT+=(--out "$OUT/throughput.json"); FEDERATION+=(--out "$OUT/federation.json")
else
  THROUGHPUT=(--samples 1024 --batch-size 64 --clients 1 8 32 --fixed-cost 8)
  FEDERATION=()
fi
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python train_throughput.py --device "$DEVICE" --precision "$PRECISION" "${THROUGHPUT[@]}"
python cremad_federation.py --device "$DEVICE" --precision "$PRECISION" "${FEDERATION[@]}"
