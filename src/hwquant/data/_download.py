"""Atomic file download with MD5 verification (only used by the explicit ``download_*`` functions)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from hwquant.errors import DataError

__all__ = ["download_file", "md5_of"]

_CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    """Hex MD5 digest of a file (identifies the published dataset files; not a security check)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str | None = None, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically.

    The body is streamed into a temporary file in ``dest``'s directory, its MD5 is compared with ``md5``
    (when given), and only then is it moved into place with :func:`os.replace`, so ``dest`` either does not
    exist or is complete.  An existing ``dest`` is kept as is (no download, no check).

    Raises:
        DataError: network failure or checksum mismatch (the partial file is removed).
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if md5 is not None and got != md5:
            raise DataError(f"download of {url} has MD5 {got}, expected {md5}; not saved to {dest}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"cannot download {url} to {dest}: {reason}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest
