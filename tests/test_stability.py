"""Seed stability (appendix H): Hungarian-matched directions, the sparse method against the dense
one, chance level, and the CLI through Table 18 on seeds trained in one data pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import msae_ext.cli as msae_cli
from msae_ext.architectures import PaperSAE
from msae_ext.architectures.msae import MSAEConfig
from msae_ext.stability import expected_chance_max, match, pair_stability, stability


def random_sae(d_in: int, d_sae: int, seed: int) -> PaperSAE:
    torch.manual_seed(seed)
    sae = PaperSAE(MSAEConfig(d_in=d_in, d_sae=d_sae, k_list=[d_sae // 4, d_sae]))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    return sae


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_an_sae_is_stable_with_itself_and_a_permutation_of_its_latents():
    sae = random_sae(16, 96, 0)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    permuted = random_sae(16, 96, 5)
    with torch.no_grad():
        permuted.W_dec.copy_(sae.W_dec[perm] * 3.0)  # scale does not matter: directions are unit-normalised
        permuted.W_enc.copy_(sae.W_enc[:, perm])
    for other in (sae, permuted):
        s = pair_stability(sae, other)
        for kind in ("decoder", "encoder"):
            assert s[f"{kind}_mean_cos"] == pytest.approx(1.0, abs=1e-6)
            assert s[f"{kind}_frac_above_0.7"] == 1.0
    different = pair_stability(sae, random_sae(16, 96, 2))
    assert different["decoder_mean_cos"] < 0.9 and different["decoder_frac_above_0.7"] < 1.0


def test_unrelated_dictionaries_score_at_chance():
    """The mean matched cosine of two independent random dictionaries is below what each latent could
    get with its best partner alone (E[max of n cosines], each N(0, 1/d)), and close to it."""
    for n, d in ((256, 64), (512, 32)):
        cos, method = match(unit(n, d, 0), unit(n, d, 1))
        bound = expected_chance_max(n, d)
        assert method == "exact" and 0.85 * bound < cos.mean() < bound, (n, d, cos.mean(), bound)


@pytest.mark.parametrize("related", [True, False])
def test_sparse_matching_equals_the_exact_assignment(related):
    a = unit(1536, 64, 0)
    b = torch.nn.functional.normalize(a[torch.randperm(1536)] + 0.15 * torch.randn(1536, 64), dim=1) if related \
        else unit(1536, 64, 1)
    exact, m1 = match(a, b)
    sparse, m2 = match(a, b, exact_max=100)
    assert m1 == "exact" and m2.startswith("sparse")
    assert sparse.sum() == pytest.approx(exact.sum(), rel=1e-12)  # the same optimum
    # rectangular: every latent of the narrower dictionary is matched
    narrow, _ = match(a[:700], b, exact_max=100)
    assert len(narrow) == 700 and narrow.sum() == pytest.approx(match(a[:700], b)[0].sum(), rel=1e-12)


def test_group_statistics_and_mismatched_inputs():
    saes = {f"s{i}": random_sae(16, 64, i) for i in range(3)}
    doc = stability(saes)
    assert [(p["a"], p["b"]) for p in doc["pairs"]] == [("s0", "s1"), ("s0", "s2"), ("s1", "s2")]
    values = [p["encoder_mean_cos"] for p in doc["pairs"]]
    assert doc["mean"]["encoder_mean_cos"] == pytest.approx(np.mean(values))
    assert doc["std"]["encoder_mean_cos"] == pytest.approx(np.std(values, ddof=1))
    with pytest.raises(ValueError, match="at least two"):
        stability({"s0": saes["s0"]})
    with pytest.raises(ValueError, match="d_in 16 and 8"):
        pair_stability(saes["s0"], random_sae(8, 64, 0))


def test_seeds_in_one_pass_stability_and_table18(tmp_path, embeddings, capsys):
    """Three seeds of one config trained in one data pass, `msae stability`, then `msae report
    --stability` prints Table 18 from the seeds' eval.json and the stability report."""
    train_path, eval_path, _ = embeddings
    cfg = tmp_path / "seeds.yaml"
    cfg.write_text(f"architecture: topk\nk: 4\nd_sae: 64\nepochs: 1\nbatch_size: 64\ntrain_data: {train_path}\n"
                   f"eval_data: {eval_path}\nsaes:\n- {{name: s0, seed: 0}}\n- {{name: s1, seed: 1}}\n"
                   "- {name: s2, seed: 2}\n")
    assert msae_cli.main(["train", str(cfg), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    runs = [str(tmp_path / "runs" / f"s{i}") for i in range(3)]
    out = tmp_path / "stab.json"
    assert msae_cli.main(["stability", *runs, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["pairs"]) == 3 and doc["pairs"][0]["decoder_method"] == "exact"
    assert 0 < doc["mean"]["decoder_mean_cos"] < 1  # different seeds: not identical, not unrelated
    capsys.readouterr()
    assert msae_cli.main(["report", "--stability", str(out), "--out", str(tmp_path / "rep")]) == 0
    table = capsys.readouterr().out
    reports = [json.loads((tmp_path / "runs" / f"s{i}" / "eval.json").read_text()) for i in range(3)]
    l0 = np.mean([r["l0_sparsity"] for r in reports])
    assert f"| stab | 3 | {l0:.3f} ± " in table
    assert f"{doc['mean']['decoder_mean_cos']:.3f}/{doc['mean']['encoder_mean_cos']:.3f}" in table
    assert (tmp_path / "rep" / "table18.md").read_text().strip() == table.strip()
    assert msae_cli.main(["stability", runs[0], "--out", str(out)]) == 2
    assert "at least two" in capsys.readouterr().err
