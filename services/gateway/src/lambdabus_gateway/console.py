"""The web console's static files under `/ui/`: public (the page holds no data; every call it
makes carries the user's token to the API), served with a strict Content-Security-Policy.

The files are built from `console/` by `make console` (npm ci, then esbuild) into the package's
`ui/` directory, which is not committed. A gateway without them answers `/ui/` with 404
`console_not_built` and says how to build them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from aiohttp import web

from lambdabus_platform.errors import NotFound
from lambdabus_platform.service import error_response

UI_DIR: Final = Path(__file__).parent / "ui"
UI_DIR_KEY = web.AppKey("console_dir", Path)

# No inline script or style, no other origin: the console's own files and its API calls only.
# A function's LUNA docs page is shown in an iframe with `sandbox` (no scripts, no same-origin).
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; frame-src 'self'; child-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_FILE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _not_built() -> web.Response:
    response = error_response(
        NotFound(
            "the web console is not built on this gateway: run `make console` (npm ci and "
            "esbuild in console/) and reload",
            code="console_not_built",
        )
    )
    response.headers.update(HEADERS)
    return response


async def _serve(request: web.Request) -> web.StreamResponse:
    directory = request.app[UI_DIR_KEY]
    name = request.match_info.get("file") or "index.html"
    index = directory / "index.html"
    if not index.is_file():
        return _not_built()
    path = directory / name
    # One level, a plain name: no traversal, no dotfiles, no directories, no symlinks.
    if _FILE.fullmatch(name) is None or path.is_symlink() or not path.is_file():
        missing = error_response(
            NotFound(f"no console file {name!r}; the console is at /ui/", code="not_found")
        )
        missing.headers.update(HEADERS)
        return missing
    served = web.FileResponse(path, headers=HEADERS)
    # index.html names the bundles without a version: always revalidate (ETag/Last-Modified).
    served.headers["Cache-Control"] = "no-cache"
    return served


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect("/ui/")


def add_console_routes(app: web.Application, directory: Path | None = None) -> None:
    app[UI_DIR_KEY] = directory or UI_DIR
    app.router.add_get("/ui", _redirect)
    app.router.add_get("/ui/", _serve)
    app.router.add_get("/ui/{file}", _serve)
