"""Writing output files atomically: a temporary file beside the target, renamed when complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fcconv.errors import FcconvError

__all__ = ["atomic_output"]


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
        FcconvError: if the temporary file cannot be created, synced or renamed.

    Example:
        >>> with atomic_output(Path("out.txt")) as tmp:
        ...     _ = tmp.write_text("done")
    """
    label = f"{what} to {str(path)!r}" if what else repr(str(path))
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
