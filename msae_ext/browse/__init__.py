"""The concept browser (`msae serve`, `msae dashboard`): what an SAE learned, page by page.

    app.py     the pages' data (latent list, latent page, query, steering) over a cached latent index
    server.py  the local web app: a JSON API and the static front end in static/
    site.py    the same pages written as a static site that opens from the file system
"""

from .app import Browser, BrowserError, open_browser
from .server import make_server
from .site import write_dashboard

__all__ = ["Browser", "BrowserError", "make_server", "open_browser", "write_dashboard"]
