"""The concept browser's latent index at the paper's largest width: build time and peak memory of
one pass over N embeddings with a d_sae-latent SAE, then the latency of the pages `msae serve`
answers (the Browser's JSON, and over HTTP).

    python benchmarks/index_scale.py                           # 1,000,000 rows, d_sae 24,576 (long)
    python benchmarks/index_scale.py --rows 100000 --d-sae 6144

Random data and a random SAE (biased so that about --active of the latents fire per row, as a
trained MSAE does under ReLU-only inference) are enough for timing. The embeddings are written to
a memory-mapped .npy in --workdir first (not timed).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from msae_ext.architectures import PaperSAE
from msae_ext.architectures.msae import MSAEConfig
from msae_ext.browse import Browser, make_server
from msae_ext.interpret.index import LatentIndex, build_index
from msae_ext.interpret.rows import open_rows
from msae_ext.interpret.space import ConceptSpace
from msae_ext.normalization import ModalityStats, attach_stats
from msae_ext.store import open_embeddings


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--active", type=float, default=0.15, help="fraction of latents active per row")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="msae_index_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "x.npy"
    if not data.exists():
        m = np.lib.format.open_memmap(data, mode="w+", dtype=np.float32, shape=(args.rows, args.d_in))
        rng = np.random.default_rng(0)
        for s in range(0, args.rows, 65536):
            m[s : s + 65536] = rng.standard_normal((min(65536, args.rows - s), args.d_in), dtype=np.float32)
        m.flush()
        del m
    torch.manual_seed(0)
    sae = PaperSAE(MSAEConfig(d_in=args.d_in, d_sae=args.d_sae))
    with torch.no_grad():
        dec = torch.nn.functional.normalize(torch.randn(args.d_sae, args.d_in), dim=-1)
        sae.W_dec.copy_(dec)
        sae.W_enc.copy_(dec.T)
        # unit inputs' projections are N(0, 1): a bias at the (1 - active) quantile leaves `active` of them on
        sae.b_enc.fill_(-float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - args.active))))
    attach_stats(sae, "image", ModalityStats(mean=torch.zeros(args.d_in), scale=1.0, n_rows=1, source="random"))
    space = ConceptSpace(sae, "image")
    source = open_embeddings(str(data))
    base = peak_gib()
    t = time.perf_counter()
    out = build_index(space, source, work / "index", batch_size=args.batch_size)
    build_s = time.perf_counter() - t
    build_peak = peak_gib()
    t = time.perf_counter()
    labels = [f"word{j}" for j in range(args.d_sae)]
    index = LatentIndex(out, sae, labels)
    open_ms = (time.perf_counter() - t) * 1e3
    # the pages as `msae serve` answers them: the Browser's JSON, then over HTTP from its server
    browser = Browser(space, open_rows(str(data)), index)
    rng = np.random.default_rng(1)
    page_ms = []
    for j in rng.integers(0, args.d_sae, 100):
        t = time.perf_counter()
        json.dumps(browser.latent(int(j)))
        page_ms.append((time.perf_counter() - t) * 1e3)
    list_ms = {}
    for sort in ("frequency", "max", "nesting"):
        t = time.perf_counter()
        json.dumps(browser.latents(sort=sort))
        list_ms[sort] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    browser.latents("word12")
    search_ms = (time.perf_counter() - t) * 1e3
    server = make_server(browser, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/"
    http_ms = []
    for j in rng.integers(0, args.d_sae, 30):
        t = time.perf_counter()
        with urllib.request.urlopen(f"{url}latent/{int(j)}") as r:
            r.read()
        http_ms.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    with urllib.request.urlopen(f"{url}latents") as r:
        n_bytes = len(r.read())
    http_list_ms = (time.perf_counter() - t) * 1e3
    server.shutdown()
    print(f"rows {args.rows:,}, d_in {args.d_in}, d_sae {args.d_sae:,}, about {args.active:.0%} active, "
          f"batch {args.batch_size}")
    print(f"| build (one pass) | {build_s:.0f} s | peak resident memory {build_peak:.2f} GiB "
          f"({build_peak - base:+.2f} GiB over the process before the build) |")
    print(f"| open the index | {open_ms:.0f} ms |")
    print(f"| latent page (statistics, decoder neighbours, co-firing on its top rows), as JSON, 100 latents | "
          f"median {statistics.median(page_ms):.0f} ms, max {max(page_ms):.0f} ms |")
    print(f"| the same over HTTP (msae serve), 30 latents | median {statistics.median(http_ms):.0f} ms, "
          f"max {max(http_ms):.0f} ms |")
    print("| the whole latent list as JSON | " + ", ".join(f"by {k} {v:.0f} ms" for k, v in list_ms.items())
          + f"; over HTTP {http_list_ms:.0f} ms ({n_bytes / 2**20:.1f} MiB); name search {search_ms:.0f} ms |")

if __name__ == "__main__":
    main()
