"""`msae dashboard`: the browser's pages as a static site that opens from the file system.

Browsers refuse `fetch` of local files, so each page's data is a small script that registers
itself (`MSAE_DATA["latent/12"] = {...}`), loaded on demand by the same front end the server
uses: data/info.js, data/latents.js (the whole list), data/latent/J.js per latent, img/ROW.jpg
for image rows. Query and steering need a model and a search, so the site says to run
`msae serve` for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .app import Browser
from .server import STATIC, page_html, static_file


def _script(key: str, obj: Any) -> str:
    # JSON is a JavaScript expression; "</" is escaped so no value can close a script element
    body = json.dumps(obj).replace("</", "<\\/")
    return f"MSAE_DATA[{json.dumps(key)}] = {body};\n"


def write_dashboard(browser: Browser, out_dir: str | Path, *, max_latents: int | None = None,
                    progress: bool = True) -> Path:
    """Write the site into out_dir: every latent's page, or the `max_latents` most frequent."""
    out = Path(out_dir)
    (out / "data" / "latent").mkdir(parents=True, exist_ok=True)
    (out / "img").mkdir(exist_ok=True)
    listing = browser.latents(sort="frequency")
    exported = listing[:max_latents] if max_latents else listing
    info = {**browser.info(), "static": True, "exported": len(exported)}
    info["serve_command"] = (f"msae serve --sae {browser.name} --data {info['data']}"
                             + ("" if browser.protocol == "paper" else f" --protocol {browser.protocol}"))
    (out / "data" / "info.js").write_text(_script("info", info), encoding="utf-8")
    (out / "data" / "latents.js").write_text(_script("latents", listing), encoding="utf-8")
    images: set[int] = set()
    for entry in tqdm(exported, desc="dashboard", unit="latent", disable=not progress):
        page = browser.latent(entry["index"])
        images |= {e["row"] for e in page["top"] + page["bands"] if e.get("has_image")}
        (out / "data" / "latent" / f"{entry['index']}.js").write_text(_script(f"latent/{entry['index']}", page),
                                                                      encoding="utf-8")
    for row in sorted(images):
        jpeg = browser.thumbnail(row)
        if jpeg is not None:
            (out / "img" / f"{row}.jpg").write_bytes(jpeg)
    for name in STATIC:
        if name != "index.html":
            (out / name).write_text(static_file(name), encoding="utf-8")
    (out / "index.html").write_text(page_html(static=True), encoding="utf-8")
    return out / "index.html"
