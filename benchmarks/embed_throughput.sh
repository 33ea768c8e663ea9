#!/usr/bin/env bash
# Throughput of `msae embed` for ViT-L/14 (random weights: the speed does not depend on them) on
# generated ImageNet-sized JPEGs and on captions. Run from the repository root on a GPU machine:
#     bash benchmarks/embed_throughput.sh [N_IMAGES] [WORKERS]
set -eu
export PYTHONUNBUFFERED=1
n=${1:-8192}; workers=${2:-$(( $(nproc) - 2 ))}; py=${PYTHON:-python3}
d=$(mktemp -d)
$py - "$d" "$n" <<'PY'
import sys, numpy as np
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from PIL import Image
root, n = Path(sys.argv[1]) / "imgs", int(sys.argv[2])
root.mkdir()
def make(i):  # smooth random images of ImageNet's typical size (500x375), JPEG quality 90
    g = np.random.default_rng(i)
    small = g.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(root / f"{i:07d}.jpg", quality=90)
with ProcessPoolExecutor() as ex:
    list(ex.map(make, range(n), chunksize=256))
words = "a photo of the cat dog car street sea tree man woman red blue small large on in with at night".split()
g = np.random.default_rng(0)
(Path(sys.argv[1]) / "caps.txt").write_text("\n".join(" ".join(g.choice(words, 12)) for _ in range(4 * n)) + "\n")
PY
du -sh "$d/imgs"
for m in image text; do
  spec=$([ $m = image ] && echo "folder:$d/imgs" || echo "text:$d/caps.txt")
  t=$SECONDS
  $py -m msae_ext.cli embed --model ViT-L-14 --pretrained none --modality $m --dataset "$spec" --out "$d/out_$m" \
    --batch-size 256 --num-workers "$workers" 2>&1 | tr '\r' '\n' | grep -E "item/s\]$|rows x" | tail -2
  echo "$m: wall $((SECONDS - t)) s including model build"
  du -sh "$d/out_$m"
done
rm -rf "$d"
