"""The viewer's HTTP server: the page, its static files, the info and cell API, the tiles.

Routes (GET and HEAD only; anything else is 404, or 405 for other methods):

* ``/``: the page; ``/static/NAME``: one of the page's own files, from a list made at start-up
  (a URL is never joined to a file path, so no URL reaches another file);
* ``/api/info``: sizes, geometry, classes and their colours, whether the map is complete;
* ``/api/cell?x=X&y=Y``: the cell under slide pixel ``(y, x)``: its top-5 classes and its window;
* ``/tiles/slide/LEVEL/X_Y.jpg``, ``/tiles/map/VIEW/LEVEL/X_Y.png`` with ``VIEW`` ``argmax`` or
  ``class-K`` and an optional ``?hide=K,K`` (classes left transparent in the argmax view).

Bound to a loopback address, the server also refuses requests whose ``Host`` header names another
host (a web page elsewhere cannot reach it through DNS rebinding).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from fcconv.errors import FcconvError
from fcconv.viewer._map import MapView
from fcconv.viewer._slide import Slide
from fcconv.viewer.tiles import Pyramid, TileCache, class_colours, encode, map_tile, ramp, slide_tile

__all__ = ["LOOPBACK", "Response", "ViewerApp", "make_server"]

LOOPBACK = ("localhost", "127.0.0.1", "::1")
# Seconds a tile with cells not computed yet stays cached: none, so that the page's last refresh,
# once the map is complete, never gets a tile rendered before its last cells were written.
PENDING_TTL = 0.0
_SLIDE_TILE = re.compile(r"/tiles/slide/(\d{1,2})/(\d{1,7})_(\d{1,7})\.jpg")
_MAP_TILE = re.compile(r"/tiles/map/(argmax|class-(\d{1,5}))/(\d{1,2})/(\d{1,7})_(\d{1,7})\.png")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}


@dataclass
class Response:
    """What a route answers: a status, a content type, the body and extra headers."""

    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _static_files() -> dict[str, bytes]:
    """The page's own files, read once: ``{"/static/app.js": bytes, ...}`` (``/`` is the page)."""
    root = resources.files("fcconv.viewer") / "static"
    files: dict[str, bytes] = {}

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif "." + entry.name.rsplit(".", 1)[-1] in _TYPES:
                files[f"/static/{prefix}{entry.name}"] = entry.read_bytes()

    walk(root, "")
    files["/"] = files["/static/index.html"]
    return files


def _error(status: HTTPStatus, message: str = "") -> Response:
    return Response(int(status), "text/plain; charset=utf-8", (message or status.phrase).encode())


def _json(payload: Any) -> Response:
    return Response(200, "application/json", json.dumps(payload).encode(), {"Cache-Control": "no-store"})


class ViewerApp:
    """The routes over one map and, optionally, its slide; safe to call from several threads.

    Args:
        view: the map, opened with :func:`~fcconv.viewer.open_map`.
        slide: its slide, opened with :func:`~fcconv.viewer.open_slide`, or None for the map alone.
        hidden: classes the page leaves uncoloured at first in the winning-class view.
        refresh: seconds between the page's refreshes while the map is not complete.
    """

    def __init__(self, view: MapView, slide: Slide | None = None, *, hidden: Sequence[int] = (),
                 refresh: float = 4.0, cache_entries: int = 2048) -> None:
        self.view, self.slide, self.hidden, self.refresh = view, slide, list(hidden), refresh
        if slide is not None:
            _check_fits(view, slide)
        height, width = slide.size if slide is not None else view.geometry.slide_size
        self.pyramid = Pyramid(height, width)
        self.colours = class_colours(len(view.classes))
        self.cache = TileCache(cache_entries)
        self.static = _static_files()

    def info(self) -> dict[str, Any]:
        """What the page needs to draw: sizes, geometry, classes, colours, the ramp."""
        g = self.view.geometry
        return {
            "width": self.pyramid.width, "height": self.pyramid.height, "tileSize": self.pyramid.tile,
            "maxLevel": self.pyramid.max_level, "slide": self.slide is not None,
            "map": self.view.path.name, "slideName": None if self.slide is None else self.slide.path.name,
            "grid": list(self.view.grid), "stride": list(g.stride), "window": list(g.window),
            "windowOffset": list(g.window_offset), "imageShape": list(g.image_shape), "level": g.level,
            "downsample": g.downsample, "mpp": None if g.mpp is None else list(g.mpp),
            "classes": self.view.classes, "hidden": self.hidden, "hasValid": self.view.valid is not None,
            "colours": [_hex(c) for c in self.colours], "ramp": [_hex(c) for c in ramp(11)],
            "complete": self.view.complete(), "refreshSeconds": self.refresh,
        }

    def cell(self, query: dict[str, list[str]]) -> Response:
        """``/api/cell``: the cell under the slide point ``(y, x)``, or ``{"cell": null}`` off the map."""
        try:
            y, x = float(query["y"][0]), float(query["x"][0])
            if not (np.isfinite(y) and np.isfinite(x)):
                raise ValueError
        except (KeyError, ValueError, IndexError):
            return _error(HTTPStatus.BAD_REQUEST, "expected /api/cell?x=X&y=Y in slide pixels")
        row, col = self.view.geometry.cell_at(y, x)
        if not (0 <= row < self.view.grid[0] and 0 <= col < self.view.grid[1]):
            return _json({"cell": None})
        return _json(self.view.cell(row, col))

    def tile(self, path: str, query: dict[str, list[str]]) -> Response | None:
        """A slide or map tile, from the cache or rendered now; None when ``path`` names no tile."""
        match = _SLIDE_TILE.fullmatch(path)
        if match and self.slide is not None:
            level, x, y = (int(g) for g in match.groups())
            return self._cached(("slide", level, x, y), lambda: self._slide_tile(level, x, y))
        match = _MAP_TILE.fullmatch(path)
        if not match:
            return None
        channel = None if match.group(2) is None else int(match.group(2))
        if channel is not None and channel >= len(self.view.classes):
            return None
        hidden = _hidden(query, len(self.view.classes)) if channel is None else ()
        if hidden is None:
            return _error(HTTPStatus.BAD_REQUEST, "expected ?hide=K,K,... with class indices")
        level, x, y = (int(g) for g in match.groups()[2:])
        return self._cached(("map", channel, hidden, level, x, y),
                            lambda: self._map_tile(level, x, y, channel, hidden))

    def _cached(self, key: Any, render: Any) -> Response | None:
        data = self.cache.get(key)
        if data is None:
            rendered = render()
            if rendered is None:
                return None
            data, ttl = rendered
            if ttl is None or ttl > 0:
                self.cache.put(key, data, ttl)
        kind = "image/jpeg" if key[0] == "slide" else "image/png"
        return Response(200, kind, data, {"Cache-Control": "no-cache"})

    def _slide_tile(self, level: int, x: int, y: int) -> tuple[bytes, float | None] | None:
        assert self.slide is not None
        pixels = slide_tile(self.slide, self.pyramid, level, x, y)
        return None if pixels is None else (encode(pixels, "jpeg"), None)

    def _map_tile(self, level: int, x: int, y: int, channel: int | None, hidden: tuple[int, ...]
                  ) -> tuple[bytes, float | None] | None:
        rendered = map_tile(self.view, self.pyramid, level, x, y, channel=channel, hidden=hidden,
                            colours=self.colours)
        if rendered is None:
            return None
        pixels, pending = rendered
        return encode(pixels, "png"), PENDING_TTL if pending else None

    def handle(self, target: str) -> Response:
        """Answer a GET of ``target`` (the request's path and query)."""
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query)
        if path in self.static:
            suffix = "." + path.rsplit(".", 1)[-1] if path != "/" else ".html"
            return Response(200, _TYPES[suffix], self.static[path], {"Cache-Control": "no-cache"})
        if path == "/api/info":
            return _json(self.info())
        if path == "/api/cell":
            return self.cell(query)
        if path.startswith("/tiles/"):
            found = self.tile(path, query)
            if found is not None:
                return found
        return _error(HTTPStatus.NOT_FOUND)


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def _hidden(query: dict[str, list[str]], count: int) -> tuple[int, ...] | None:
    text = ",".join(query.get("hide", []))
    try:
        hidden = tuple(sorted({int(k) for k in text.split(",") if k}))
    except ValueError:
        return None
    return hidden if all(0 <= k < count for k in hidden) else None


def _resampled_from(view: MapView, slide: Slide) -> bool:
    """Whether the map's image is level ``geometry.level`` resampled to a coarser mpp (``--mpp`` between
    levels): ``floor(level size / factor)`` pixels of ``downsample`` level-0 pixels each."""
    g = view.geometry
    if g.level >= len(slide.shapes):
        return False
    factor = g.downsample / slide.downsample(g.level)
    if factor <= 1 + 1e-3:
        return False
    return all(size == math.floor(level / factor + 1e-9)
               for size, level in zip(g.image_shape[1:], slide.shapes[g.level], strict=True))


def _check_fits(view: MapView, slide: Slide) -> None:
    """Refuse a slide whose level ``geometry.level`` is not the image the map was computed on (as it is,
    or resampled to the map's ``downsample``)."""
    g = view.geometry
    expected = tuple(g.image_shape[1:])
    if _resampled_from(view, slide):
        return
    if g.level >= len(slide.shapes) or slide.shapes[g.level] != expected:
        got = "x".join(map(str, slide.shapes[g.level])) if g.level < len(slide.shapes) else "missing"
        raise FcconvError(
            f"The slide {str(slide.path)!r} does not match the map: the map was computed on an image of "
            f"{expected[0]}x{expected[1]} pixels (level {g.level}); the slide's level {g.level} is {got} "
            "(levels: " + ", ".join(f"{h}x{w}" for h, w in slide.shapes) + "). Give --slide the image the "
            "map was computed on.")
    level_downsample = slide.downsample(g.level)
    if abs(level_downsample - g.downsample) > 1e-3 * g.downsample:
        raise FcconvError(
            f"The slide {str(slide.path)!r} does not match the map: its level {g.level} is "
            f"{level_downsample:g} times smaller than level 0; the map says {g.downsample:g}. Give --slide "
            "the image the map was computed on.")


def _host_allowed(host_header: str | None) -> bool:
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host.lower() in LOOPBACK


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _refuse(self) -> None:
        self._send(_error(HTTPStatus.METHOD_NOT_ALLOWED), body=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815 - read-only

    def _answer(self, body: bool) -> None:
        if self.server.loopback_only and not _host_allowed(self.headers.get("Host")):
            response = _error(HTTPStatus.FORBIDDEN, "this viewer answers only requests to localhost")
        else:
            try:
                response = self.server.app.handle(self.path)
            except Exception as error:  # noqa: BLE001 - one bad tile must not stop the server
                self.server.errors.append(repr(error))
                response = _error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
        self._send(response, body)

    def _send(self, response: Response, body: bool) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.verbose:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: ViewerApp, verbose: bool) -> None:
        import socket

        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.app, self.verbose = app, verbose
        self.loopback_only = address[0] in LOOPBACK
        self.errors: list[str] = []


def make_server(app: ViewerApp, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False
                ) -> ThreadingHTTPServer:
    """A threading HTTP server answering ``app``'s routes on ``host:port`` (port 0: a free one).

    Call ``serve_forever()`` on it (in a thread for tests) and ``shutdown()`` to stop.

    Example:
        >>> server = make_server(ViewerApp(open_map("map.zarr")), port=8000)
        >>> server.serve_forever()
    """
    try:
        return _Server((host, port), app, verbose)
    except OSError as error:
        raise FcconvError(f"Cannot listen on {host}:{port}: {error.strerror or error}. Choose another "
                          "--port (0 picks a free one) or --host.") from None
