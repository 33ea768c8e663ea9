"""The concept browser: its data against the index and the search it wraps, its HTTP API, and its
pages driven in a real headless browser (Debian's chromium through playwright), served and static."""

from __future__ import annotations

import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from msae_ext import cli as msae_cli
from msae_ext.browse import BrowserError, make_server, open_browser, write_dashboard
from msae_ext.config import TrainConfig
from msae_ext.train import train

TOPICS = {
    "dog": ["a dog barks at the mailman", "the puppy chews a bone", "a dog fetches the stick", "my dog sleeps all day"],
    "ocean": ["waves crash on the ocean shore", "the sea is calm at dawn", "sailors cross the ocean", "a boat on the sea"],
    "music": ["she plays the piano", "the band performs a song", "a guitar solo at the concert", "he sings a melody"],
    "food": ["fresh bread from the bakery", "a bowl of hot soup", "they cook pasta for dinner", "an apple pie in the oven"],
    "city": ["traffic jams downtown", "tall buildings in the city", "a crowded subway station", "streets full of taxis"],
}
WORDS = ["dog", "puppy", "ocean", "sea", "music", "piano", "food", "bread", "city", "traffic", "car", "tree"]


@pytest.fixture(scope="module")
def browsed(tmp_path_factory):
    """A trained MSAE over real text embeddings (wordllama, the CLIP text-tower stand-in), named
    with a small vocabulary: the SAE folder, the cache and concepts.json."""
    from msae_ext.embed import embed_dataset, load_clip, open_items
    from msae_ext.interpret import embed_vocabulary, name_concepts
    from msae_ext.loading import load_sae

    root = tmp_path_factory.mktemp("browse")
    rng = np.random.default_rng(0)
    lines = [f"{s}{suffix}" for topic in TOPICS.values() for s in topic
             for suffix in ("", " today", " again", " in the morning", " at night", " as usual")]
    lines = [lines[i] for i in rng.permutation(len(lines))]
    (root / "texts.txt").write_text("\n".join(lines) + "\n")
    clip = load_clip("wordllama", "l2_supercat")
    cache = root / "cache"
    embed_dataset(open_items(f"text:{root / 'texts.txt'}"), clip, cache, modality="text", progress=False)
    cfg = TrainConfig.from_dict(dict(architecture="msae", weighting="rw", k_min=4, train_data=str(cache),
                                     expansion_factor=1, epochs=30, batch_size=40, lr=2e-3, modality="text",
                                     eval_every=0, checkpoint_every=0, final_eval=False, seed=0))
    train(cfg, root / "sae", resume=False, progress=False)
    sae = load_sae(root / "sae")
    words_emb = embed_vocabulary(WORDS, clip, progress=False)
    doc = name_concepts(sae, words_emb, WORDS, threshold=0.1, ratio=1.05)
    (root / "concepts.json").write_text(json.dumps(doc))
    return root, clip


@pytest.fixture(scope="module")
def browser(browsed):
    root, clip = browsed
    b = open_browser(root / "sae", root / "cache", concepts=root / "concepts.json", progress=False)
    b.encoder = clip  # what --clip wordllama loads
    return b


def test_pages_hold_what_the_index_and_search_compute(browsed, browser):
    root, _ = browsed
    info = browser.info()
    assert info["d_sae"] == 256 and info["n_rows"] == 120 and info["query_text"] and not info["query_image"]
    listing = browser.latents(limit=None)
    assert len(listing) == 256
    freq = [e["frequency"] for e in listing]
    assert freq == sorted(freq, reverse=True)
    named = browser.latents("piano")
    assert named and all("piano" in e["label"] for e in named)
    valid = browser.latents(valid_only=True)
    assert all(e["valid"] for e in valid) and len(valid) == sum(browser.table.valid)
    # a latent's page: its examples are the rows where it is largest, shown with their texts
    j = listing[0]["index"]
    page = browser.latent(j)
    z = browser.space.encode(torch.from_numpy(browser.rows.source.read(0, 120))).float()
    best = z[:, j].topk(3).indices.tolist()
    assert [e["row"] for e in page["top"][:3]] == best
    assert page["top"][0]["caption"] == browser.rows.captions[best[0]]
    assert sum(b["count"] for b in page["histogram"]) == int((z[:, j] > 0).sum())
    assert page["concepts"][0]["word"] in WORDS and page["validations"] == browser.table.neurons[j]["valid"]
    assert {"coarser", "finer"} == set(page["cofiring"]) and len(page["decoder_neighbours"]) == 8
    json.dumps(page, allow_nan=False)  # strict JSON: the open end bin has no infinity
    # a query's latents are the SAE's activations of that row, largest first
    q = browser.query(row=5)
    want = z[5].topk(len(q["latents"]))
    assert [e["index"] for e in q["latents"]] == want.indices.tolist()
    assert q["l0"] == int((z[5] > 0).sum()) and q["query"]["caption"] == browser.rows.captions[5]
    # a typed text goes through the encoder: a sentence of the data lands on its own row
    text = browser.query(text=browser.rows.captions[7])
    assert [e["index"] for e in text["latents"]] == [e["index"] for e in browser.query(row=7)["latents"]]
    # steering: the neighbours are msae search's, before and after the edit
    top = q["latents"][0]
    plain = browser.steer([], row=5)
    assert plain["neighbours"][0]["row"] == 5 and "steered" not in plain
    steered = browser.steer([{"latent": top["index"], "value": 0.0, "mode": "set"},
                             {"latent": listing[-1]["index"], "value": 10 * top["value"], "mode": "set"}], row=5)
    assert [h["row"] for h in steered["neighbours"]] == [h["row"] for h in plain["neighbours"]]
    assert [h["row"] for h in steered["steered"]] != [h["row"] for h in plain["neighbours"]]
    assert steered["distance_from_query"] > 0


def test_bad_input_is_named(browsed, browser, tmp_path):
    root, _ = browsed
    with pytest.raises(BrowserError, match="latent 999 does not exist; the SAE has 256"):
        browser.latent(999)
    with pytest.raises(BrowserError, match="'zebra' is neither a neuron index nor a word"):
        browser.steer([{"latent": "zebra", "value": 1}], row=0)
    with pytest.raises(BrowserError, match="value must be a number"):
        browser.steer([{"latent": 3, "value": "lots"}], row=0)
    with pytest.raises(BrowserError, match="exactly one query"):
        browser.query(text="dog", row=1)
    with pytest.raises(BrowserError, match="an image query needs a CLIP model"):
        browser.query(image=b"not an image")
    np.save(tmp_path / "wide.npy", np.zeros((10, 12), np.float32))
    with pytest.raises(BrowserError, match="dimension 12, the SAE expects d_in=256"):
        open_browser(root / "sae", tmp_path / "wide.npy", progress=False)
    # an SAE folder without the statistics of the modality asked for
    with pytest.raises(ValueError, match="image"):
        open_browser(root / "sae", root / "cache", modality="image", progress=False)
    # the command line says the same, before any server starts
    assert msae_cli.main(["serve", "--sae", str(root / "sae"), "--data", str(tmp_path / "wide.npy")]) == 2


def test_native_protocol_browses_a_topk_sae_at_its_k(browsed, tmp_path):
    """--protocol native encodes with the architecture's own activation: every row of a TopK SAE
    has k active latents, in an index of its own beside the paper protocol's (ReLU only)."""
    root, _ = browsed
    cfg = TrainConfig.from_dict(dict(architecture="topk", k=4, train_data=str(root / "cache"), expansion_factor=1,
                                     epochs=5, batch_size=40, lr=2e-3, modality="text", eval_every=0,
                                     checkpoint_every=0, final_eval=False, seed=0))
    train(cfg, tmp_path / "topk", resume=False, progress=False)
    native = open_browser(tmp_path / "topk", root / "cache", protocol="native", progress=False)
    paper = open_browser(tmp_path / "topk", root / "cache", progress=False)
    assert (native.info()["protocol"], paper.info()["protocol"]) == ("native", "paper")
    assert [native.query(row=r)["l0"] for r in range(0, 120, 17)] == [4] * 8
    assert paper.query(row=0)["l0"] > 4
    assert sum(e["frequency"] for e in native.latents(limit=None)) == pytest.approx(4, abs=1e-2)
    assert len(list((tmp_path / "topk" / "browser_index").iterdir())) == 2
    # the command line passes it on: the static site's header data says which protocol it shows
    assert msae_cli.main(["dashboard", "--sae", str(tmp_path / "topk"), "--data", str(root / "cache"),
                          "--protocol", "native", "--out", str(tmp_path / "site"), "--no-progress"]) == 0
    site_info = (tmp_path / "site" / "data" / "info.js").read_text()
    assert '"protocol": "native"' in site_info and f"--data {root / 'cache'} --protocol native" in site_info


@pytest.fixture(scope="module")
def served(browser):
    server = make_server(browser, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _get(url: str):
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: bytes):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST")) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_api(served, browser):
    assert _get(served + "api/info") == (200, json.loads(json.dumps(browser.info())))
    status, latents = _get(served + "api/latents?q=piano&sort=max&limit=3")
    assert status == 200 and latents == json.loads(json.dumps(browser.latents("piano", "max", limit=3)))
    status, page = _get(served + "api/latent/3")
    assert status == 200 and page["index"] == 3 and page["top"]
    assert _get(served + "api/query?row=2")[1] == json.loads(json.dumps(browser.query(row=2)))
    status, steered = _post(served + "api/steer", json.dumps({"row": 2, "edits": [{"latent": 3, "value": 5}]}).encode())
    assert status == 200 and steered["edits"][0]["neuron"] == 3
    assert _get(served + "api/latent/4096") == (400, {"error": "latent 4096 does not exist; the SAE has 256 latents"})
    assert _get(served + "api/latents?sort=alphabet")[0] == 400
    assert _post(served + "api/steer", b"{oops")[0] == 400
    assert _get(served + "api/nothing")[0] == 404
    with urllib.request.urlopen(served) as r:
        assert "msae concept browser" in r.read().decode()
    port = int(served.rstrip("/").rpartition(":")[2])
    with pytest.raises(BrowserError, match=f"port {port} is in use"):
        make_server(browser, port=port)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_browser = pytest.mark.skipif(_chromium() is None, reason="no chromium (CI installs Debian's: apt-get install chromium)")


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


@needs_browser
def test_the_app_in_a_real_browser(served, browser, page):
    page.goto(served)
    page.wait_for_selector("#latents tbody tr")
    assert page.locator("#latents tbody tr").count() == 256
    page.fill("#search", "piano")
    rows = page.locator("#latents tbody tr")
    assert 0 < rows.count() < 256 and all("piano" in t for t in rows.all_inner_texts())
    page.select_option("#sort", "max")
    first = browser.latents("piano", "max")[0]
    assert rows.first.inner_text().startswith(f"#{first['index']} ")
    rows.first.locator("a").click()
    page.wait_for_selector("#latent-title")
    assert page.locator("#latent-title").inner_text().startswith(f"#{first['index']} {first['label']}")
    assert page.locator("#histogram svg rect").count() == len(browser.latent(first["index"])["histogram"])
    top = browser.latent(first["index"])["top"][0]
    assert page.locator("#top-examples .example").first.inner_text().endswith(f"{top['caption']} (row {top['row']})")
    assert page.locator("#concepts tr").count() == 1 + len(browser.latent(first["index"])["concepts"])
    # a query, then a steering control moved: the steered neighbours change
    page.goto(served + "#/query")
    page.fill("#query-text", browser.rows.captions[9])
    page.click("#query-go")
    page.wait_for_selector("#query-latents tr")
    assert page.locator("#query-latents tr").count() == len(browser.query(row=9)["latents"])
    page.wait_for_selector("#neighbours-list .example")
    before = page.locator("#neighbours-list .example").first.get_attribute("data-row")
    assert before == "9"
    assert page.locator("#steered-list .example").count() == 0  # no edit until a control moves
    slider = page.locator("#steer-controls input[type=range]").first
    slider.evaluate("s => { s.value = 0; s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change')); }")
    page.fill("#steer-add", f"#{browser.latents()[-1]['index']}")
    page.click("#steer-add-go")
    added = page.locator("#steer-controls input[type=range]").last
    added.evaluate("s => { s.value = s.max; s.dispatchEvent(new Event('change')); }")
    page.wait_for_selector("#steered-list .example.changed")
    assert page.locator("#steered-list .example.changed").count() > 0
    # bad input is named on the page
    page.goto(served + "#/latent/9999")
    page.wait_for_selector("#error:not([hidden])")
    assert "latent 9999 does not exist" in page.locator("#error").inner_text()


@needs_browser
def test_the_static_site_from_the_file_system(browser, page, tmp_path):
    index = write_dashboard(browser, tmp_path / "site", max_latents=20, progress=False)
    page.goto(index.resolve().as_uri())
    page.wait_for_selector("#latents tbody tr")
    assert page.locator("#latents tbody tr").count() == 256
    first = browser.latents()[0]
    page.locator("#latents tbody tr a").first.click()
    page.wait_for_selector("#latent-title")
    assert page.locator("#latent-title").inner_text().startswith(f"#{first['index']}")
    assert page.locator("#top-examples .example").count() == len(browser.latent(first["index"])["top"])
    page.goto(index.resolve().as_uri() + f"#/latent/{browser.latents()[-1]['index']}")
    page.wait_for_selector("#error:not([hidden])")
    assert "not in this export" in page.locator("#error").inner_text()
    page.goto(index.resolve().as_uri() + "#/query")
    page.wait_for_selector("#static-note")
    assert "msae serve" in page.locator("#static-note").inner_text()
    assert len(list((tmp_path / "site" / "data" / "latent").glob("*.js"))) == 20


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def test_image_rows_show_thumbnails_and_an_uploaded_image_is_a_query(tmp_path):
    """An image cache of a (tiny, random-weight) open_clip model: pages carry thumbnails read back
    from the image files, the static site writes them, and an uploaded image file is embedded by
    the model exactly as its row was."""
    from PIL import Image

    from msae_ext.embed import embed_dataset, load_clip, open_items

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    config = tmp_path / "tiny-clip-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    clip = load_clip(str(config), None)
    embed_dataset(open_items(f"folder:{tmp_path / 'imgs'}"), clip, tmp_path / "cache", modality="image",
                  progress=False, num_workers=0)
    cfg = TrainConfig.from_dict(dict(architecture="topk", k=4, train_data=str(tmp_path / "cache"), expansion_factor=2,
                                     epochs=3, batch_size=8, lr=1e-3, eval_every=0, checkpoint_every=0,
                                     final_eval=False, seed=0))
    train(cfg, tmp_path / "sae", resume=False, progress=False)
    b = open_browser(tmp_path / "sae", tmp_path / "cache", clip=str(config), pretrained="none", progress=False)
    assert b.info()["query_image"]
    page = b.latent(b.latents()[0]["index"])
    assert page["top"] and all(e["has_image"] for e in page["top"])
    thumb = Image.open(io.BytesIO(b.thumbnail(page["top"][0]["row"])))
    assert thumb.format == "JPEG" and max(thumb.size) <= 160
    row = 5
    path = b.rows.image_path(row)
    uploaded = b.query(image=Path(path).read_bytes())
    assert [e["index"] for e in uploaded["latents"]] == [e["index"] for e in b.query(row=row)["latents"]]
    with pytest.raises(BrowserError, match="not an image"):
        b.query(image=b"GIF89a broken")
    server = make_server(b, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/"
    try:
        with urllib.request.urlopen(f"{url}image/{row}") as r:
            assert r.headers["Content-Type"] == "image/jpeg" and r.read() == b.thumbnail(row)
        status, body = _post(f"{url}query", Path(path).read_bytes())
        assert status == 200 and body["latents"] == json.loads(json.dumps(uploaded["latents"]))
    finally:
        server.shutdown()
        server.server_close()
    write_dashboard(b, tmp_path / "site", progress=False)
    assert (tmp_path / "site" / "img" / f"{page['top'][0]['row']}.jpg").read_bytes() == b.thumbnail(page["top"][0]["row"])
