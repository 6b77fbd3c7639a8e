"""Output files: one check of an output path before any work, and one atomic writer."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from fcconv.errors import FcconvError

__all__ = ["IMAGE_SUFFIXES", "atomic_output", "check_output_path", "check_output_store", "image_format"]

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
"""The picture formats fcconv writes (through matplotlib)."""


def check_output_path(path: str | os.PathLike[str], *, what: str = "the output",
                      suffixes: Sequence[str] | None = None) -> Path:
    """``path`` as a :class:`Path` if a file can be written there, else an :class:`FcconvError`.

    Checked before any work: not a folder, nor an existing device, FIFO or socket (which a write
    would replace by a regular file), one of ``suffixes`` (when given), in a folder that exists
    and is writable.

    Example:
        >>> check_output_path("fcconv-demo.png", suffixes=IMAGE_SUFFIXES)
        PosixPath('fcconv-demo.png')
    """
    out = Path(path).expanduser()
    where = f"Cannot write {what} to {str(out)!r}"
    if out.is_dir():
        raise FcconvError(f"{where}: it is a folder. Give a file name.")
    _refuse_special(out, where)
    if suffixes and out.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        raise FcconvError(
            f"{where}: expected a {names} file; got {out.suffix or 'no extension'!r}. "
            f"Use e.g. {out.stem or 'out'}{suffixes[0]}."
        )
    folder = out.parent
    if not folder.is_dir():
        raise FcconvError(
            f"{where}: folder {str(folder)!r} does not exist. Create it or choose another path."
        )
    if not os.access(folder, os.W_OK):
        raise FcconvError(f"{where}: folder {str(folder)!r} is not writable. Choose another path.")
    return out


def check_output_store(path: str | os.PathLike[str], *, what: str = "the map") -> Path:
    """``path`` as a :class:`Path` if a store (a folder) can be written there, else an :class:`FcconvError`.

    An existing folder is accepted (a store to resume); a device, a FIFO or a socket is refused. A
    regular file or a missing folder is left to the store, which refuses it naming what it found.
    """
    out = Path(path).expanduser()
    where = f"Cannot write {what} to {str(out)!r}"
    if out.is_dir():
        return out
    _refuse_special(out, where)
    return out


def _special_kind(path: Path) -> str | None:
    """``"a FIFO"``, ``"a device"``... for an existing path that is neither a regular file nor a folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _refuse_special(path: Path, where: str) -> None:
    kind = _special_kind(path)
    if kind is not None:
        raise FcconvError(f"{where}: it exists and is {kind}, not a regular file; writing would replace it. "
                          "Choose another output path.")


def image_format(path: str | os.PathLike[str]) -> str:
    """The matplotlib format of a picture path: ``'png'``, ``'jpeg'`` for ``.jpg``..."""
    return Path(path).suffix.lower().lstrip(".").replace("jpg", "jpeg") or "png"


@contextlib.contextmanager
def atomic_output(path: Path, *, what: str | None = None) -> Iterator[Path]:
    """Yield a temporary file beside ``path``; on success it is synced and renamed to ``path``.

    The temporary file is created on entry, so an unwritable place fails before any work is done.
    If the block raises, or the sync or rename fails, the temporary file is removed and ``path`` is
    left as it was: no partial file is ever visible under ``path``.

    Args:
        path: the file to write.
        what: what is written, for messages (``"the demo picture"``).

    Raises:
        FcconvError: if ``path`` is a device, FIFO or socket, or the temporary file cannot be
            created, synced or renamed.

    Example:
        >>> with atomic_output(Path("out.txt")) as tmp:
        ...     _ = tmp.write_text("done")
    """
    label = f"{what} to {str(path)!r}" if what else repr(str(path))
    _refuse_special(path, f"Cannot write {label}")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    except OSError as error:
        raise FcconvError(
            f"Cannot write {label}: {error.strerror or error}. Choose another output path."
        ) from None
    os.close(fd)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # the permissions of a file created as usual, not mkstemp's 0600
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _refuse_special(path, f"Cannot write {label}")  # made since the start: still never replaced
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise FcconvError(
            f"Cannot write {label}: {error.strerror or error}. Nothing was written; free some space or "
            "choose another output path."
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
