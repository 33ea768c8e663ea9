"""Seed stability at the paper's widths: time of the Hungarian matching of two dictionaries of
d_sae unit directions in d_in = 768 dimensions, dense (exact) against the sparse-candidate method
`msae stability` uses above 8,192 latents, and whether the two agree where both run.

    python benchmarks/stability_wide.py                        # 8192 (both methods) and 24576 (sparse)
    python benchmarks/stability_wide.py --widths 8192 --dense-max 8192

The second dictionary is the first, permuted, plus noise of relative size --noise: the situation of
two seeds of one config (related directions, some matched above 0.7, some not).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from msae_ext.stability import match


def pair(d_sae: int, d_in: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=1)
    perm = torch.randperm(d_sae, generator=g)
    b = a[perm] + noise * torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5
    return a, torch.nn.functional.normalize(b, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[8192, 24576])
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--dense-max", type=int, default=8192, help="widest width also matched densely")
    args = p.parse_args()
    print("| d_sae | method | seconds | mean matched cosine | frac > 0.7 | equal to dense |")
    print("|---:|---|---:|---:|---:|---|")
    for n in args.widths:
        a, b = pair(n, args.d_in, args.noise)
        dense = None
        if n <= args.dense_max:
            t = time.perf_counter()
            dense, _ = match(a, b)
            print(f"| {n} | dense | {time.perf_counter() - t:.1f} | {dense.mean():.4f} | {(dense > 0.7).mean():.3f} | |",
                  flush=True)
        t = time.perf_counter()
        sparse, method = match(a, b, exact_max=0)
        same = "–" if dense is None else str(abs(sparse.sum() - dense.sum()) <= 1e-9 * abs(dense.sum()))
        print(f"| {n} | {method} | {time.perf_counter() - t:.1f} | {sparse.mean():.4f} | {(sparse > 0.7).mean():.3f} "
              f"| {same} |", flush=True)
    print(f"\npeak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
