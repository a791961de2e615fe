"""Object-store URLs: recognising one, parsing it, refusing unsupported schemes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cmdtool.errors import UsageError

_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://(?P<rest>.*)$", re.DOTALL)

#: Schemes obstore serves (``s3a`` is an alias of ``s3``; ``abfs``/``abfss`` of ``az``).
SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "memory")
_SHOWN = ("s3", "gs", "az", "memory")


@dataclass(frozen=True)
class ObjectURL:
    """A parsed object-store URL.

    Attributes
    ----------
    scheme : str
        Lower-case scheme, one of :data:`SCHEMES`.
    bucket : str
        Bucket (container) name; for ``memory://`` the first path segment (may be "").
    prefix : str
        Key prefix inside the bucket, without leading or trailing ``/`` ("" = root).
    """

    scheme: str
    bucket: str
    prefix: str

    @property
    def root(self) -> str:
        """``scheme://bucket`` (the bucket's URL)."""
        return f"{self.scheme}://{self.bucket}"

    def __str__(self) -> str:
        return f"{self.root}/{self.prefix}" if self.prefix else self.root

    def key(self, *parts: str) -> str:
        """The bucket-relative key of ``parts`` below the prefix."""
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def child(self, *parts: str) -> ObjectURL:
        """The URL of ``parts`` below this one."""
        return ObjectURL(self.scheme, self.bucket, self.key(*parts))


def is_url(s: object) -> bool:
    """Whether ``s`` is a ``scheme://...`` string (supported or not), not a local path.

    A Windows drive path (``C:\\x``) is not a URL: a scheme needs two or more letters.
    """
    return isinstance(s, str) and _URL_RE.match(s) is not None


def parse(url: str, *, what: str = "URL") -> ObjectURL:
    """Parse ``url`` into scheme, bucket and prefix.

    Parameters
    ----------
    url : str
        ``s3://bucket/prefix`` (or ``gs://``, ``az://``, ``memory://``).
    what : str
        How the error names the argument (``"SOURCE"``, ``"STORE"``).

    Raises
    ------
    UsageError
        Not a URL, an unsupported scheme, or no bucket (exit 2), naming ``url``.
    """
    m = _URL_RE.match(url)
    if m is None:
        raise UsageError(f"{what} {url!r} is not an object-store URL (scheme://bucket/prefix)")
    scheme = m["scheme"].lower()
    if scheme not in SCHEMES:
        raise UsageError(
            f"{what} {url}: unsupported URL scheme {scheme!r}; use a local path or one of "
            + ", ".join(f"{s}://" for s in _SHOWN)
        )
    scheme = {"s3a": "s3", "abfs": "az", "abfss": "az"}.get(scheme, scheme)
    rest = m["rest"].rstrip("/")
    bucket, _, prefix = rest.partition("/")
    if not bucket and scheme != "memory":
        raise UsageError(f"{what} {url}: the URL names no bucket")
    if any(part in (".", "..") for part in prefix.split("/")) or "//" in prefix:
        raise UsageError(f"{what} {url}: '.', '..' or empty segments are not allowed in a key")
    return ObjectURL(scheme, bucket, prefix.strip("/"))
