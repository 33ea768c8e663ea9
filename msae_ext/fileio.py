"""Atomic file writes shared by every stage that must never leave half a file behind
(embedding shards and manifests, checkpoints, SAE configs)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class FileFormatError(ValueError):
    """A file that is not what its name says it is."""


NPY_MAGIC = b"\x93NUMPY"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_npy(path: str | Path, mmap_mode: str | None = None):
    """An .npy array, never unpickled: a file of Python objects (which would run code when loaded),
    a file of another kind named .npy, and a truncated file each get an error that says which."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        what = "pickled Python data, which would run code when loaded" if head[:1] == b"\x80" else \
            f"not an .npy file (it starts with {head!r})"
        raise FileFormatError(f"{path}: {what}")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Python objects" in str(e):  # dtype object: its items are pickled
            raise FileFormatError(f"{path}: an array of Python objects, which would run code when loaded") from None
        raise FileFormatError(f"{path}: not a readable .npy file (corrupt or truncated?): {e}") from None
    except (OSError, EOFError) as e:
        raise FileFormatError(f"{path}: not a readable .npy file (corrupt or truncated?): {e}") from None


def plain_name(name: str, what: str) -> str:
    """`name` as one path component of a folder the user named (a file or subfolder name), or a
    ValueError: no separators, no '..', nothing absolute, so nothing lands outside that folder."""
    text = str(name)
    if (not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text or text.startswith("~")
            or Path(text).is_absolute()):
        raise ValueError(f"{what} {text!r} must be a plain name (no path separators, no '..'): it names a "
                         "file or folder inside the output folder")
    return text


def inside(base: Path, relative: str, what: str) -> Path:
    """base / relative, refused when `relative` is absolute or climbs out of `base`."""
    if Path(relative).is_absolute():
        raise ValueError(f"{what} {relative!r} is an absolute path; it must be relative to {base}")
    path = (base / relative).resolve()
    root = base.resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{what} {relative!r} points outside {base}")
    return path


class FolderBusyError(ValueError):
    """Another live process is writing the folder the user named."""


LOCK_FILE = ".msae.lock"
_held: dict[Path, tuple[object, int]] = {}  # folder -> (open lock file, depth): re-entrant in a process


@contextlib.contextmanager
def exclusive(folder: str | Path, what: str):
    """Hold `folder` as its one writer while the block runs: a second process asking for it gets
    FolderBusyError naming the holder's process. The lock is the kernel's (flock), so a killed
    holder's lock is gone with it and the next run takes the folder over."""
    import fcntl

    folder = Path(folder).resolve()
    if folder in _held:  # this process holds it already (a recipe run trains into its own folder)
        f, depth = _held[folder]
        _held[folder] = (f, depth + 1)
        try:
            yield
        finally:
            _held[folder] = (f, _held[folder][1] - 1)
        return
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise FolderBusyError(f"{folder} is being written by {holder}; wait for it to finish, or choose another "
                              "folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} ({what})")
    f.flush()
    _held[folder] = (f, 1)
    try:
        yield
    finally:
        if _held[folder][1] <= 1:
            del _held[folder]
            f.close()  # releases the lock
