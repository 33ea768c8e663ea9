"""Classical dictionary baselines: each recovers planted data it should fit, its SAE's encode and
decode equal the scikit-learn model's own coding and reconstruction, and `msae train` fits it
into an SAE folder with the usual report that sae-lens loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import msae_ext.cli as msae_cli
from msae_ext.architectures import ARCHITECTURES
from msae_ext.architectures.classical import build_sae
from msae_ext.evaluate import REPORT_KEYS
from msae_ext.metrics import fvu

# scikit-learn's coordinate descent warns about its tolerance on these small problems; the tests
# check the answers themselves
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def method(name):
    return ARCHITECTURES[name].classical


def as_batches(x: np.ndarray, size: int = 200):
    return lambda epoch: (x[i : i + size] for i in range(0, len(x), size))


def sampler(x: np.ndarray):
    return lambda n: x[np.random.default_rng(0).choice(len(x), min(n, len(x)), replace=False)]


def fit_sae(name, x, d_sae, epochs=3, **options):
    m = method(name)
    cfg = m.training_config(d_in=x.shape[1], d_sae=d_sae, device="cpu", **options)
    return build_sae(m, cfg, m.fit(cfg, as_batches(x), sampler(x), epochs, 0))


def recon_fvu(sae, x):
    xt = torch.from_numpy(x).float()
    return fvu(xt, sae.decode(sae.encode(xt)))


def test_nmf_on_signed_data_through_the_sign_split():
    """Data that is a non-negative mix of 6 parts, then centred (signed, as CLIP rows are after the
    paper's preprocessing): 6 components reconstruct it; the codes equal scikit-learn's with H fixed."""
    from sklearn.decomposition import non_negative_factorization

    from msae_ext.architectures.classical.nmf import split_signs

    rng = np.random.default_rng(0)
    parts = rng.exponential(size=(6, 10))
    x = rng.exponential(size=(1500, 6)) * (rng.random((1500, 6)) < 0.4) @ parts
    x = x - x.mean(0)
    sae = fit_sae("nmf", x, 12, epochs=6)
    assert recon_fvu(sae, x) < 0.05
    z = sae.encode(torch.from_numpy(x[:50]).float()).double().numpy()
    assert (z >= 0).all()
    want, _, _ = non_negative_factorization(split_signs(x[:50]), H=sae.H.detach().double().numpy(), n_components=12,
                                            update_H=False, solver="cd", tol=1e-6, max_iter=500, l1_ratio=1.0)
    np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5)
    # decode folds the split reconstruction back: z (H+ - H-) = (z H)[:, :d] - (z H)[:, d:]
    split = z @ sae.H.detach().double().numpy()
    np.testing.assert_allclose(sae.decode(torch.from_numpy(z).float()).detach().double().numpy(), split[:, :10] - split[:, 10:],
                               rtol=1e-4, atol=1e-4)


def test_dictionary_learning_codes_are_the_models_transform():
    from sklearn.decomposition import MiniBatchDictionaryLearning

    rng = np.random.default_rng(1)
    atoms = rng.normal(size=(16, 12))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    x = (rng.exponential(size=(1200, 16)) * (rng.random((1200, 16)) < 0.15)) @ atoms
    sae = fit_sae("dictionary", x, 16, epochs=5, alpha=0.05)
    assert recon_fvu(sae, x) < 0.1
    model = MiniBatchDictionaryLearning(n_components=16, alpha=0.05, positive_code=True, fit_algorithm="cd",
                                        transform_algorithm="lasso_lars", transform_alpha=0.05, random_state=0)
    model.fit(x[:300])
    model.components_ = sae.W_dec.detach().double().numpy()  # the SAE's dictionary, the model's transform
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x[:40]).float()).double().numpy(), model.transform(x[:40]),
                               rtol=1e-4, atol=1e-5)


def test_ica_recovers_independent_sources():
    rng = np.random.default_rng(2)
    sources = rng.laplace(size=(3000, 5))
    mixing = rng.normal(size=(5, 5))
    x = sources @ mixing.T + 0.5
    sae = fit_sae("ica", x, 5, fit_rows=3000)
    z = sae.encode(torch.from_numpy(x).float()).double().numpy()
    corr = np.abs(np.corrcoef(z.T, sources.T)[:5, 5:])
    assert (corr.max(axis=1) > 0.97).all()  # each component is one source (up to sign and scale)
    assert recon_fvu(sae, x) < 1e-6  # square and invertible: exact
    with pytest.raises(ValueError, match="at most d_in=5 components"):
        method("ica").training_config(d_in=5, d_sae=6, device="meta")


def test_kmeans_one_hot_codes_assign_planted_clusters():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(8, 6)) * 10
    labels = rng.integers(0, 8, 1600)
    x = centres[labels] + rng.normal(size=(1600, 6)) * 0.1
    sae = fit_sae("kmeans", x, 8, epochs=3)
    z = sae.encode(torch.from_numpy(x).float()).numpy()
    assert (z.sum(1) == 1).all() and set(np.unique(z)) == {0.0, 1.0}
    assigned = z.argmax(1)
    # one latent per planted cluster: the assignment is a relabelling of the truth
    assert len({(a, b) for a, b in zip(assigned, labels)}) == 8
    assert recon_fvu(sae, x) < 1e-3


@pytest.mark.parametrize("arch,options", [("nmf", "alpha_W: 0.001"), ("dictionary", "alpha: 0.1"),
                                          ("ica", "d_sae: 16"), ("kmeans", "d_sae: 24")])
def test_msae_train_fits_a_loadable_sae_with_the_usual_report(tmp_path, embeddings, arch, options, capsys):
    from sae_lens import SAE

    train_path, eval_path, _ = embeddings
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"architecture: {arch}\n{options}\nepochs: 1\nbatch_size: 256\ntrain_data: {train_path}\n"
                   f"eval_data: {eval_path}\n" + ("" if "d_sae" in options else "d_sae: 32\n"))
    assert msae_cli.main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(REPORT_KEYS) <= set(report)  # the same keys as every SAE's report
    assert 0 <= report["fvu"] < 1
    sae = SAE.load_from_disk(tmp_path / "run")
    assert sae.cfg.architecture() == f"msae_{arch}"
    capsys.readouterr()
    # a finished fit is kept, and concept naming reads its decoder directions
    assert msae_cli.main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    from msae_ext.interpret import name_concepts
    from msae_ext.normalization import attach_stats, get_stats

    attach_stats(sae, "text", get_stats(sae, "image"))
    words = [f"w{i}" for i in range(40)]
    doc = name_concepts(sae, np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32) + 3, words)
    assert len(doc["neurons"]) == sae.cfg.d_sae


def test_classical_and_trained_sae_cannot_share_a_run(tmp_path, embeddings):
    from msae_ext import load_config, train_many

    train_path, _, _ = embeddings
    cfg = load_config(None, [f"train_data={train_path}", "d_sae=32", "epochs=1",
                             "saes=[{name: a, architecture: kmeans}, {name: b, architecture: topk, k: 4}]"])
    with pytest.raises(ValueError, match="cannot mix the classical baselines"):
        train_many(cfg, tmp_path / "x", progress=False)
