"""`msae serve`: the concept browser as a local web app (the standard library's threaded HTTP
server; the front end is three static files, no build step).

    GET  /                      the app (static/index.html, app.js, style.css)
    GET  /api/info              the SAE, the data, what queries the server can embed
    GET  /api/latents?q=&sort=frequency|max|nesting&valid_only=1&limit=N   the latent list
    GET  /api/latent/J          latent J's page
    GET  /api/query?text=T | ?row=R     an input's active latents; POST /api/query with an image body
    POST /api/steer             {"text"| "row": ..., "edits": [{"latent", "value", "mode"}]} -> neighbours
    GET  /api/image/R           row R's image as a JPEG thumbnail (image data sets)

Bad input answers 400 with {"error": message}; the pages show the message.
"""

from __future__ import annotations

import errno
import json
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlparse

from .app import Browser, BrowserError

STATIC = ("index.html", "app.js", "style.css")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
MAX_UPLOAD = 20 * 2**20


class Raw(NamedTuple):
    """A response body made ahead (a thumbnail, the serialised latent list)."""

    body: bytes
    content_type: str


def static_file(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def page_html(static: bool) -> str:
    """index.html for the server, or for the static site (which loads its data from data/*.js)."""
    mode = ('<script>window.MSAE_STATIC = true; window.MSAE_DATA = {};</script>\n'
            '<script src="data/info.js"></script>\n<script src="data/latents.js"></script>') if static else ""
    return static_file("index.html").replace("<!--MODE-->", mode)


def _int(params: dict[str, list[str]], key: str) -> int | None:
    value = params.get(key, [None])[0]
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise BrowserError(f"{key} must be an integer, got {value!r}") from None


def make_handler(browser: Browser, quiet: bool = True) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "msae-serve"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            if not quiet:
                super().log_message(format, *args)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urlparse(self.path)
            params = parse_qs(url.query)
            path = url.path.rstrip("/") or "/"
            if path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, page_html(static=False).encode(), TYPES[".html"])
            if path.lstrip("/") in STATIC:
                name = path.lstrip("/")
                return self._send(HTTPStatus.OK, static_file(name).encode(), TYPES["." + name.rpartition(".")[2]])
            self._api(lambda: self._get(path, params))

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD:
                return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"upload over {MAX_UPLOAD} bytes"})
            body = self.rfile.read(length)
            if url.path == "/api/query":
                return self._api(lambda: browser.query(image=body))
            if url.path == "/api/steer":
                def steer() -> dict[str, Any]:
                    try:
                        req = json.loads(body or b"{}")
                    except json.JSONDecodeError as e:
                        raise BrowserError(f"the steering request is not JSON: {e}") from None
                    if not isinstance(req, dict) or not isinstance(req.get("edits", []), list):
                        raise BrowserError('the steering request must be {"text" or "row": ..., "edits": [...]}')
                    return browser.steer(req.get("edits", []), text=req.get("text"), row=req.get("row"))
                return self._api(steer)
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {url.path}"})

        def _get(self, path: str, params: dict[str, list[str]]) -> Any:
            if path == "/api/info":
                return browser.info()
            if path == "/api/latents" and not params:
                return Raw(browser.latents_json(), "application/json")
            if path == "/api/latents":
                return browser.latents(params.get("q", [""])[0], params.get("sort", ["frequency"])[0],
                                       params.get("valid_only", ["0"])[0] in ("1", "true"), _int(params, "limit"))
            if path.startswith("/api/latent/"):
                return browser.latent(_int({"latent": [path.rpartition("/")[2]]}, "latent"))
            if path == "/api/query":
                return browser.query(text=params.get("text", [None])[0], row=_int(params, "row"))
            if path.startswith("/api/image/"):
                jpeg = browser.thumbnail(_int({"row": [path.rpartition("/")[2]]}, "row"))
                if jpeg is None:
                    raise FileNotFoundError("this row's image cannot be read back")
                return Raw(jpeg, "image/jpeg")
            raise FileNotFoundError(f"no such page: {path}")

        def _api(self, work) -> None:
            try:
                result = work()
            except BrowserError as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except FileNotFoundError as e:
                return self._json(HTTPStatus.NOT_FOUND, {"error": str(e)})
            except Exception as e:  # a bug: say so on the page, keep serving
                traceback.print_exc()
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
            if isinstance(result, Raw):
                return self._send(HTTPStatus.OK, result.body, result.content_type)
            self._json(HTTPStatus.OK, result)

        def _json(self, status: HTTPStatus, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the page went away (a lazy image, a new route)
                pass

    return Handler


def make_server(browser: Browser, host: str = "127.0.0.1", port: int = 8765, quiet: bool = True) -> ThreadingHTTPServer:
    """The app's server, bound (port 0: any free port; `server.server_address` says which)."""
    try:
        server = ThreadingHTTPServer((host, port), make_handler(browser, quiet))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise BrowserError(f"port {port} is in use (another msae serve?); give another with --port") from None
        raise BrowserError(f"cannot serve on {host}:{port}: {e.strerror}") from None
    server.daemon_threads = True
    browser.latents_json()  # the list the app loads first, serialised before the first request
    return server
