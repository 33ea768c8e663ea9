"""The paper's metrics (section 4.1, appendices E and H) as pure functions: tensors in, numbers out.

Names are unambiguous about direction:
    l0_sparsity   the paper's "L0": mean fraction of *zero* latents (higher = sparser)
    l0_active     mean number of *active* latents (what the rest of the SAE world calls L0)
    fvu / evr     fraction of variance unexplained / explained-variance ratio = 1 - fvu
    cos_sim       mean cosine between inputs and reconstructions
    cknna         centered kernel nearest-neighbour alignment (Huh et al. 2024), k = 10
    decoder_orthogonality   mean cosine over distinct pairs of decoder directions (0 = orthogonal)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def l0_sparsity(z: torch.Tensor) -> float:
    """Mean fraction of zero entries per row (the paper's L0; higher is sparser)."""
    return float((z == 0).to(torch.float64).mean())


def l0_active(z: torch.Tensor) -> float:
    """Mean number of non-zero entries per row."""
    return float((z != 0).sum(dim=-1, dtype=torch.int32).to(torch.float64).mean())


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole set."""
    x, x_hat = _f64(x), _f64(x_hat)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())


def evr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return 1.0 - fvu(x, x_hat)


def cosine_similarity(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over rows of cos(x, x_hat)."""
    return float(torch.nn.functional.cosine_similarity(_f64(x), _f64(x_hat), dim=-1, eps=1e-12).mean())


def decoder_orthogonality(W_dec: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of decoder directions (rows of sae-lens's W_dec).

    Computed without the d_sae x d_sae Gram matrix: with unit rows u_i,
    sum_{i != j} <u_i, u_j> = ||sum_i u_i||^2 - n.
    """
    u = _f64(W_dec)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = u.shape[0]
    if n < 2:
        return 0.0
    return float((u.sum(dim=0).pow(2).sum() - n) / (n * (n - 1)))


def dead_latents(fire_counts: torch.Tensor) -> int:
    """Latents that never fired (counts of activations > 0 over an evaluation set)."""
    return int((fire_counts == 0).sum())


# --------------------------------------------------------------------------------------------
# CKNNA (appendix E)
# --------------------------------------------------------------------------------------------


def _similarities(feats: torch.Tensor, start: int, stop: int, scale: torch.Tensor | None,
                  col_block: int) -> torch.Tensor:
    """(stop - start, n) float64 inner products of rows [start, stop) with every row, self excluded
    (-inf), a block of columns at a time: no float64 copy of `feats` is made."""
    rows = feats[start:stop].to(torch.float64)
    if scale is not None:
        rows = rows * scale[start:stop, None]
    n = feats.shape[0]
    out = torch.empty(stop - start, n, dtype=torch.float64, device=feats.device)
    for c in range(0, n, col_block):
        cols = feats[c:c + col_block].to(torch.float64)
        if scale is not None:
            cols = cols * scale[c:c + col_block, None]
        out[:, c:c + col_block] = rows @ cols.T
    r = torch.arange(stop - start, device=feats.device)
    out[r, r + start] = -torch.inf
    return out


def knn_indices(feats: torch.Tensor, k: int, block_rows: int = 1024, col_block: int = 1024) -> torch.Tensor:
    """Indices of the k largest inner products of each row with the other rows (self excluded).

    Computed in row blocks, so memory is O(block_rows * n) rather than O(n^2).
    """
    n = feats.shape[0]
    if not 0 < k < n:
        raise ValueError(f"k must lie in [1, n-1] = [1, {n - 1}], got {k}")
    out = torch.empty(n, k, dtype=torch.long, device=feats.device)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        out[start:stop] = _similarities(feats, start, stop, None, col_block).topk(k, dim=1).indices
    return out


def _masked_unbiased_hsic(
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    k_vals: torch.Tensor,
    l_vals: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of K~ = M * K and L~ = M * L, M given as its nonzero pairs.

    HSIC = [tr(K~ L~) + sum(K~) sum(L~) / ((n-1)(n-2)) - 2 sum(K~ L~) / (n-2)] / (n (n-3)),
    with diagonals zero (self pairs are never in M). Every term needs only the pairs in M:
    tr(K~ L~) = sum_ij K~_ij L~_ji counts the pairs whose transpose is also in M, and
    sum(K~ L~) = sum_j colsum(K~)_j rowsum(L~)_j.
    """
    ids = pair_i * n + pair_j
    sorted_ids, order = ids.sort()
    transposed = pair_j * n + pair_i
    pos = torch.searchsorted(sorted_ids, transposed).clamp_max(len(sorted_ids) - 1)
    has_transpose = sorted_ids[pos] == transposed
    # value of L~ at the transposed position (L symmetric, so L~_ji = l_ij when (j, i) in M)
    l_transposed = torch.where(has_transpose, l_vals[order[pos]], torch.zeros_like(l_vals))
    trace_term = (k_vals * l_transposed).sum()
    colsum_k = torch.zeros(n, dtype=k_vals.dtype, device=k_vals.device).index_add_(0, pair_j, k_vals)
    rowsum_l = torch.zeros(n, dtype=l_vals.dtype, device=l_vals.device).index_add_(0, pair_i, l_vals)
    hsic = (
        trace_term
        + k_vals.sum() * l_vals.sum() / ((n - 1) * (n - 2))
        - 2 * (colsum_k * rowsum_l).sum() / (n - 2)
    )
    return hsic / (n * (n - 3))


def cknna(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    k: int = 10,
    *,
    normalize: bool = False,
    block_rows: int = 256,
    col_block: int = 1024,
) -> float:
    """CKNNA between two representations of the same n items (appendix E; Huh et al. 2024).

    Linear kernels K = A A^T, L = B B^T; alpha(i, j) = 1 when i != j and j is among the k nearest
    neighbours (largest inner product) of i in both spaces;
    CKNNA = Align(K, L) / sqrt(Align(K, K) Align(L, L)), Align being the unbiased HSIC of the
    masked kernels. Memory stays O(block_rows * n + (block_rows + col_block) * d + n * k), in float64:
    no copy of the features is made (at 10,000 rows and d = 24,576, about 0.3 GB above the inputs).
    `normalize` L2-normalises rows first.
    """
    if feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(f"row counts differ: {feats_a.shape[0]} vs {feats_b.shape[0]}")
    n = feats_a.shape[0]
    if n < 4:
        raise ValueError(f"CKNNA needs at least 4 rows, got {n}")
    if not 0 < k < n:
        raise ValueError(f"k must lie in [1, n-1] = [1, {n - 1}], got {k}")

    def inverse_norms(feats: torch.Tensor) -> torch.Tensor | None:
        if not normalize:
            return None
        return torch.cat([1 / feats[c:c + col_block].to(torch.float64).norm(dim=-1).clamp_min(1e-12)
                          for c in range(0, n, col_block)])

    scale_a, scale_b = inverse_norms(feats_a), inverse_norms(feats_b)
    # per row: its k nearest neighbours in each space, and the kernels K = A A^T, L = B B^T at those
    # pairs, read off one row block of each similarity matrix at a time
    knn_a = torch.empty(n, k, dtype=torch.long, device=feats_a.device)
    knn_b = torch.empty_like(knn_a)
    k_at_a, l_at_a, l_at_b = (torch.empty(n, k, dtype=torch.float64, device=feats_a.device) for _ in range(3))
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        sims_a = _similarities(feats_a, start, stop, scale_a, col_block)
        sims_b = _similarities(feats_b, start, stop, scale_b, col_block)
        k_at_a[start:stop], knn_a[start:stop] = sims_a.topk(k, dim=1)
        l_at_b[start:stop], knn_b[start:stop] = sims_b.topk(k, dim=1)
        l_at_a[start:stop] = sims_b.gather(1, knn_a[start:stop])
    rows = torch.arange(n, device=feats_a.device).repeat_interleave(k)
    ia, ja, ib, jb = rows, knn_a.reshape(-1), rows, knn_b.reshape(-1)

    # mutual mask: pairs in both kNN graphs
    ids_b = (ib * n + jb).sort().values
    ids_a = ia * n + ja
    pos = torch.searchsorted(ids_b, ids_a).clamp_max(len(ids_b) - 1)
    mutual = ids_b[pos] == ids_a

    k_aa, l_ab = k_at_a.reshape(-1), l_at_a.reshape(-1)
    align_ab = _masked_unbiased_hsic(ia[mutual], ja[mutual], k_aa[mutual], l_ab[mutual], n)
    align_aa = _masked_unbiased_hsic(ia, ja, k_aa, k_aa, n)
    l_bb = l_at_b.reshape(-1)
    align_bb = _masked_unbiased_hsic(ib, jb, l_bb, l_bb, n)
    denom = torch.sqrt(align_aa * align_bb)
    if not denom > 0:
        return float("nan")
    return float(align_ab / denom)


def cknna_subset(
    feats_a: torch.Tensor, feats_b: torch.Tensor, k: int = 10, n: int = 10000, seed: int = 0, **kw
) -> float:
    """CKNNA on one random subset of n rows (the paper's protocol: 10,000)."""
    total = feats_a.shape[0]
    if total > n:
        idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(total, n, replace=False)))
        feats_a, feats_b = feats_a[idx], feats_b[idx]
    return cknna(feats_a, feats_b, k, **kw)


# --------------------------------------------------------------------------------------------
# Progressive recovery (section 4.7) and linear probes (section 4.1)
# --------------------------------------------------------------------------------------------


def keep_topk_by_magnitude(z: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest-magnitude entries of each row."""
    if k >= z.shape[-1]:
        return z
    idx = z.abs().topk(k, dim=-1).indices
    return torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx))


def progressive_ks(d_sae: int, k_start: int = 16) -> list[int]:
    """16, 32, ... doubling while below d_sae, then d_sae."""
    ks, k = [], k_start
    while k < d_sae:
        ks.append(k)
        k *= 2
    return ks + [d_sae]


def progressive_recovery(
    x: torch.Tensor,
    z: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    ks: list[int] | None = None,
    *,
    with_cknna: bool = False,
    cknna_k: int = 10,
) -> list[dict[str, float]]:
    """FVU, cosine (and optionally CKNNA) when only the top-k activations by magnitude are kept.

    `decode` maps latents to the space of x (e.g. the SAE decoder followed by un-normalisation).
    """
    ks = ks or progressive_ks(z.shape[-1])
    curve = []
    for k in ks:
        zk = keep_topk_by_magnitude(z, k)
        x_hat = decode(zk)
        point = {"k": int(k), "fvu": fvu(x, x_hat), "cos_sim": cosine_similarity(x, x_hat),
                 "l0_active": l0_active(zk)}
        if with_cknna:
            point["cknna"] = cknna(x, zk, cknna_k)
        curve.append(point)
    return curve


def probe_kl(logits_orig: torch.Tensor, logits_recon: torch.Tensor) -> float:
    """Mean KL(p_orig || p_recon) of a probe's class distributions (tables scale this by 1e6)."""
    lp = torch.log_softmax(_f64(logits_orig), dim=-1)
    lq = torch.log_softmax(_f64(logits_recon), dim=-1)
    return float((lp.exp() * (lp - lq)).sum(dim=-1).mean())


def probe_agreement(logits_orig: torch.Tensor, logits_recon: torch.Tensor) -> float:
    """Fraction of rows whose argmax prediction is unchanged by reconstruction."""
    return float((logits_orig.argmax(-1) == logits_recon.argmax(-1)).to(torch.float64).mean())
