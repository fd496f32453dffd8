"""URL parsing: one function from a user's URL to a `Location`.

Accepted forms: a plain path, ``file://PATH``, ``gs://BUCKET/PREFIX``, ``s3://BUCKET/PREFIX``,
``memory://NAME/PREFIX``. Called by `open_store`, on any process, before any I/O.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse

from ckpt.storage._errors import UnsupportedURLError

SCHEMES = ("file", "memory", "gs", "s3")


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a store's root is.

    Attributes:
        scheme: one of `SCHEMES`.
        bucket: bucket name for ``gs``/``s3``, store name for ``memory``, empty for ``file``.
        path: the prefix inside the bucket (no leading or trailing ``/``), or for ``file`` an
            absolute, normalised local path.
    """

    scheme: str
    bucket: str
    path: str

    @property
    def url(self) -> str:
        """The canonical URL of this location."""
        if self.scheme == "file":
            return self.path
        tail = f"/{self.path}" if self.path else ""
        return f"{self.scheme}://{self.bucket}{tail}"

    def child(self, name: str) -> Location:
        """The location of ``name`` (already a validated relative key) below this one."""
        if self.scheme == "file":
            return Location("file", "", os.path.join(self.path, name))
        path = f"{self.path}/{name}" if self.path else name
        return Location(self.scheme, self.bucket, path)


    def parent(self) -> Location | None:
        """The location one level up, or None at a file system's or bucket's root."""
        if self.scheme == "file":
            up = os.path.dirname(self.path)
            return None if up == self.path else Location("file", "", up)
        if not self.path:
            return None
        return Location(self.scheme, self.bucket, self.path.rpartition("/")[0])


def parse_url(url: str | os.PathLike[str]) -> Location:
    """Parses a checkpoint URL.

    Args:
        url: a plain path or a URL in one of the accepted forms.

    Returns:
        The `Location`.

    Raises:
        UnsupportedURLError: unknown scheme, a missing bucket, or an empty URL.
    """
    text = os.fspath(url)
    if not text:
        raise UnsupportedURLError("empty checkpoint URL")
    if "\x00" in text:
        raise UnsupportedURLError(f"checkpoint URL contains a NUL byte: {text!r}")
    if "://" not in text:
        return Location("file", "", os.path.abspath(os.path.expanduser(text)))
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise UnsupportedURLError(
            f"unknown URL scheme {scheme!r} in {text!r}; supported: "
            + ", ".join(f"{s}://" for s in SCHEMES)
            + " and plain paths"
        )
    if scheme == "file":
        path = urllib.parse.unquote(rest)
        if not path.startswith("/"):
            raise UnsupportedURLError(f"file:// URL must hold an absolute path: {text!r}")
        return Location("file", "", os.path.normpath(path))
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UnsupportedURLError(f"URL {text!r} names no bucket")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UnsupportedURLError(f"URL {text!r} contains '.' or '..' path segments")
    return Location(scheme, bucket, "/".join(parts))
