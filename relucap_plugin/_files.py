"""Every file the package writes goes through here, so that no file is ever destroyed.

- :func:`check_target`: a path we are about to write must be a regular file or not exist yet
  (never a folder, device node, FIFO or socket), and an existing file must be one of ours
  (recognised by its first bytes) unless the caller says ``overwrite``.
- :func:`atomic_write`: temporary file in the target's folder, fsync, rename; an interrupted
  write leaves the old file whole. New files get the user's umask (``mkstemp`` would give
  0600), replaced files keep their mode.
- :func:`lock`: an advisory lock (``fcntl.flock``, POSIX only; a no-op elsewhere) on a sidecar
  ``.NAME.lock`` next to a results file, held while a run appends to it, so two processes
  never write one file; the sidecar is removed when the run ends.

Every error names the path the user gave, never a temporary file. Our own design.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileRefusedError", "Lock", "atomic_write", "check_target", "is_ours", "lock", "lock_path", "save_figure"]

#: The first bytes of the files we write, per kind.
_MAGIC = {
    "results": (b'{"format":"relucap-results"', b'{"format": "relucap-results"'),
    "checkpoint": (b"PK\x03\x04",),  # torch.save's zip container
    "adversarial": (),  # safetensors (see is_ours)
}


class FileRefusedError(ValueError):
    """A path that must not be written (not a regular file, or a file that is not ours)."""


def read_head(path: str, n: int = 64) -> bytes:
    """The first ``n`` bytes of the regular file ``path`` (never reads a special file)."""
    with open(path, "rb") as f:
        return f.read(n)


def _is_safetensors(head: bytes) -> bool:
    return len(head) > 8 and int.from_bytes(head[:8], "little") > 1 and head[8:9] == b"{"


def _is_results(path: str) -> bool:
    """Whether the first line (read up to 1 MiB) is a results header in any key order."""
    line = read_head(path, 1 << 20).split(b"\n", 1)[0]
    try:
        header = json.loads(line)
    except ValueError:
        return line.startswith(_MAGIC["results"])  # a header longer than 1 MiB
    return isinstance(header, dict) and header.get("format") == "relucap-results"


def is_ours(path: str, kind: str) -> bool:
    """Whether the existing regular file ``path`` starts like a ``kind`` file we write."""
    if kind == "results":
        return _is_results(path)
    head = read_head(path)
    if kind in ("checkpoint", "adversarial") and _is_safetensors(head):
        return True
    return head.startswith(_MAGIC[kind])


def check_target(path: str | os.PathLike, kind: str | None, *, overwrite: bool = False,
                 what: str = "path", hint: str = "choose another path") -> str:
    """``path`` as a string, after refusing what must not be written.

    A folder, device node, FIFO or socket is always refused (reading one could hang or never
    end, replacing one would destroy it). An existing regular file is refused unless it is a
    ``kind`` file of ours (see :func:`is_ours`; ``kind=None``: any file) or ``overwrite``.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{what} {path!r}: folder {folder!r} does not exist; "
                                    "create it first") from None
        return path
    if stat.S_ISDIR(st.st_mode):
        raise FileRefusedError(f"{what} {path!r} is a folder, but a file is expected here; "
                               f"{hint}")
    if not stat.S_ISREG(st.st_mode):
        raise FileRefusedError(f"{what} {path!r} is not a regular file (a device, FIFO or "
                               f"socket); relucap writes only regular files: {hint}")
    if kind is not None and not overwrite and st.st_size and not is_ours(path, kind):
        raise FileRefusedError(f"{what} {path!r} exists and is not a relucap {kind} file; "
                               f"it is left untouched: {hint}, or remove it yourself")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[str], None]) -> str:
    """Write ``data`` (bytes, text, or a function that writes a given file name) to ``path``
    atomically: a crash leaves either the old file or the new one, never a torn one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=folder)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path!r}: {exc.strerror}") from None
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, FileRefusedError):
            raise OSError(exc.errno, f"cannot write {path!r}: {exc.strerror or exc}") from None
        raise
    _fsync_folder(folder)
    return path


def save_figure(fig, path: str | os.PathLike, **kwargs) -> str:
    """``fig.savefig`` through :func:`atomic_write` (format from ``path``'s suffix, else PNG)."""
    path = check_target(path, None, what="figure")
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def lock_path(path: str) -> str:
    """The sidecar lock file of ``path``: ``folder/.NAME.lock``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.lock")


class Lock:
    """An exclusive advisory lock on ``path``'s sidecar, taken without waiting; the sidecar is
    removed on release (a lock taken on a sidecar that was removed meanwhile is taken again)."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        if fcntl is None:  # pragma: no cover
            return
        sidecar = lock_path(path)
        while True:
            fd = os.open(sidecar, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise FileRefusedError(
                    f"{path!r} is being written by another process (it holds the lock "
                    f"{sidecar!r}); wait for that run to finish or write to another out= path"
                ) from None
            try:
                same = os.stat(sidecar).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(lock_path(self.path))
            except FileNotFoundError:  # pragma: no cover
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextmanager
def lock(path: str) -> Iterator[Lock]:
    """Hold the advisory lock of ``path`` for the ``with`` block."""
    held = Lock(path)
    try:
        yield held
    finally:
        held.release()
