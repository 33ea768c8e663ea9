"""Embedding store: every reader, clear errors, streaming shuffle, per-modality statistics."""

import json
import math

import numpy as np
import pytest
import torch

from msae_ext.normalization import ModalityStats, attach_stats, compute_stats, get_stats
from msae_ext.store import BatchStream, EmbeddingDataError, check_dimension, open_embeddings, read_all


def data(n=300, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) + 2.0


def test_npy_float32_and_float16_memory_mapped(tmp_path):
    x = data()
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "h.npy", x.astype(np.float16))
    src = open_embeddings(tmp_path / "a.npy")
    assert (src.n_rows, src.d_in) == (300, 6)
    assert isinstance(src._array, np.memmap)
    assert np.array_equal(src.read(10, 20), x[10:20])
    h = open_embeddings(str(tmp_path / "h.npy"))
    assert h.read(0, 5).dtype == np.float32
    assert np.array_equal(h.read(0, 300), x.astype(np.float16).astype(np.float32))


def test_safetensors_with_and_without_key(tmp_path):
    from safetensors.numpy import save_file

    x = data()
    save_file({"emb": x}, tmp_path / "one.safetensors")
    save_file({"image": x, "text": x[:10]}, tmp_path / "two.safetensors")
    assert np.array_equal(open_embeddings(tmp_path / "one.safetensors").read(5, 9), x[5:9])
    assert open_embeddings(f"{tmp_path}/two.safetensors#text").n_rows == 10
    with pytest.raises(EmbeddingDataError, match="name one"):
        open_embeddings(tmp_path / "two.safetensors")


def test_shards_with_manifest_read_across_boundaries(tmp_path):
    x = data(n=250)
    d = tmp_path / "cache"
    d.mkdir()
    np.save(d / "s0.npy", x[:100])
    np.save(d / "s1.npy", x[100:180])
    from safetensors.numpy import save_file

    save_file({"e": x[180:]}, d / "s2.safetensors")
    (d / "manifest.json").write_text(json.dumps({"format": "msae-embeddings", "d_in": 6, "n_rows": 250,
        "shards": [{"file": "s0.npy", "n_rows": 100}, {"file": "s1.npy", "n_rows": 80},
                   {"file": "s2.safetensors", "n_rows": 70}]}))
    src = open_embeddings(d)
    assert src.n_rows == 250
    assert np.array_equal(src.read(90, 200), x[90:200])
    assert np.array_equal(read_all(src, np.array([249, 0, 101, 100, 179])), x[[249, 0, 101, 100, 179]])
    bad = json.loads((d / "manifest.json").read_text())
    bad["shards"][1]["n_rows"] = 81
    (d / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(EmbeddingDataError, match="manifest says 81 rows"):
        open_embeddings(d)


def test_a_manifest_reads_only_shard_files_inside_its_folder(tmp_path):
    """Shard paths that are absolute, climb out of the cache, name a folder (the cache itself: a
    manifest that points at itself), or are missing are each refused with the manifest and the shard."""
    x = data(n=50)
    outside = tmp_path / "outside.npy"
    np.save(outside, x)
    d = tmp_path / "cache"
    (d / "sub").mkdir(parents=True)
    np.save(d / "sub" / "ok.npy", x)
    cases = {
        str(outside): "is an absolute path",
        "../outside.npy": "points outside",
        ".": "is not a file",
        "sub": "is not a file",
    }
    for file, message in cases.items():
        (d / "manifest.json").write_text(json.dumps({"shards": [{"file": file}]}))
        with pytest.raises(EmbeddingDataError, match=rf"manifest.json: shards\[0\].*{message}"):
            open_embeddings(d)
    (d / "manifest.json").write_text(json.dumps({"shards": [{"n_rows": 50}]}))
    with pytest.raises(EmbeddingDataError, match=r"shards\[0\] has no 'file'"):
        open_embeddings(d)
    (d / "manifest.json").write_text("[1, 2]")
    with pytest.raises(EmbeddingDataError, match="not a JSON object"):
        open_embeddings(d)
    (d / "manifest.json").write_text(json.dumps({"shards": [{"file": "sub/ok.npy"}]}))
    assert open_embeddings(d).n_rows == 50  # a shard in a subfolder of the cache is fine


def test_parquet_and_saved_dataset_columns(tmp_path):
    import datasets

    x = data(n=40)
    ds = datasets.Dataset.from_dict({"embedding": x.tolist(), "id": list(range(40))})
    ds.to_parquet(str(tmp_path / "e.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    p = open_embeddings(f"{tmp_path}/e.parquet#embedding")
    assert (p.n_rows, p.d_in) == (40, 6)
    np.testing.assert_array_equal(p.read(3, 7), x[3:7])
    s = open_embeddings({"path": str(tmp_path / "saved"), "column": "embedding"})
    np.testing.assert_array_equal(s.read(0, 40), x)
    with pytest.raises(EmbeddingDataError, match="no column 'emb'"):
        open_embeddings(f"{tmp_path}/e.parquet#emb")
    ragged = datasets.Dataset.from_dict({"embedding": [[1.0, 2.0]] * 5 + [[1.0, 2.0, 3.0]]})
    ragged.to_parquet(str(tmp_path / "ragged.parquet"))
    with pytest.raises(EmbeddingDataError, match=r"vectors of different lengths \(\[2, 3\]\)"):
        open_embeddings(f"{tmp_path}/ragged.parquet#embedding").read(0, 6)


def test_clear_errors(tmp_path):
    with pytest.raises(EmbeddingDataError, match="no such file"):
        open_embeddings(tmp_path / "missing.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32))
    with pytest.raises(EmbeddingDataError, match="holds no rows"):
        open_embeddings(tmp_path / "empty.npy")
    np.save(tmp_path / "vec.npy", np.zeros(8, np.float32))
    with pytest.raises(EmbeddingDataError, match="2-D"):
        open_embeddings(tmp_path / "vec.npy")
    np.save(tmp_path / "ok.npy", data())
    raw = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EmbeddingDataError, match="corrupt or truncated"):
        open_embeddings(tmp_path / "trunc.npy")
    with pytest.raises(EmbeddingDataError, match="dimension 6, the SAE expects d_in=768"):
        check_dimension(open_embeddings(tmp_path / "ok.npy"), 768)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(EmbeddingDataError, match="unknown embedding format"):
        open_embeddings(tmp_path / "x.csv")


def test_nan_rows_are_counted_with_first_index(tmp_path):
    x = data()
    x[17, 2] = np.nan
    x[200, 0] = np.inf
    x[201, :] = np.nan
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(EmbeddingDataError, match=r"3 row\(s\) contain NaN or infinite values; the first is row 17"):
        compute_stats(open_embeddings(tmp_path / "bad.npy"), block_rows=64)


def test_stats_match_hand_computation(tmp_path):
    x = data(n=500, d=9, seed=3) * 3
    np.save(tmp_path / "a.npy", x)
    s = compute_stats(open_embeddings(tmp_path / "a.npy"), block_rows=37)
    mu = x.astype(np.float64).mean(0)
    expected_scale = math.sqrt(9) / np.linalg.norm(x - mu, axis=1).mean()
    np.testing.assert_allclose(s.mean.numpy(), mu, rtol=1e-6)
    assert s.scale == pytest.approx(expected_scale, rel=1e-9)
    y = s.apply(torch.from_numpy(x))
    assert float(y.norm(dim=1).mean()) == pytest.approx(3.0, rel=1e-5)  # E||s(x - mu)|| = sqrt(n)
    torch.testing.assert_close(s.invert(y), torch.from_numpy(x), rtol=1e-5, atol=1e-5)
    assert ModalityStats.from_dict(json.loads(json.dumps(s.to_dict()))).mean.equal(s.mean)


def test_missing_modality_statistics_is_a_clear_error():
    from msae_ext.architectures import MSAETrainingSAE, MSAETrainingSAEConfig

    sae = MSAETrainingSAE(MSAETrainingSAEConfig(d_in=4, d_sae=8, k_min=2))
    attach_stats(sae, "image", ModalityStats(torch.zeros(4), 1.0, 10))
    assert get_stats(sae, "image").scale == 1.0
    with pytest.raises(EmbeddingDataError, match="no 'text' normalisation statistics"):
        get_stats(sae, "text")
    with pytest.raises(EmbeddingDataError, match="dimension"):
        attach_stats(sae, "text", ModalityStats(torch.zeros(5), 1.0, 10))


class CountingSource:
    """Wraps a source and records the largest block read, to check the buffer bound."""

    def __init__(self, inner):
        self.inner, self.n_rows, self.d_in, self.description = inner, inner.n_rows, inner.d_in, "counting"
        self.max_read = 0

    def read(self, a, b):
        self.max_read = max(self.max_read, b - a)
        return self.inner.read(a, b)


def test_stream_visits_every_row_once_with_bounded_buffer(tmp_path):
    x = np.arange(1000, dtype=np.float32)[:, None].repeat(3, 1)
    np.save(tmp_path / "r.npy", x)
    src = CountingSource(open_embeddings(tmp_path / "r.npy"))
    stream = BatchStream(src, batch_size=64, seed=1, chunk_rows=50, buffer_rows=200)
    batches = list(stream.epoch_batches(0))
    assert len(batches) == 1000 // 64 and all(b.shape == (64, 3) for b in batches)
    rows = torch.cat(batches)[:, 0].long().numpy()
    assert len(set(rows)) == len(rows)  # no duplicates within an epoch
    assert np.array_equal(rows, stream.epoch_row_order(0)[: len(rows)])
    assert src.max_read <= 50  # reads are chunk-sized
    assert not np.array_equal(rows, np.sort(rows))  # shuffled
    full_order = stream.epoch_row_order(0)
    assert sorted(full_order) == list(range(1000))  # every row is in the epoch's order
    assert not np.array_equal(stream.epoch_row_order(0), stream.epoch_row_order(1))
    again = BatchStream(src, batch_size=64, seed=1, chunk_rows=50, buffer_rows=200)
    assert all(torch.equal(a, b) for a, b in zip(batches, again.epoch_batches(0)))


def test_stream_resume_mid_epoch_is_exact(tmp_path):
    np.save(tmp_path / "r.npy", data(n=777, d=4))
    stream = BatchStream(open_embeddings(tmp_path / "r.npy"), batch_size=50, seed=5, chunk_rows=64,
                         buffer_rows=128)
    full = list(stream.epoch_batches(2))
    for start in (0, 1, 5, 14):
        tail = list(stream.epoch_batches(2, start_batch=start))
        assert len(tail) == len(full) - start
        assert all(torch.equal(a, b) for a, b in zip(full[start:], tail))


def test_stream_needs_one_batch(tmp_path):
    np.save(tmp_path / "r.npy", data(n=10))
    with pytest.raises(EmbeddingDataError, match="fewer than one batch"):
        BatchStream(open_embeddings(tmp_path / "r.npy"), batch_size=64)
