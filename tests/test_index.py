"""The latent index of a concept browser against the plain computation over the whole set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from msae_ext.architectures import PaperSAE
from msae_ext.architectures.msae import MSAEConfig
from msae_ext.interpret.index import BIN_EDGES, LatentIndex, build_index
from msae_ext.interpret.space import ConceptSpace
from msae_ext.normalization import ModalityStats, attach_stats
from msae_ext.store import open_embeddings


@pytest.fixture
def indexed(tmp_path):
    torch.manual_seed(0)
    d_in, d_sae = 12, 48
    sae = PaperSAE(MSAEConfig(d_in=d_in, d_sae=d_sae, k_list=[4, 8, 16, 32, 48]))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae))
        sae.W_dec.copy_(torch.randn(d_sae, d_in))
        sae.b_enc.copy_(torch.randn(d_sae) - 1.0)
    attach_stats(sae, "image", ModalityStats(mean=torch.zeros(d_in), scale=1.0, n_rows=1, source="test"))
    x = np.random.default_rng(0).normal(size=(700, d_in)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    space = ConceptSpace(sae, "image")
    out = build_index(space, open_embeddings(str(tmp_path / "x.npy")), tmp_path / "index", n_top=5,
                      nesting_rows=300, batch_size=128, progress=False)
    z = space.encode(torch.from_numpy(x)).float()
    return sae, x, z, out


def test_index_equals_the_plain_computation(indexed):
    sae, x, z, out = indexed
    labels = [f"concept{j}" for j in range(48)]
    index = LatentIndex(out, sae, labels)
    a = index.arrays
    assert torch.equal(a["fires"], (z > 0).sum(0))
    torch.testing.assert_close(a["max"], z.max(0).values)
    torch.testing.assert_close(a["sum"], z.double().sum(0))
    top_v, top_r = z.topk(5, dim=0)
    torch.testing.assert_close(a["top_values"], top_v)
    assert torch.equal(a["top_rows"], top_r)  # ties are absent in continuous random data
    bins = np.digitize(z.numpy(), BIN_EDGES[1:-1], right=True)
    for j in range(48):
        active = z[:, j].numpy() > 0
        want = np.bincount(bins[active, j], minlength=len(BIN_EDGES) - 1)
        assert (a["hist"][j].numpy() == want).all()
        for b, row in enumerate(a["band_rows"][j].tolist()):  # each band's sample lies in that band
            assert (row >= 0) == (want[b] > 0)
            if row >= 0:
                assert BIN_EDGES[b] < z[row, j] <= BIN_EDGES[b + 1]
    # nesting: rank of each active entry in its row over the first 300 rows, bucketed by level
    levels = [4, 8, 16, 32, 48]
    first = z[:300]
    ranks = (first.unsqueeze(2) < first.unsqueeze(1)).sum(2)  # how many entries of the row are larger
    counts = np.zeros((48, len(levels)), dtype=np.int64)
    for r, j in zip(*np.nonzero(first.numpy() > 0)):
        counts[j, np.searchsorted(levels, ranks[r, j].item() + 1)] += 1
    assert (a["level_counts"].numpy() == counts).all()
    for j in range(48):
        if counts[j].sum():
            median_level = levels[int(np.argmax(np.cumsum(counts[j]) >= (counts[j].sum() + 1) // 2))]
            assert int(a["nesting_level"][j]) == median_level


def test_pages_and_listing(indexed):
    sae, x, z, out = indexed
    labels = [f"concept{j}" for j in range(48)]
    index = LatentIndex(out, sae, labels)
    freq = (z > 0).float().mean(0).numpy()
    listing = index.listing(sort="frequency", limit=48)
    assert [e["index"] for e in listing][:5] == list(np.argsort(-freq, kind="stable")[:5])
    assert sorted(e["index"] for e in index.listing("concept4", limit=48)) == [4] + list(range(40, 48))
    assert [e["index"] for e in index.listing("#7")] == [7]
    page = index.page(3)
    assert page["label"] == "concept3" and page["top"][0]["row"] == int(z[:, 3].argmax())
    dec = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)
    cos = dec @ dec[3]
    cos[3] = -2
    assert [n["index"] for n in page["decoder_neighbours"]] == cos.topk(8).indices.tolist()
    co = index.cofiring(3, torch.from_numpy(x[[t["row"] for t in page["top"]]]))
    assert {"coarser", "finer"} == set(co) and all(e["index"] != 3 for side in co.values() for e in side)
    with pytest.raises(ValueError, match="latent 99 does not exist"):
        index.page(99)
    meta = json.loads((out / "index.json").read_text())
    assert meta["n_rows"] == 700 and meta["levels"] == [4, 8, 16, 32, 48]
