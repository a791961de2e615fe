"""One-line cmdtool errors for object-store failures (naming the URL, never a secret).

=======================================  ====================================  ====
failure                                   cmdtool error                          exit
=======================================  ====================================  ====
bucket does not exist (``NoSuchBucket``)  :class:`~cmdtool.errors.NotFoundError`  3
key does not exist                        :class:`~cmdtool.errors.NotFoundError`  3
missing / refused credentials, denied     :class:`~cmdtool.errors.ObjectStoreError` 11
network: refused, reset, timed out        :class:`~cmdtool.errors.ObjectStoreError` 11
anything else from the client             :class:`~cmdtool.errors.ObjectStoreError` 11
=======================================  ====================================  ====
"""

from __future__ import annotations

import os
import re

from cmdtool.errors import CmdtoolError, NotFoundError, ObjectStoreError

_DENIED_CODES = (
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "AllAccessDisabled", "AuthorizationHeaderMalformed",
)
_NETWORK = (
    ("connection refused", "connection refused"),
    ("connection reset", "connection reset"),
    ("broken pipe", "connection dropped"),
    ("connection closed", "connection dropped"),
    ("incompletemessage", "connection dropped"),
    ("error sending request", "the server cannot be reached"),
    ("timed out", "timed out"),
    ("timeout", "timed out"),
    ("dns error", "the host name cannot be resolved"),
    ("failed to lookup address", "the host name cannot be resolved"),
)


def _scrub(text: str) -> str:
    """``text`` with any configured secret replaced by ``***``."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def reason(exc: BaseException) -> str:
    """A short reason from a client error (obstore's text spans lines and XML)."""
    text = _scrub(str(exc))
    code = re.search(r"<Code>([^<]+)</Code>", text)
    status = re.search(r"status(?: code)?:? (\d{3})", text)
    if code is not None:
        return code[1] + (f" (HTTP {status[1]})" if status else "")
    low = text.lower()
    for needle, said in _NETWORK:
        if needle in low:
            return said
    if status is not None:
        return f"HTTP {status[1]}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def translate(exc: BaseException, url: str) -> CmdtoolError:
    """The cmdtool error for a client failure ``exc`` while using ``url``.

    Parameters
    ----------
    exc : BaseException
        What obstore (or the OS) raised; a CmdtoolError is returned unchanged.
    url : str
        The URL (bucket, prefix or object) the failing request was about.

    Returns
    -------
    CmdtoolError
        One line naming ``url``: NotFoundError (exit 3) for a missing bucket or key,
        ObjectStoreError (exit 11) for credentials, access and network failures.
    """
    if isinstance(exc, CmdtoolError):
        return exc
    why = reason(exc)
    name = type(exc).__name__
    text = str(exc)
    if "NoSuchBucket" in text:
        return NotFoundError(f"{url}: the bucket does not exist")
    if name in ("PermissionDeniedError", "UnauthenticatedError") or any(
        c in why for c in _DENIED_CODES
    ):
        return ObjectStoreError(f"{url}: access denied ({why})")
    if name == "NotFoundError" or isinstance(exc, FileNotFoundError) or "NoSuchKey" in text:
        return NotFoundError(f"{url}: no such object")
    if any(needle in text.lower() for needle, _ in _NETWORK) or isinstance(
        exc, ConnectionError | TimeoutError
    ):
        return ObjectStoreError(f"{url}: network error: {why}")
    return ObjectStoreError(f"{url}: object store error: {why}")
