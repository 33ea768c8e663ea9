"""Similarity search at a million 768-d embeddings on one machine.

Writes N random float32 rows (N x d x 4 bytes: 3.1 GB for 1M x 768) to an .npy, then runs
`msae_ext.interpret.search_clip` (memory-mapped, streamed in blocks) and, on the first
--sae-rows rows, `search_sae` with an expansion-8 SAE. Prints throughput and the process's peak
resident memory as a ratio of the matrix size: bounded memory means a ratio well below 1.

    python benchmarks/search_scale.py --rows 1000000 --dim 768 --dir /tmp/msae_search_bench
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def anon_rss_bytes() -> int:
    """Private (anonymous) resident memory. Pages of the memory-mapped index are file-backed page
    cache the kernel can drop, so they are not counted; ru_maxrss would count them."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    """Max of anon_rss_bytes() sampled every 20 ms while running."""

    def __enter__(self):
        import threading

        self.peak, self._stop = anon_rss_bytes(), False

        def loop():
            while not self._stop:
                self.peak = max(self.peak, anon_rss_bytes())
                time.sleep(0.02)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, anon_rss_bytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--sae-rows", type=int, default=50_000, help="rows searched in SAE space (one SAE pass each)")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--dir", default=None, help="where to write the matrix (default: a temporary folder)")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    from msae_ext.architectures import PaperSAE
    from msae_ext.architectures.msae import MSAEConfig
    from msae_ext.interpret import ConceptSpace, open_rows, search_clip, search_sae
    from msae_ext.normalization import ModalityStats, attach_stats

    folder = Path(args.dir or tempfile.mkdtemp(prefix="msae_search_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"index_{args.rows}x{args.dim}.npy"
    if not path.exists():
        t = time.perf_counter()
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.rows, args.dim))
        rng = np.random.default_rng(0)
        for s in range(0, args.rows, 100_000):
            e = min(args.rows, s + 100_000)
            mm[s:e] = rng.standard_normal((e - s, args.dim), dtype=np.float32)
        mm.flush()
        del mm
        print(f"wrote {path} in {time.perf_counter() - t:.1f} s")
    matrix_bytes = args.rows * args.dim * 4
    rows = open_rows(path)
    queries = torch.from_numpy(np.asarray(rows.source.read(0, args.queries), dtype=np.float32)).clone()
    before = anon_rss_bytes()
    with PeakSampler() as peak:
        t = time.perf_counter()
        nb = search_clip(rows, queries, k=args.k, progress=False)
        dt = time.perf_counter() - t
    assert nb.rows[:, 0].tolist() == list(range(args.queries)), "each query must find itself first"
    print(f"CLIP-space search: {args.rows:,} rows x {args.dim}, {args.queries} queries, k={args.k}: {dt:.2f} s "
          f"({args.rows / dt:,.0f} rows/s)")
    print(f"private memory: {before / 2**20:.0f} MiB before, peak {peak.peak / 2**20:.0f} MiB during the search; "
          f"the index is {matrix_bytes / 2**20:.0f} MiB; (peak - before) / index = {(peak.peak - before) / matrix_bytes:.3f}")

    if args.sae_rows:
        d_sae = args.dim * args.expansion
        sae = PaperSAE(MSAEConfig(d_in=args.dim, d_sae=d_sae, k_list=[d_sae]))
        attach_stats(sae, "image", ModalityStats(mean=torch.zeros(args.dim), scale=1.0, n_rows=1, source="bench"))
        space = ConceptSpace(sae, "image")
        sub = open_rows(path)
        sub.source.n_rows = min(args.sae_rows, args.rows)
        before = anon_rss_bytes()
        with PeakSampler() as peak:
            t = time.perf_counter()
            search_sae(space, sub, space.encode(queries), k=args.k, progress=False)
            dt = time.perf_counter() - t
        print(f"SAE-space search (d_sae={d_sae}, Manhattan): {sub.n_rows:,} rows in {dt:.2f} s "
              f"({sub.n_rows / dt:,.0f} rows/s; a 1M-row index would take ~{args.rows / (sub.n_rows / dt) / 60:.1f} min)")
        print(f"private memory during the SAE search: {before / 2**20:.0f} MiB before, peak {peak.peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
