"""The fused MSAE loss's partial levels on CPU: the compiled select and segment kernels, one run.

    python benchmarks/segment_kernels.py                   # batch 1024, 768 -> 6144, active 0.2 and 0.5
    python benchmarks/segment_kernels.py --batch 4096 --rounds 5

For each active fraction (b_enc shifted as in train_step.py, from the paper's initialisation):
  * each layout of the largest partial level and the full level (`nested_topk.LAYOUT`: "segments",
    level K from its rank segment and the full level by GEMM; "tail", level K = the full level
    minus its tail; "gathered", the full level = level K plus its tail, no GEMM), and the one
    "auto" picks: the pieces gathered and the entries a row (the positive ones the kernels read,
    per `ends`);
  * milliseconds of the select and of each kernel pass (decode, activation gradient, decoder
    gradient), and each pass's multiply-adds per second (entries x d_in) against the full level's
    GEMM z @ W_dec on the same data;
  * the fused loss's forward + backward (no optimizer) in each layout;
  * the trainer's per-latent firing counts of the activations: torch's `(acts > 0).sum(0)` against
    the compiled `count_positive_per_feature`;
  * the gathered layout's segments with the chain of level reconstructions and errors over them
    (forward + backward): `GatheredSegments` followed by per-level tensor ops, against
    `GatheredChain`, which folds the chain into the kernels' passes.
Every timing is the minimum over `--repeats` calls, and the settings are interleaved over
`--rounds`; ratios are medians of within-round ratios (this VM's speed drifts between minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from msae_ext.architectures import cpu_kernels, nested_topk, resolve_k_list
from msae_ext.architectures.base import batch_mean_error, reconstruction_loss
from msae_ext.architectures.nested_topk import (
    GatheredChain,
    GatheredSegments,
    gathered_run,
    nested_selection,
    nested_topk_loss_fused,
    piece_ranges,
    selection_bounds,
)

LAYOUTS = ("segments", "tail", "gathered")


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def case(batch: int, d_in: int, d_sae: int, active: float):
    """The paper's initialisation (W_enc = W_dec^T, unit decoder rows) with b_enc shifted so that
    `active` of the pre-activations are positive, as benchmarks/train_step.py does."""
    torch.manual_seed(0)
    W = F.normalize(torch.randn(d_sae, d_in), dim=-1)
    x = torch.randn(batch, d_in)
    pre = x @ W.T
    if active < 0.5:
        pre -= float(torch.quantile(pre[:256].flatten(), 1 - active))
    return x, pre, W


@contextmanager
def forced_layout(mode: str):
    saved, nested_topk.LAYOUT = nested_topk.LAYOUT, mode
    try:
        yield
    finally:
        nested_topk.LAYOUT = saved


def selection(pre: torch.Tensor, k_list: list[int], mode: str):
    """The fused loss's selection on CPU in float32 for LAYOUT `mode`."""
    with forced_layout(mode):
        return nested_selection(pre, k_list, tail_if_narrower_than=float("inf"),
                                gemm_entries=nested_topk.GATHER_FULL_FRACTION * pre.shape[1])


def layout(pre: torch.Tensor, k_list: list[int], mode: str):
    """The fused loss's single gathered run on CPU: (idx, bounds, ends, selection)."""
    sel = selection(pre, k_list, mode)
    idx, bounds, ends = gathered_run(sel, piece_ranges(sel))
    return idx.contiguous(), bounds, ends, sel


def kernel_times(kernels, pre, W, run, repeats) -> dict[str, float]:
    """`run`: one `layout`."""
    z = pre.relu()
    idx, bounds, ends, sel = run
    H = torch.randn(z.shape[0], len(bounds) - 1, W.shape[1])
    dz, dW = torch.zeros_like(z), torch.zeros_like(W)
    select_bounds = selection_bounds(sel.partial, sel.tail_end)
    return {
        "select": best_ms(lambda: kernels.nested_select(pre, select_bounds), repeats),
        "decode": best_ms(lambda: kernels.segments_forward(z, W, idx, bounds, ends), repeats),
        "dz": best_ms(lambda: kernels.segments_backward(z, W, idx, bounds, H, dz, None, ends), repeats),
        "dW": best_ms(lambda: kernels.segments_backward(z, W, idx, bounds, H, None, dW, ends), repeats),
        "gemm": best_ms(lambda: z @ W, repeats),
        "entries": float(ends.float().mean()),
    }


def loss_ms(x, pre, W, k_list, mode, repeats) -> float:
    pre = pre.clone().requires_grad_()
    W = W.clone().requires_grad_()
    b_dec = torch.zeros(W.shape[1], requires_grad=True)
    alphas = [1.0] * len(k_list)

    def step():
        loss, _, _ = nested_topk_loss_fused(x, pre, W, b_dec, k_list, alphas)
        loss.backward()

    with forced_layout(mode):
        return best_ms(step, repeats)


def chain_ms(x, pre, W, run, repeats) -> dict[str, float]:
    """The gathered run `run` (one `layout`) and the levels' chain over it, forward + backward:
    `GatheredSegments` and then a (B, d_in) op per level, as the fused loss runs where the chain is
    not one gathered run, against `GatheredChain` (the chain folded into the kernels' passes)."""
    idx, bounds, ends, _ = run
    z0, W0, base0 = pre.relu(), W, torch.zeros(W.shape[1])

    def leaves():
        return z0.clone().requires_grad_(), W0.clone().requires_grad_(), base0.clone().requires_grad_()

    def ops():
        z, W, base = leaves()
        _, Y = GatheredSegments.apply(z, W, idx, bounds, False, ends)
        recon, losses = base, []
        for piece in Y.unbind(1):
            recon = recon + piece
            losses.append(reconstruction_loss(recon, x, "mse"))
        sum(losses).backward()

    def folded():
        z, W, base = leaves()
        _, _, errors = GatheredChain.apply(z, W, idx, bounds, False, ends, base, x)
        batch_mean_error(errors, x, "mse").sum().backward()

    clone = best_ms(leaves, repeats)  # both time the clones of their leaves: taken off
    return {"ops": best_ms(ops, repeats) - clone, "kernel": best_ms(folded, repeats) - clone}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--shape", default="768:6144", help="DIN:DSAE")
    p.add_argument("--active", default="0.2,0.5", help="comma list of fractions of positive pre-activations")
    p.add_argument("--repeats", type=int, default=5, help="calls per timing (the minimum is kept)")
    p.add_argument("--rounds", type=int, default=3, help="layouts interleaved this many times")
    args = p.parse_args(argv)
    kernels = cpu_kernels.segment_kernels()
    if kernels is None:
        sys.exit("the compiled CPU segment kernels are off or did not build: nothing to time "
                 f"({cpu_kernels.ENV}, a C++ compiler and ninja)")
    d_in, d_sae = (int(v) for v in args.shape.split(":"))
    k_list = resolve_k_list(d_sae, None, 64)
    print(f"# cpu, torch {torch.__version__}, threads {torch.get_num_threads()}; batch {args.batch}, "
          f"{d_in} -> {d_sae}, k-list {k_list}; min of {args.repeats} calls, {args.rounds} interleaved rounds")
    for active in (float(a) for a in args.active.split(",")):
        x, pre, W = case(args.batch, d_in, d_sae, active)
        n_pos = (pre > 0).sum(-1).float()
        print(f"\n## active {float((pre > 0).float().mean()):.3f}: positives a row {n_pos.mean():.0f} "
              f"(max {n_pos.max():.0f})")
        runs = {t: layout(pre, k_list, t) for t in LAYOUTS}
        auto = selection(pre, k_list, "auto")
        rounds = [{t: (kernel_times(kernels, pre, W, runs[t], args.repeats),
                       loss_ms(x, pre, W, k_list, t, args.repeats)) for t in LAYOUTS}
                  for _ in range(args.rounds)]
        gemm_rate = args.batch * d_sae * d_in / statistics.median(r[t][0]["gemm"] for r in rounds for t in r)
        print(f"{'layout':<10}{'pieces':<58}{'entries':>8}{'select':>8}{'decode':>8}{'dz':>8}{'dW':>8}"
              f"{'loss f+b':>10}   pass throughput / GEMM's (decode, dz, dW)")
        for t in LAYOUTS:
            sel = runs[t][3]
            med = {key: statistics.median(r[t][0][key] for r in rounds)
                   for key in ("select", "decode", "dz", "dW", "entries")}
            loss = statistics.median(r[t][1] for r in rounds)
            macs = args.batch * med["entries"] * d_in
            rates = " ".join(f"{macs / med[key] / gemm_rate:.2f}" for key in ("decode", "dz", "dW"))
            pieces = " ".join(f"{a}:{b}" for a, b in piece_ranges(sel))
            print(f"{t:<10}{pieces:<58}{med['entries']:>8.0f}{med['select']:>8.1f}{med['decode']:>8.1f}"
                  f"{med['dz']:>8.1f}{med['dW']:>8.1f}{loss:>10.1f}   {rates}")
        gemm_ms = statistics.median(r[t][0]["gemm"] for r in rounds for t in r)
        picked = "gathered" if auto.full_gathered else ("tail" if auto.tail_end else "segments")
        gains = ", ".join(f"{t} {statistics.median(r['segments'][1] / r[t][1] for r in rounds):.2f}"
                          for t in LAYOUTS[1:])
        print(f"GEMM z @ W_dec: {gemm_ms:.1f} ms, {gemm_rate / 1e6:.1f} G multiply-adds/s; "
              f"loss f+b, segments / layout: {gains}; auto picks {picked}")
        acts = pre.relu()
        fired = [(best_ms(lambda: (acts > 0).sum(0, dtype=torch.int32), args.repeats),
                  best_ms(lambda: kernels.count_positive_per_feature(acts), args.repeats)) for _ in range(args.rounds)]
        print(f"trainer's firing counts of the activations: (acts > 0).sum(0) "
              f"{statistics.median(t for t, _ in fired):.1f} ms, count_positive_per_feature "
              f"{statistics.median(k for _, k in fired):.1f} ms")
    run = layout(pre, k_list, "gathered")
    chains = [chain_ms(x, pre, W, run, args.repeats) for _ in range(args.rounds)]
    ops, kernel = (statistics.median(c[key] for c in chains) for key in ("ops", "kernel"))
    print(f"\nsegments and level chain, gathered layout, {len(run[1]) - 1} pieces, forward + backward: "
          f"GatheredSegments + per-level ops {ops:.1f} ms, GatheredChain {kernel:.1f} ms, "
          f"ratio {statistics.median(c['ops'] / c['kernel'] for c in chains):.2f}")


if __name__ == "__main__":
    main()
