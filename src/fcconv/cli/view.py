"""``fcconv view MAP.zarr [--slide SLIDE] [--port N] [--host 127.0.0.1] [--no-browser]``.

Serves a deep-zoom page of the map (:mod:`fcconv.viewer`) over its slide until Ctrl-C. The server
reads only MAP.zarr and SLIDE, read-only, and listens on localhost unless ``--host`` says otherwise.
"""

from __future__ import annotations

import os
import socket
import sys
import webbrowser
from pathlib import Path

import click

from fcconv.errors import FcconvError

__all__ = ["command"]

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _url(host: str, port: int) -> str:
    shown = "localhost" if host in _LOOPBACK else host
    return f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"


def _hidden(text: str, names: list[str]) -> list[int]:
    """The class indices that ``--hide`` names (by name, or by index)."""
    hidden = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in names and not (name.isdigit() and int(name) < len(names)):
            listed = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise FcconvError(f"--hide {name!r} is not a class of the map; its classes are {listed}.")
        hidden.append(names.index(name) if name in names else int(name))
    return sorted(set(hidden))


def _announce(host: str, port: int, browser: bool) -> None:
    url = _url(host, port)
    click.echo(f"fcconv view: serving {url}  (Ctrl-C stops it)")
    if host in _LOOPBACK:
        click.echo(f"From another machine, forward the port over ssh and open {_url('localhost', port)}:\n"
                   f"  ssh -L {port}:localhost:{port} {socket.gethostname()}")
    if browser and _has_display():
        webbrowser.open(url)


def _has_display() -> bool:
    """A graphical browser can open here: not over ssh, and on Linux a display (never a text browser)."""
    if os.environ.get("SSH_CONNECTION") or os.environ.get("SSH_TTY"):
        return False
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


@click.command(
    "view",
    epilog="""\b
Examples:
  fcconv view big-map.zarr --slide big.tif
  fcconv view big-map.zarr --port 8765 --no-browser
  ssh -L 8765:localhost:8765 server     (then open http://localhost:8765/ here)

\b
Needs the tiles and cli extras: pip install 'fcconv[cli,tiles]'.""",
)
@click.argument("map_path", metavar="MAP.zarr", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--slide", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The image the map was computed on (a TIFF, pyramidal or not), shown under the map.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="The port to listen on (0: a free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on. Anything but localhost lets other machines read the map.")
@click.option("--hide", metavar="NAME,...", default="",
              help="Classes left uncoloured at first in the winning-class view, e.g. --hide background.")
@click.option("--no-browser", is_flag=True,
              help="Do not open a web browser (none opens over ssh or without a display anyway).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def command(map_path: Path, slide: Path | None, port: int, host: str, hide: str, no_browser: bool,
            verbose: bool) -> None:
    """Show MAP.zarr (written by fcconv heatmap -o) over its slide in a deep-zoom web page.

    Hover a cell to see its top-5 classes and its window; pick the winning class or one class's
    probability; a map still being written refreshes every few seconds.
    """
    from fcconv.viewer import ViewerApp, make_server, open_map, open_slide

    if host not in _LOOPBACK:
        click.echo(f"Warning: --host {host} lets every machine that reaches this one read the map and the "
                   "slide, without a password. Prefer the default and ssh -L.", err=True)
    view = open_map(map_path)
    app = ViewerApp(view, None if slide is None else open_slide(slide), hidden=_hidden(hide, view.classes))
    server = make_server(app, host, port, verbose=verbose)
    _announce(host, server.server_address[1], browser=not no_browser)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("fcconv view: stopped.")
    finally:
        server.server_close()
