"""The local file-system backend.

Durability: every write goes to a hidden temporary file in the target's folder, is fsynced,
then renamed (or, for `write_if_absent`, hard-linked, which fails if the name exists) into
place, and the folder is fsynced. A crash therefore leaves either the old object, the new
one, or a hidden temporary file that listing ignores.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
import stat
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ckpt.storage._base import Store, concurrently
from ckpt.storage._errors import (
    ObjectNotFoundError,
    StorageError,
    UnreadableObjectError,
)

_TMP_MARK = ".ckpt-tmp-"


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


# Files looked at concurrently by `check_plain_files` with a list of keys.
_STATS_AT_ONCE = 16


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# statfs(2) f_type of the file systems whose syncfs(2) makes every file's data and every
# rename on them durable: ext2/3/4, xfs, btrfs. Only from Linux 5.8 does syncfs report the
# writeback errors recorded since the descriptor it is given was opened (`SyncPoint`).
_SYNCFS_FILE_SYSTEMS = frozenset({0xEF53, 0x58465342, 0x9123683E})
_SYNCFS_REPORTS_ERRORS = (5, 8)


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _fs_type(path: str) -> int | None:
    """The statfs(2) ``f_type`` of the file system holding ``path`` (its nearest existing
    folder), or None where that cannot be asked (not Linux)."""
    path = _existing(path)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    try:
        if _libc().statfs(os.fsencode(path), buf) != 0:
            return None
    except (AttributeError, OSError):
        return None
    return int(ctypes.c_long.from_buffer(buf).value)


def _kernel() -> tuple[int, int]:
    release = os.uname().release.split(".")
    try:
        return int(release[0]), int("".join(c for c in release[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def _syncfs_durable(path: str) -> bool:
    """Whether one ``syncfs`` makes writes below ``path`` durable and reports their
    writeback errors (`_SYNCFS_FILE_SYSTEMS`, `_SYNCFS_REPORTS_ERRORS`)."""
    return (sys.platform == "linux" and _kernel() >= _SYNCFS_REPORTS_ERRORS
            and _fs_type(path) in _SYNCFS_FILE_SYSTEMS)


def _existing(path: str) -> str:
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


class SyncPoint:
    """A descriptor on the file system holding ``path``, opened before the writes it is to
    make durable: syncfs(2) on it reports every writeback error the file system recorded
    since it was opened (Linux >= 5.8), including one that background writeback met before
    the sync began, which a descriptor opened at sync time would not see."""

    def __init__(self, path: str) -> None:
        self.path = _existing(path)
        self.fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        self._closer = weakref.finalize(self, os.close, self.fd)

    def sync(self) -> None:
        """syncfs(2); raises OSError on failure (a writeback error included)."""
        if _libc().syncfs(self.fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), self.path)

    def close(self) -> None:
        self._closer()


def _ignore_missing(func: object, path: str, exc_info: tuple[type, BaseException, object]) -> None:
    # Another deleter (a second manager's clean-up, `ckpt gc`) may remove entries first.
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


class LocalStore(Store):
    """Objects are files below a local folder (which need not exist until the first write)."""

    # Each read is a few system calls on a thread of this process: more threads than this
    # contend for the interpreter more than they overlap a cold disk's latency.
    readers_at_once = 8

    def _path(self, key: str) -> str:
        return os.path.join(self.location.path, *key.split("/")) if key else self.location.path

    def _error(self, exc: OSError, key: str, what: str) -> StorageError:
        return StorageError(exc.errno or errno.EIO,
                            f"{what} {self.describe(key)} failed: {exc.strerror or exc}")

    @contextlib.contextmanager
    def _regular(self, key: str, max_bytes: int | None) -> Iterator[tuple[int, int]]:
        """The open descriptor of the regular file at ``key`` of at most ``max_bytes``, and
        its size, for the reads below; closed after, and any `OSError` of theirs named as a
        `StorageError` of ``key``. O_NONBLOCK: opening a FIFO would otherwise wait for a
        writer forever; nothing is looked at before the open, which refuses what is not a
        file."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(errno.ENOENT, f"no object at {self.describe(key)}") from exc
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket (or a FIFO elsewhere)
                raise UnreadableObjectError(errno.EINVAL, f"{self.describe(key)} is not a "
                                                          "regular file") from exc
            raise self._error(exc, key, "reading") from exc
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise ObjectNotFoundError(errno.ENOENT, f"no object at {self.describe(key)}")
            if not stat.S_ISREG(info.st_mode):
                raise UnreadableObjectError(errno.EINVAL, f"{self.describe(key)} is not a "
                                                          "regular file")
            if max_bytes is not None and info.st_size > max_bytes:
                raise self._too_large(key, max_bytes)
            yield fd, info.st_size
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise self._error(exc, key, "reading") from exc
        finally:
            os.close(fd)

    def _read_into(self, key: str, buffer: memoryview) -> int:
        with self._regular(key, len(buffer)) as (fd, _):
            got = 0
            while got < len(buffer):  # the file may have grown since: never past the buffer
                n = os.readv(fd, [buffer[got:got + (1 << 30)]])  # some systems cap a call
                if not n:
                    return got
                got += n
            if os.read(fd, 1):
                raise self._too_large(key, len(buffer))
            return got

    def _read(self, key: str, max_bytes: int | None) -> bytes:
        with self._regular(key, max_bytes) as (fd, size):
            limit = size + 1 if max_bytes is None else max_bytes + 1
            chunks, got = [], 0
            while got < limit:  # the file may grow while read: never past the limit
                part = os.read(fd, min(limit - got, 1 << 24))
                if not part:
                    break
                chunks.append(part)
                got += len(part)
            if max_bytes is None:
                while part := os.read(fd, 1 << 24):
                    chunks.append(part)
            return b"".join(chunks)

    def _check_plain(self, prefix: str, key: str) -> None:
        path = self._path(f"{prefix}/{key}" if prefix else key)
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return  # absent: the reader reports that itself
        except OSError as exc:
            raise self._error(exc, f"{prefix}/{key}" if prefix else key, "checking") from exc
        if not stat.S_ISREG(mode):
            raise UnreadableObjectError(
                errno.EINVAL, f"{self.describe(f'{prefix}/{key}')} is not a regular file")

    def _check_plain_files(self, prefix: str, keys: list[str] | None) -> None:
        if keys is not None and len(keys) <= _STATS_AT_ONCE:
            for key in keys:
                self._check_plain(prefix, key)
            return
        if keys is not None:
            # On a cold cache each stat is a disk read: many run at once.
            for exc in concurrently(functools.partial(self._check_plain, prefix), keys,
                                    _STATS_AT_ONCE):
                if exc is not None:
                    raise exc
            return
        stack = [self._path(prefix)]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise self._error(exc, os.path.relpath(folder, self.location.path), "listing") \
                    from exc
            for entry in entries:
                # Folders are walked only if real (a link to `.` or `/` would never end);
                # a file may be a link to a regular file.
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif not entry.is_file(follow_symlinks=True):
                    rel = os.path.relpath(entry.path, self.location.path)
                    raise UnreadableObjectError(
                        errno.EINVAL, f"{self.describe(rel.replace(os.sep, '/'))} is not a "
                                      "regular file")

    def _write_tmp(self, key: str, parts: Iterable[bytes | memoryview]) -> tuple[str, str, int]:
        """Writes ``parts`` into a fresh temporary file beside ``key``'s, fsynced: its path,
        ``key``'s path and the bytes written. Removes it again if anything raises (a write,
        or the source of ``parts``)."""
        path = self._path(key)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}{_TMP_MARK}{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        written = 0
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                written += len(view)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp, path, written

    def _write(self, key: str, data: bytes) -> None:
        self._write_stream(key, (data,))

    _sync_point: SyncPoint | None = None  # opened by the first `sync_later` spec

    def _sync_later_options(self) -> dict[str, Any]:
        # TensorStore's file driver then skips its fsync of each file (and folder): `_sync`
        # makes them durable together, on a descriptor opened now, before those writes.
        # Asked once a store: a save asks for every array it opens.
        if self._sync_point is None:
            if not _syncfs_durable(self.location.path):
                return {}
            self._sync_point = SyncPoint(self.location.path)
        return {"file_io_sync": False}

    def _sync(self) -> None:
        # The descriptor stays open for the store's life (closed with it): saves sharing
        # this store object sync on it alike.
        if self._sync_point is not None:
            self._synced(self._sync_point)

    def _write_many(self, items: list[tuple[str, bytes]]) -> None:
        """Every object into its temporary file unsynced, one sync of the file system, the
        renames, one more sync: two syncs for the batch instead of two fsyncs an object, and
        the files made and renamed `_STATS_AT_ONCE` at a time (each is a few metadata
        operations the kernel serialises little). Only where ``syncfs`` is known to make
        every file's data and every rename of the file system durable (`_syncfs_durable`);
        elsewhere one `write` each."""
        if not _syncfs_durable(self.location.path):
            super()._write_many(items)
            return
        paths = {key: self._path(key) for key, _ in items}
        placed: dict[str, str] = {}  # key -> its temporary file, until renamed

        def make(item: tuple[str, bytes]) -> None:
            key, data = item
            path = paths[key]
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(path)}{_TMP_MARK}"
                                       f"{secrets.token_hex(6)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                placed[key] = tmp
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)

        def publish(key: str) -> None:
            os.replace(placed[key], paths[key])
            del placed[key]

        point = SyncPoint(self.location.path)  # before the writes: it sees their errors
        try:
            self._each(make, items)
            self._synced(point)  # the data first: a rename never names unsynced bytes
            self._each(publish, [key for key, _ in items])
            self._synced(point)
        finally:
            point.close()
            # (After an interrupt, threads of `_each` may still be adding to it: a copy.)
            for tmp in list(placed.values()):
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _synced(self, point: SyncPoint) -> None:
        try:
            point.sync()
        except OSError as exc:
            raise self._error(exc, "", "making durable the writes under") from exc

    def _each(self, fn: Callable[[Any], None], args: list[Any]) -> None:
        """``fn`` of every arg, `_STATS_AT_ONCE` at a time; the first failure (in order) is
        raised as a `StorageError` naming its key, once every call has ended."""
        for arg, exc in zip(args, concurrently(fn, args, _STATS_AT_ONCE), strict=True):
            if isinstance(exc, OSError):
                key = arg[0] if isinstance(arg, tuple) else arg
                raise self._error(exc, key, "writing") from exc
            if exc is not None:
                raise exc

    def _write_stream(self, key: str, parts: Iterable[bytes | memoryview]) -> int:
        try:
            tmp, path, written = self._write_tmp(key, parts)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
            _fsync_dir(os.path.dirname(path))
        except StorageError:
            raise  # from the source of ``parts`` (a read): its own words
        except OSError as exc:
            raise self._error(exc, key, "writing") from exc
        return written

    def _write_if_absent(self, key: str, data: bytes) -> bool:
        try:
            tmp, path, _ = self._write_tmp(key, (data,))
            try:
                # link(2) fails with EEXIST if the name exists, on every POSIX file system,
                # and publishes a fully written, fsynced file under the new name at once.
                os.link(tmp, path)
                created = True
            except FileExistsError:
                created = False
            finally:
                os.unlink(tmp)
            _fsync_dir(os.path.dirname(path))
            return created
        except OSError as exc:
            raise self._error(exc, key, "creating") from exc

    def _exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def _list(self, prefix: str) -> list[str]:
        top = self._path(prefix)
        if os.path.isfile(top):
            return [prefix]
        keys: list[str] = []
        for folder, _dirs, files in os.walk(top):
            rel = os.path.relpath(folder, self.location.path)
            rel = "" if rel == "." else rel.replace(os.sep, "/")
            keys.extend(f"{rel}/{f}" if rel else f for f in files if not _is_tmp(f))
        return keys

    def _list_sizes(self, prefix: str) -> dict[str, int]:
        out = {}
        for key in self._list(prefix):
            try:
                out[key] = os.stat(self._path(key)).st_size
            except FileNotFoundError:
                pass  # deleted since it was listed, or a link to nothing
            except OSError as exc:  # a link loop, a file it may not look at
                raise self._error(exc, key, "listing") from exc
        return out

    def _list_children(self, prefix: str) -> list[str]:
        try:
            return [n for n in os.listdir(self._path(prefix)) if not _is_tmp(n)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self._error(exc, prefix, "listing") from exc

    def _delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, key, "deleting") from exc

    def _delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, onerror=_ignore_missing)
            elif os.path.lexists(path):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, prefix, "deleting") from exc

    def _prune(self, prefix: str) -> None:
        # Not empty (a writer got there first), or already gone: either is fine.
        with contextlib.suppress(OSError):
            os.rmdir(self._path(prefix))

    def _kvstore_spec(self, prefix: str) -> dict[str, Any]:
        return {"driver": "file", "path": self._path(prefix).rstrip("/") + "/"}
