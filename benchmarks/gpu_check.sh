#!/usr/bin/env bash
# GPU checks for the training paths: the CUDA-only tests, the step benchmark in float32, bf16 and
# bf16 + compile, and end-to-end `msae train` runs on CUDA (device-resident data, several SAEs,
# autocast, torchrun with NCCL), and where a step's device time goes (profile_step.py: phases, top
# kernels, launches and host-device syncs a step). Run from the repository root on a CUDA machine:
#     bash benchmarks/gpu_check.sh [part]      # part: tests | fp32 | bf16 | profile | train | all (default) | sweep
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
if [[ $part == fp32 || $part == all ]]; then
  $py benchmarks/train_step.py --device cuda --repeats 20 --warmup 3 2>&1 | tee "$OUT/bench_fp32.log"
fi
if [[ $part == sweep ]]; then  # where dense rank segments start to pay off (DENSE_DECODE_FRACTION)
  for bf in "" "--bf16"; do
    for f in 0 0.03125 0.0625 0.125 0.25 inf; do
      $py benchmarks/train_step.py --device cuda --repeats 20 --warmup 3 --methods msae_fused $bf \
        --dense-fraction $f 2>&1 | grep -E "^(# |msae_fused|## )"
    done
  done 2>&1 | tee "$OUT/sweep.log"
  $py - <<'PY' 2>&1 | tee "$OUT/select.log"
import torch, time
for d_sae, K in ((6144, 2048), (16384, 4096)):
    pre = torch.randn(4096, d_sae, device="cuda")
    # the selection: the top-k, and the stable sort that ranks rows with ties at a boundary (every
    # row under bf16 at equal encoder biases)
    for name, fn in (("topk", lambda: pre.topk(K, dim=-1, sorted=True)), ("sort", lambda: pre.sort(dim=-1, descending=True)),
                     ("stable sort", lambda: pre.sort(dim=-1, descending=True, stable=True))):
        for _ in range(3): fn()
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(20): fn()
        torch.cuda.synchronize(); print(f"{name} 4096x{d_sae} K={K}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms")
PY
fi
if [[ $part == bf16 || $part == all ]]; then
  $py benchmarks/train_step.py --device cuda --bf16 --repeats 20 --warmup 3 2>&1 | tee "$OUT/bench_bf16.log"
  $py benchmarks/train_step.py --device cuda --bf16 --compile --repeats 20 --warmup 3 --shapes 768:6144 \
    --methods msae_fused,msae_1level,topk_k64 2>&1 | tee "$OUT/bench_bf16_compile.log"
fi
if [[ $part == profile || $part == all ]]; then
  for m in msae_fused msae_naive topk_k64; do
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
    echo "== msae train (msae 768->6144, batch 4096, 128 steps) $extra"
    timed $py -m msae_ext.cli train $common $extra --out "$data/run_$RANDOM" 2>&1 | tail -4
  done
  echo "== msae train, 3 SAEs per pass (msae rw, msae uw, topk)"
  timed $py -m msae_ext.cli train $common --set 'saes=[{name: rw}, {name: uw, weighting: uw}, {name: topk, architecture: topk}]' --out "$data/multi" 2>&1 | tail -4
  echo "== torchrun --nproc_per_node 1 (NCCL)"
  timed torchrun --standalone --no-python --nproc_per_node 1 $py -m msae_ext.cli train $common --out "$data/ddp" 2>&1 | tail -4
  rm -rf "$data"
fi
