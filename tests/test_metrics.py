"""Metrics against hand-computed cases and direct O(N^2) implementations."""

import math

import pytest
import torch

from msae_ext import metrics as M


def test_l0_both_conventions():
    z = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    assert M.l0_sparsity(z) == pytest.approx(5 / 8)  # fraction of zeros
    assert M.l0_active(z) == pytest.approx(1.5)  # mean active count


def test_fvu_evr_cos_hand_computed():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 2
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # squared error 1
    assert M.fvu(x, x_hat) == pytest.approx(0.5)
    assert M.evr(x, x_hat) == pytest.approx(0.5)
    assert M.cosine_similarity(x, x_hat) == pytest.approx((1 / math.sqrt(2) + 1) / 2)


def test_decoder_orthogonality_matches_pairwise_mean():
    assert M.decoder_orthogonality(torch.eye(3)) == pytest.approx(0.0)
    W = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    # cosines: (0,1) 1/sqrt2, (0,2) 0, (1,2) 1/sqrt2 -> mean sqrt2/3
    assert M.decoder_orthogonality(W) == pytest.approx(math.sqrt(2) / 3)
    W = torch.randn(50, 7)
    U = W / W.norm(dim=1, keepdim=True)
    G = U @ U.T
    naive = G[torch.tril(torch.ones(50, 50, dtype=torch.bool), -1)].mean()
    assert M.decoder_orthogonality(W) == pytest.approx(float(naive), abs=1e-6)


def test_dead_latents():
    assert M.dead_latents(torch.tensor([0, 3, 0, 1])) == 2


def hsic_unbiased_dense(K, L):
    m = K.shape[0]
    Kt, Lt = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    return ((Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((m - 1) * (m - 2)) - 2 * (Kt @ Lt).sum() / (m - 2)) / (
        m * (m - 3))


def cknna_dense(A, B, k):
    """Direct O(N^2) CKNNA with full kernel and mask matrices (Huh et al.'s formulation)."""
    n = A.shape[0]
    K, L = A @ A.T, B @ B.T

    def mask(G):
        Gh = G.clone().fill_diagonal_(-torch.inf)
        return torch.zeros(n, n, dtype=G.dtype).scatter_(1, Gh.topk(k, dim=1).indices, 1.0)

    def sim(K1, L1, Mk):
        return hsic_unbiased_dense(Mk * K1, Mk * L1)

    mK, mL = mask(K), mask(L)
    return float(sim(K, L, mK * mL) / torch.sqrt(sim(K, K, mK) * sim(L, L, mL)))


@pytest.mark.parametrize("n,k,block", [(60, 5, 7), (200, 10, 64), (33, 3, 1024)])
def test_cknna_matches_dense_implementation(n, k, block):
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, 8, generator=g, dtype=torch.float64)
    B = torch.relu(A @ torch.randn(8, 40, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 40, generator=g,
                                                                                                  dtype=torch.float64))
    assert M.cknna(A, B, k, block_rows=block) == pytest.approx(cknna_dense(A, B, k), rel=1e-9, abs=1e-12)


def test_cknna_identity_and_independence():
    A = torch.randn(150, 6, dtype=torch.float64)
    assert M.cknna(A, A, 10) == pytest.approx(1.0)
    assert abs(M.cknna(A, torch.randn(150, 6, dtype=torch.float64), 10)) < 0.3


def test_knn_excludes_self_and_is_blocked_consistently():
    A = torch.randn(40, 5, dtype=torch.float64)
    full = M.knn_indices(A, 4, block_rows=1000)
    assert not (full == torch.arange(40)[:, None]).any()
    assert torch.equal(full, M.knn_indices(A, 4, block_rows=3))


def test_progressive_recovery_and_topk_by_magnitude():
    z = torch.tensor([[0.5, -3.0, 2.0, 0.0]])
    assert torch.equal(M.keep_topk_by_magnitude(z, 2), torch.tensor([[0.0, -3.0, 2.0, 0.0]]))
    assert M.progressive_ks(6144) == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144]
    W = torch.randn(64, 8, dtype=torch.float64)
    zz = torch.rand(30, 64, dtype=torch.float64)
    x = zz @ W
    curve = M.progressive_recovery(x, zz, lambda q: q @ W, ks=[4, 16, 64])
    assert [p["k"] for p in curve] == [4, 16, 64]
    assert curve[-1]["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert curve[0]["fvu"] > curve[1]["fvu"] > curve[2]["fvu"]
    assert curve[0]["l0_active"] == 4


def test_probe_kl_and_agreement_hand_computed():
    lo = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    lr = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2
    assert M.probe_kl(lo, lr) == pytest.approx(expected)
    assert M.probe_kl(lo, lo) == pytest.approx(0.0)
    assert M.probe_agreement(lo, lr) == pytest.approx(0.5)  # row 0: argmax 0 vs 1
