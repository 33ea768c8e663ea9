"""CKNNA's memory and time at the paper's widths: 10,000 rows (the paper's subset), CLIP-sized
inputs (d_in 768) against SAE activations of width d_sae, as `msae eval` computes it.

    python benchmarks/cknna_memory.py                       # d_sae 6144 and 24576
    python benchmarks/cknna_memory.py --widths 24576 --rows 10000

Each width runs in a child process of its own; the peak is the child's peak resident memory above
what it held once the inputs were made (float32: 10,000 x 24,576 activations are 0.92 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def child(rows: int, d_in: int, d_sae: int) -> None:
    import torch

    from msae_ext.metrics import cknna

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=g)
    z = torch.randn(rows, d_sae, generator=g).sub_(1.0).relu_()  # about a sixth active; in place: no transient copy
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    value = cknna(x, z, 10)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"cknna": value, "seconds": seconds, "peak_above_inputs": peak - before,
                      "inputs": (x.numel() + z.numel()) * 4}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--widths", default="6144,24576", help="comma list of d_sae")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.rows, args.d_in, args.child)
    print(f"# {args.rows} rows, d_in {args.d_in}, k 10, {os.cpu_count()} CPUs")
    print("| d_sae | inputs GiB | peak above inputs GiB | seconds | CKNNA |\n|---:|---:|---:|---:|---:|")
    for width in (int(w) for w in args.widths.split(",")):
        res = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--d-in", str(args.d_in),
                              "--child", str(width)], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {width} | {r['inputs'] / 2**30:.2f} | {r['peak_above_inputs'] / 2**30:.2f} | "
              f"{r['seconds']:.1f} | {r['cknna']:.4f} |")


if __name__ == "__main__":
    main()
