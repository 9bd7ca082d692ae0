#!/usr/bin/env bash
# The assignment benchmark on CUDA (fp16 cost on tensor cores via couple(precision="auto")).
# Usage (repository root, on the GPU machine):  bash benchmarks/run_gpu.sh OUTDIR
# Writes OUTDIR/assignment_cuda.json (rewritten after every case, so a timeout keeps what ran),
# OUTDIR/assignment_cuda.txt (log + table), OUTDIR/env.txt (card, packages, what was skipped).
# About 3-5 minutes on an H100; hard limit 330 s.
set -u
OUT=${1:?usage: bash benchmarks/run_gpu.sh OUTDIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  for m in numpy scipy lapjv lap torchcfm lightning; do
    if "$PY" -c "import $m" 2>/dev/null; then echo "have $m"; else echo "skipped: $m not installed"; fi
  done
} 2>&1 | tee "$OUT/env.txt"
if ! "$PY" -c "import scipy" 2>/dev/null; then
  echo "scipy is required (the fallback solver and the reference implementations); install it first." | tee -a "$OUT/env.txt"
  exit 2
fi
timeout 330 "$PY" benchmarks/assignment.py --device cuda --out "$OUT/assignment_cuda.json" "${@:2}" 2>&1 \
  | tee "$OUT/assignment_cuda.txt"
echo "exit ${PIPESTATUS[0]} (124 = hit the 330 s limit; the JSON holds the cases that finished)" | tee -a "$OUT/assignment_cuda.txt"
