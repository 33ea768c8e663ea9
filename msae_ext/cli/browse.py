"""`msae serve` (the concept browser as a local web app) and `msae dashboard` (the same pages as a
static site)."""

from __future__ import annotations

import argparse

from .args import positive_int, sae_data_args

DATA_HELP = ("embedding set to browse: an `msae embed` cache (its captions, ids and images are shown) or a "
             ".npy/.safetensors/... matrix; its latent index is built once (one pass) and cached next to the SAE")


def _common(p) -> None:
    sae_data_args(p, DATA_HELP)
    p.add_argument("--index-dir", help="where the latent index is cached (default: SAE/browser_index/...)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the latent index even if a cached one matches")
    p.add_argument("--protocol", choices=("paper", "native"), default="paper",
                   help="paper: encode with ReLU only (section 4, the default); native: with the architecture's own "
                        "activation, e.g. a TopK SAE's top-k, to browse it at its trained sparsity")
    p.add_argument("--no-progress", action="store_true")


def add_commands(sub) -> None:
    s = sub.add_parser(
        "serve", help="the concept browser: a local web app over an SAE and an embedding set",
        description="Serve the concept browser on localhost: a latent list (search by concept name, filter by "
                    "validation, sort by frequency, maximum activation or nesting level), a page per latent "
                    "(concepts and validations, activation histogram, top examples and a sample per activation "
                    "band, co-firing latents at coarser and finer nesting levels, nearest latents by decoder "
                    "direction), a query box (a text or image through --clip, or a row of the data) and a "
                    "steering panel (raise or lower concepts and watch the nearest rows change).")
    _common(s)
    s.add_argument("--clip", help="model that embeds typed texts and uploaded images: an open_clip name (with "
                                  "--pretrained; the data's model) or wordllama for the text stand-in")
    s.add_argument("--pretrained", help="its pretrained tag or checkpoint (with --clip)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    s.set_defaults(func=run_serve)

    d = sub.add_parser(
        "dashboard", help="write the concept browser's pages as a static site (opens from the file system)",
        description="Write the latent list and every latent's page as a static site: open OUT/index.html in a "
                    "browser, or host the folder. Query and steering need `msae serve`.")
    _common(d)
    d.add_argument("--max-latents", type=positive_int, help="only the N most frequent latents get a page")
    d.add_argument("--out", required=True, help="folder for the site")
    d.set_defaults(func=run_dashboard)


def _open(args: argparse.Namespace, clip: str | None = None, pretrained: str | None = None):
    from ..browse import open_browser

    return open_browser(args.sae, args.data, concepts=args.concepts, modality=args.modality, clip=clip,
                        pretrained=pretrained, device=args.device, index_dir=args.index_dir, rebuild=args.rebuild,
                        protocol=args.protocol, progress=not args.no_progress)


def run_serve(args: argparse.Namespace) -> int:
    if args.clip and not args.pretrained and args.clip != "wordllama":
        raise ValueError("--clip needs --pretrained (a tag, a checkpoint file, or 'none')")
    from ..browse import make_server

    browser = _open(args, args.clip, args.pretrained)
    server = make_server(browser, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"concept browser for {args.sae} on http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from ..browse import write_dashboard

    page = write_dashboard(_open(args), args.out, max_latents=args.max_latents, progress=not args.no_progress)
    print(f"static site written: open {page} in a browser (query and steering: msae serve --sae {args.sae} "
          f"--data {args.data})")
    return 0
