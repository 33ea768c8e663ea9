#!/usr/bin/env bash
# GPU checks for the training paths: the CUDA-only tests, the step benchmark in float32, bf16 and
# bf16 + compile at both paper shapes and two densities, where a step's device time goes
# (profile_step.py: top kernels, launches and host-device syncs a step), and end-to-end `msae
# train` runs on CUDA (device-resident data, several SAEs, autocast, compile, torchrun with NCCL).
# Run from the repository root on a CUDA machine:
#     bash benchmarks/gpu_check.sh [part]      # part: tests | bench | profile | train | all (default)
# Writes logs to $OUT (default ./gpu_out).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
part=${1:-all}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
rows=${ROWS:-262144}
timed() { local t0=$SECONDS; "$@"; echo "wall $((SECONDS - t0)) s"; }

if [[ $part == tests || $part == all ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, sae_lens, open_clip, msae_ext; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  $py -m pytest -q -p no:cacheprovider -rs tests/ 2>&1 | tee "$OUT/pytest.log" | tail -15
fi
if [[ $part == bench || $part == all ]]; then
  for flags in "" "--bf16" "--bf16 --compile"; do
    for active in 0.5 0.2; do
      $py benchmarks/train_step.py --device cuda --shapes 768:6144,512:16384 --repeats 20 --warmup 3 \
        --active $active $flags 2>&1
    done
  done | tee "$OUT/bench.log"
fi
if [[ $part == profile || $part == all ]]; then
  for m in msae msae_reference topk_k64; do
    for bf in "" "--bf16"; do
      $py benchmarks/profile_step.py --device cuda --method $m $bf --steps 5 --top 20 \
        --trace "$OUT/trace_${m}${bf:+_bf16}.json"
    done
  done 2>&1 | tee "$OUT/profile.log"
fi
if [[ $part == train || $part == all ]]; then
  data=$(mktemp -d)
  $py -c "
import numpy as np, sys
g = np.random.default_rng(0)
np.save(sys.argv[1] + '/train.npy', g.standard_normal((int(sys.argv[2]), 768), dtype=np.float32) + 0.5)
np.save(sys.argv[1] + '/eval.npy', g.standard_normal((8192, 768), dtype=np.float32) + 0.5)" "$data" "$rows"
  common="--set train_data=$data/train.npy --set eval_data=$data/eval.npy --set device=$device --set epochs=2 --set eval_every=0 --set eval_rows=4096 --no-progress"
  for extra in "" "--set autocast=true" "--set autocast=true --set compile=true"; do
    echo "== msae train (msae 768->6144, batch 4096) $extra"
    timed $py -m msae_ext.cli train $common $extra --out "$data/run_$RANDOM" 2>&1 | tail -4
  done
  echo "== msae train, 3 SAEs per pass (msae rw, msae uw, topk)"
  timed $py -m msae_ext.cli train $common --set 'saes=[{name: rw}, {name: uw, weighting: uw}, {name: topk, architecture: topk}]' --out "$data/multi" 2>&1 | tail -4
  echo "== torchrun --nproc_per_node 1 (NCCL)"
  timed torchrun --standalone --no-python --nproc_per_node 1 $py -m msae_ext.cli train $common --out "$data/ddp" 2>&1 | tail -4
  rm -rf "$data"
fi
