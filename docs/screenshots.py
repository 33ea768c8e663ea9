"""Screenshots of the concept browser's main pages, taken by headless chromium (docs/images/).

    python docs/screenshots.py --sae msae_demo/runs/msae_rw --data msae_demo/data/wordnet_noun \\
        --concepts msae_demo/runs/msae_rw/concepts.json --clip wordllama --query "a large body of salt water"

Serves the app in-process on a free port (the same server as `msae serve`), opens the latent list,
the page of the first validated latent matching --search, and the query page with one steering
control moved, and saves browser_list.png, browser_latent.png and browser_query.png.
"""

from __future__ import annotations

import argparse
import shutil
import threading
from pathlib import Path


def main() -> None:
    from playwright.sync_api import sync_playwright

    from msae_ext.browse import make_server, open_browser

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--concepts")
    p.add_argument("--clip")
    p.add_argument("--query", default="a large body of salt water")
    p.add_argument("--search", default="", help="concept name typed into the list's search box")
    p.add_argument("--out", default=str(Path(__file__).parent / "images"))
    args = p.parse_args()
    browser = open_browser(args.sae, args.data, concepts=args.concepts, clip=args.clip)
    server = make_server(browser, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1280, "height": 860})
        page.goto(url)
        page.wait_for_selector("#latents tbody tr")
        page.check("#valid-only")
        if args.search:
            page.fill("#search", args.search)
        page.screenshot(path=str(out / "browser_list.png"))
        page.locator("#latents tbody tr a").first.click()
        page.wait_for_selector("#latent-title")
        page.screenshot(path=str(out / "browser_latent.png"), full_page=True)
        page.goto(url + "#/query")
        page.fill("#query-text", args.query)
        page.click("#query-go")
        page.wait_for_selector("#neighbours-list .example")
        slider = page.locator("#steer-controls input[type=range]").nth(1)
        with page.expect_response(lambda r: "api/steer" in r.url):
            slider.evaluate("s => { s.value = s.max; s.dispatchEvent(new Event('input')); "
                            "s.dispatchEvent(new Event('change')); }")
        page.wait_for_selector("#steered-list .example")
        page.screenshot(path=str(out / "browser_query.png"), full_page=True)
        b.close()
    server.shutdown()
    print(f"screenshots in {out}")


if __name__ == "__main__":
    main()
