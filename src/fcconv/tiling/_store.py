"""The zarr map on disk: a group created atomically, one writer at a time, chunks verified on resume.

Layout (the map store contract)::

    map.zarr/          zarr v3 group: {"fcconv": {version, identity, complete, geometry, classes}}
    map.zarr/0         the map (classes, *grid): a shard per tile, inner chunks of min(16, classes) classes
    map.zarr/.fcconv/  bookkeeping: the writer lock and its owner, one checksum file per written shard

A shard counts as finished only when it is on disk, fsynced, and its bytes match the checksum
recorded after it was written; anything else (truncated, zero-filled, deleted, or written when the
run was killed) is recomputed, with one line on the ``fcconv.tiling`` logger saying which.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcconv._deps import need_tiles as require
from fcconv.errors import FcconvError

__all__ = ["finished", "open_map", "open_output", "release_output", "stored_progress", "write_chunk"]

KEY = "fcconv"
VERSION = 1
MAP = "0"
BOOK = ".fcconv"
OLD_ATTRIBUTE = "fcconv_tiled_map"  # fcconv 0.2 wrote one bare array with this attribute
RERUN = "run the same command (or tiled_map call) again to recompute it"
log = logging.getLogger("fcconv.tiling")
_HELD: dict[str, Any] = {}  # store path -> the FileLock this process holds on it


# --- durable small writes ---------------------------------------------------------------------------

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        _fsync_file(path)


def _write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _sync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        _fsync_dir(Path(folder))


# --- what is at ``out`` ------------------------------------------------------------------------------

def _attributes(path: Path) -> dict[str, Any] | None:
    """The zarr.json of ``path`` as a dict, or None when it is missing or unreadable."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _state(path: Path) -> str:
    """``absent``, ``fcconv`` (a map of this version), ``old`` (fcconv 0.2), ``stub`` or ``foreign``."""
    if not path.exists() and not path.is_symlink():
        return "absent"
    if not path.is_dir():
        return "foreign"
    entries = {p.name for p in path.iterdir()}
    meta = _attributes(path)
    if meta is not None and KEY in meta.get("attributes", {}) and meta.get("node_type") == "group":
        return "fcconv"
    if meta is not None and OLD_ATTRIBUTE in meta.get("attributes", {}):
        return "old"
    # A stub that 0.2 left when creation failed: nothing but an empty, unreadable or bare zarr.json.
    if not entries or (entries <= {"zarr.json"} and (meta is None or not meta.get("attributes"))):
        return "stub"
    return "foreign"


def _refuse(path: Path, state: str, overwrite: bool) -> None:
    if state == "foreign":
        even = " (even with overwrite=True / --overwrite, which replaces only maps fcconv wrote)"
        raise FcconvError(
            f"out {str(path)!r} exists and is not a zarr map written by fcconv{even if overwrite else ''}; "
            "it was left as it is. Choose a new path (e.g. scores.zarr) or remove it yourself."
        )
    if state == "old" and not overwrite:
        raise FcconvError(
            f"out {str(path)!r} is a map of fcconv 0.2 (one bare zarr array, without the checksums that "
            "make a resume safe); it was left as it is. Pass overwrite=True (--overwrite) to replace it, "
            "or choose another path."
        )


def _layout(shape: Sequence[int], chunks: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shard, inner chunk): a shard per tile of cells, inner chunks of min(16, classes) classes."""
    classes = int(shape[0])
    inner = max(1, min(16, classes))
    shard = (-(-classes // inner) * inner, *map(int, chunks[1:]))
    return shard, (inner, *map(int, chunks[1:]))


# --- the lock ---------------------------------------------------------------------------------------

def _owner(book: Path) -> str:
    try:
        owner = json.loads((book / "lock.json").read_text())
        return f"pid {owner['pid']} on host {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def _lock(book: Path, wait: bool, path: Path) -> Any:
    """Take the writer lock of the store whose bookkeeping folder is ``book``; None if it is gone."""
    filelock = require("filelock")
    lock_path = book / "lock"
    lock = filelock.FileLock(str(lock_path), timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FcconvError(
            f"out {str(path)!r} is being written by another run ({_owner(book)}); nothing was changed. "
            "Wait for it to finish, or pass wait=True (--wait) to wait for it."
        ) from None
    except FileNotFoundError:  # the store was replaced or removed while we looked
        return None
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)  # filelock keeps it there
    try:
        same = fd is None or os.fstat(fd).st_ino == lock_path.stat().st_ino
    except OSError:
        same = False
    if not same:  # we locked a file that a replace or a release removed: look again
        lock.release()
        return None
    _write_durably(book / "lock.json", json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    return lock


def release_output(out: str | os.PathLike[str]) -> None:
    """Release the writer lock that :func:`open_output` took on ``out`` (nothing if none is held)."""
    lock = _HELD.pop(str(Path(out).expanduser().absolute()), None)
    if lock is not None:
        with contextlib.suppress(OSError):
            (Path(out).expanduser() / BOOK / "lock.json").unlink()
        lock.release()


# --- creating and replacing --------------------------------------------------------------------------

def _build(root: Path, shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype,
           attributes: dict[str, Any]) -> Any:
    zarr = require("zarr")
    group = zarr.open_group(str(root), mode="w", attributes={KEY: attributes}, zarr_format=3)
    shard, inner = _layout(shape, chunks)
    array = group.create_array(MAP, shape=tuple(shape), shards=shard, chunks=inner, dtype=dtype,
                               fill_value=np.nan, config={"write_empty_chunks": True})
    (root / BOOK / "chunks").mkdir(parents=True)
    return array


def _cannot_write(path: Path, error: OSError) -> FcconvError:
    return FcconvError(f"Cannot write out {str(path)!r}: {error.strerror or error}; nothing was changed "
                       "there. Free some space or choose a writable path.")


def _create(path: Path, shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype,
            attributes: dict[str, Any], wait: bool, replace: bool) -> Any:
    """Build the store in a temporary sibling, lock it, and rename it into place.

    Returns the held lock, or None when another run created ``path`` first (when not ``replace``).
    """
    if not path.parent.is_dir():
        raise FcconvError(f"Cannot write out {str(path)!r}: its folder {str(path.parent)!r} does not exist "
                          "or is not a folder. Choose a writable path.")
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".creating"))
    except OSError as error:
        raise _cannot_write(path, error) from None
    lock = None
    try:
        _build(tmp, shape, chunks, dtype, attributes)
        _sync_tree(tmp)
        lock = _lock(tmp / BOOK, wait, path)
        if replace:
            trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".replaced"))
            os.rename(path, trash / "old")
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(trash / "old", path)  # put the old store back as it was
                raise
            finally:
                if not (trash / "old").exists():
                    shutil.rmtree(trash, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.exists():
                    raise
                lock.release()
                shutil.rmtree(tmp, ignore_errors=True)
                return None
        _fsync_dir(path.parent)
        return lock
    except OSError as error:
        if lock is not None:
            lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cannot_write(path, error) from None
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _differences(saved: Any, identity: dict[str, Any]) -> list[str]:
    if not isinstance(saved, dict):
        return ["identity"]
    return [key for key in identity if saved.get(key) != identity[key]]


def _check_writable(path: Path) -> None:
    if not os.access(path, os.W_OK | os.X_OK):
        raise FcconvError(f"out {str(path)!r} is read-only; nothing was written. Make it writable or "
                          "choose another path.")


def open_output(out: str | os.PathLike[str], *, shape: Sequence[int], chunks: Sequence[int],
                dtype: np.dtype, identity: dict[str, Any], overwrite: bool,
                geometry: dict[str, Any] | None = None, classes: Sequence[str] | None = None,
                wait: bool = False) -> Any:
    """Create the map store ``out`` for this run, or reopen it to resume the same run; lock it.

    The caller holds the store's writer lock from here until :func:`release_output`.

    Args:
        out: a directory path for the zarr store.
        shape, chunks, dtype: the map's (``chunks``: the cells of one tile, classes first).
        identity: what identifies the run (image, model, tile, transform), JSON-compatible.
        overwrite: replace an ``out`` that holds another run's map (only a map fcconv wrote).
        geometry, classes: the group attributes of the contract, written at creation.
        wait: wait for another run that holds the lock, instead of refusing.

    Returns:
        the map: the zarr array ``out/0``.

    Raises:
        FcconvError: if ``out`` holds another run's map (unless ``overwrite``), is not a map fcconv
            wrote, is being written by another run, or cannot be written. Nothing is changed on
            disk in those cases.
    """
    path = Path(out).expanduser().absolute()
    identity = json.loads(json.dumps(identity))  # what the attributes give back (lists, not tuples)
    attributes = json.loads(json.dumps({"version": VERSION, "identity": identity, "complete": False,
                                        "geometry": geometry, "classes": classes}))
    if str(path) in _HELD:
        raise FcconvError(f"out {str(path)!r} is being written by this process already; wait for that "
                          "run to end or choose another path.")
    for _ in range(20):
        state = _state(path)
        _refuse(path, state, overwrite)
        if state == "absent":
            lock = _create(path, shape, chunks, dtype, attributes, wait, replace=False)
        elif state in ("stub", "old"):
            _check_writable(path)
            lock = _create(path, shape, chunks, dtype, attributes, wait, replace=True)
        else:
            _check_writable(path)
            (path / BOOK / "chunks").mkdir(parents=True, exist_ok=True)  # removed by hand: no shard trusted
            lock = _lock(path / BOOK, wait, path)
            if lock is not None:
                lock = _resume_or_replace(path, lock, shape, chunks, dtype, attributes, overwrite, wait)
        if lock is not None:
            _HELD[str(path)] = lock
            return _open_array(path)
    raise FcconvError(f"out {str(path)!r} kept changing while fcconv opened it (other runs replacing it?); "
                      "nothing was written. Run one at a time.")


def _resume_or_replace(path: Path, lock: Any, shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype,
                       attributes: dict[str, Any], overwrite: bool, wait: bool) -> Any:
    """Under the lock: the same run resumes; a store without identity or work is recreated."""
    saved = (_attributes(path) or {}).get("attributes", {}).get(KEY, {})
    identity = attributes["identity"]
    differs = _differences(saved.get("identity"), identity)
    try:
        array = _open_array(path)
        same_array = array.shape == tuple(shape) and array.dtype == dtype
    except Exception:  # noqa: BLE001 - a broken map array is replaced like any other difference
        same_array = False
    if not differs and same_array:
        for leftover in path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
        return lock
    empty = saved.get("identity") is None and not any((path / BOOK / "chunks").glob("*"))
    if not (overwrite or empty):
        lock.release()
        raise FcconvError(
            f"out {str(path)!r} holds another run's map (it differs in: {', '.join(differs) or 'shape'}); "
            "it was left as it is. Pass overwrite=True (--overwrite) to replace it, or choose another path."
        )
    try:
        return _create(path, shape, chunks, dtype, attributes, wait, replace=True)
    finally:
        with contextlib.suppress(OSError):
            lock.release()


@functools.lru_cache(maxsize=4)
def _cached_array(root: str, stamp: int) -> Any:
    return require("zarr").open_group(root, mode="r+")[MAP]


def _open_array(path: Path) -> Any:
    """The map array, opened once per process and store (a replaced store is reopened)."""
    return _cached_array(str(path), (path / MAP / "zarr.json").stat().st_ino)


# --- chunks and their checksums -----------------------------------------------------------------------

def _shard_key(array: Any, index: Sequence[int]) -> str:
    return str(array.metadata.encode_chunk_key((0, *index)))


def _record(root: Path, key: str) -> Path:
    return root / BOOK / "chunks" / key.replace("/", ".")


def _digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def write_chunk(path: str, cell_start: Sequence[int], values: np.ndarray) -> None:
    """Write one tile's scores (one shard of the map at ``path``), fsync it, record its checksum."""
    root = Path(path)
    array = _open_array(root)
    window = tuple(slice(s, s + n) for s, n in zip(cell_start, values.shape[1:]))
    array[(slice(None),) + window] = values
    index = tuple(int(s) // int(n) for s, n in zip(cell_start, array.shards[1:]))
    key = _shard_key(array, index)
    file = root / MAP / key
    _fsync_file(file)
    _fsync_dir(file.parent)
    _write_durably(_record(root, key), _digest(file))


def _problem(root: Path, key: str) -> str | None:
    """Why the shard ``key`` cannot be trusted, or None when it is fine or was never written."""
    file, record = root / MAP / key, _record(root, key)
    if not file.is_file():
        return "was deleted" if record.is_file() else None
    if not record.is_file():
        return "has no checksum (the run stopped while writing it)"
    try:
        if _digest(file) == record.read_text().strip():
            return None
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return "is damaged (its bytes differ from the checksum recorded when it was written)"


def finished(array: Any, path: str | os.PathLike[str], indices: Iterable[tuple[int, ...]]
             ) -> set[tuple[int, ...]]:
    """The tile indices whose shard is on disk and matches its checksum.

    A damaged shard (truncated, zero-filled, deleted, or never recorded) is removed, to be
    recomputed, and one line on the ``fcconv.tiling`` logger says which.
    """
    root = Path(path).expanduser()
    done: set[tuple[int, ...]] = set()
    for index in indices:
        key = _shard_key(array, index)
        problem = _problem(root, key)
        if problem is None:
            if (root / MAP / key).is_file():
                done.add(index)
            continue
        log.warning("Chunk %s/%s (tile %s) %s: recomputing it.", MAP, key, tuple(index), problem)
        (root / MAP / key).unlink(missing_ok=True)
        _record(root, key).unlink(missing_ok=True)
    return done


def damaged(array: Any, root: str | os.PathLike[str]) -> list[str]:
    """The shards of the map ``array`` (stored at ``root``) that are damaged, each with why."""
    base = Path(root)
    grid = [-(-int(s) // int(n)) for s, n in zip(array.shape[1:], array.shards[1:])]
    problems = []
    for index in np.ndindex(*grid):
        key = _shard_key(array, index)
        problem = _problem(base, key)
        if problem is not None:
            problems.append(f"{MAP}/{key} (tile {tuple(map(int, index))}) {problem}")
    return problems


def stored_progress(out: str | os.PathLike[str]) -> tuple[int, int]:
    """(tiles recorded on disk, tiles of the map) of the store ``out``."""
    root = Path(out).expanduser()
    array = require("zarr").open_group(str(root), mode="r")[MAP]
    total = int(np.prod([-(-int(s) // int(n)) for s, n in zip(array.shape[1:], array.shards[1:])]))
    return len(list((root / BOOK / "chunks").glob("c.*"))), total


def mark_complete(out: str | os.PathLike[str], complete: bool) -> None:
    """Set the ``complete`` attribute of the store ``out`` (the caller holds its lock)."""
    group = require("zarr").open_group(str(Path(out).expanduser()), mode="r+")
    attributes = dict(group.attrs[KEY])
    if attributes.get("complete") != complete:
        attributes["complete"] = complete
        group.attrs[KEY] = attributes
        _fsync_file(Path(out).expanduser() / "zarr.json")


def open_map(path: str | os.PathLike[str], *, verify: bool = True) -> Any:
    """The map array of a store written by :func:`tiled_map` (``path/0``), read-only.

    Args:
        path: the store, e.g. ``"scores.zarr"``.
        verify: check every shard against its checksum first (reads the map once).

    Raises:
        FcconvError: if ``path`` is not a map fcconv wrote, or a shard is damaged (it names the
            shard and the fix: run the same command again to recompute it).

    Example:
        >>> scores = open_map("scores.zarr")[:, :100, :100]
    """
    root = Path(path).expanduser()
    state = _state(root)
    if state != "fcconv":
        what = {"absent": "does not exist", "old": "is a map of fcconv 0.2 (one bare zarr array); "
                "read it with zarr.open_array, or rerun with overwrite=True (--overwrite) to rewrite it"}
        raise FcconvError(f"{str(root)!r} {what.get(state, 'is not a map written by fcconv')}.")
    array = require("zarr").open_group(str(root), mode="r")[MAP]
    if verify:
        problems = damaged(array, root)
        if problems:
            raise FcconvError(f"The map {str(root)!r} has {len(problems)} damaged chunk(s): "
                              f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. To fix it, "
                              f"{RERUN}.")
    return array


def damage_report(array: Any) -> str | None:
    """A sentence naming the damaged shards of a zarr map array on a local store, if any."""
    store = getattr(getattr(array, "store_path", None), "store", None)
    root = getattr(store, "root", None)
    if root is None or str(getattr(array, "path", "")).rsplit("/", 1)[-1] != MAP:
        return None
    base = Path(root) / str(array.path).rsplit("/", 1)[0] if "/" in str(array.path) else Path(root)
    try:
        problems = damaged(array, base)
    except Exception:  # noqa: BLE001 - the report is a courtesy on top of a read error
        return None
    if not problems:
        return None
    return f"damaged chunk(s) {'; '.join(problems[:5])}. To fix it, {RERUN}"
