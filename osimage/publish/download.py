"""Files from the mirror into a local cache keyed by sha256: streamed, resumed, verified.

A file is written to CACHE/SHA256.part while its sha256 is computed from the same bytes; a
broken transfer is resumed with an HTTP Range request (after the bytes already in .part are
hashed once), a few times within one call and again by the next build. Only a file whose size
and sha256 are right is renamed to CACHE/SHA256, so a file in the cache is always one that was
verified when it arrived. A resumed file whose sha256 is wrong once complete may owe that to
the bytes kept in .part (a disk error, a killed writer): it is downloaded once more from byte 0,
and only a file that is wrong when downloaded whole is the mirror's fault.

The cache is ~/.cache/osimage/patches/ ($XDG_CACHE_HOME honoured):
outside the repository, so every clone and `rm -rf build/` share it, and content-addressed, so
sharing is safe; a lock per sha256 keeps two builds from writing the same file.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from osimage.errors import BuildError, ConfigError
from osimage.fsutil import waiting_lock
from osimage.netreason import http_status
from osimage.netreason import reason as _reason
from osimage.runner import check_interrupted

CHUNK = 1 << 20
ATTEMPTS = 3  # transfers per call; a later build resumes what is left
RETRY_PAUSE = 0.5
HTTP_TIMEOUT = (10.0, 60.0)  # connect, between two reads
MAX_UNSIZED = 32 << 30  # a file of unknown size may not grow beyond this


class DownloadError(BuildError):
    """The file could not be fetched whole, or it is not the file expected."""


@dataclass(frozen=True)
class Fetched:
    path: Path  # the verified file in the cache
    downloaded: int  # bytes transferred by this call (0 when it was in the cache)
    resumed_at: int  # bytes that were already in .part, or 0
    seconds: float

    @property
    def from_cache(self) -> bool:
        return self.downloaded == 0 and self.resumed_at == 0


class _Broken(Exception):
    """The transfer stopped early; what arrived is kept in .part."""


@dataclass(frozen=True)
class Source:
    """Where mirror paths are read: an http(s):// base URL, or a local mirror folder."""

    base: str

    @property
    def is_http(self) -> bool:
        return self.base.startswith(("http://", "https://"))

    def describe(self) -> str:
        return f"mirror {self.base}" if self.is_http else f"local mirror {self.base}"

    def url(self, path: str) -> str:
        return f"{self.base.rstrip('/')}/{quote(path)}"

    def exists(self, path: str) -> bool:
        if not self.is_http:
            return (Path(self.base) / path).exists()
        import requests

        try:
            r = requests.head(self.url(path), timeout=HTTP_TIMEOUT, allow_redirects=True)
        except requests.RequestException as e:
            raise DownloadError(f"{self.describe()}: cannot look up {path}: {_reason(e)}") from None
        return r.status_code == 200

    def stream(self, path: str, start: int) -> tuple[int, int | None, Iterator[bytes]]:
        """(offset the bytes start at, total size if known, the bytes)."""
        return _http_stream(self, path, start) if self.is_http else _file_stream(self, path, start)


def source_for(site_data: dict[str, Any], root: Path, shown: str = "site.yaml") -> Source:
    """The site's mirror.http, else its local mirror folder (an ssh:// mirror needs http);
    shown names the site file in errors."""
    mirror = site_data["mirror"]
    if mirror.get("http"):
        return Source(str(mirror["http"]))
    url = str(mirror["url"])
    if "://" in url and not url.startswith("file://"):
        raise ConfigError(f"{shown}: mirror.http: needed to download patch tarballs, as "
                          f"mirror.url {url} is not a local folder")
    path = Path(url.removeprefix("file://"))
    return Source(str(path if path.is_absolute() else root / path))


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _http_stream(src: Source, path: str, start: int) -> tuple[int, int | None, Iterator[bytes]]:
    import requests

    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        r = requests.get(src.url(path), headers=headers, stream=True, timeout=HTTP_TIMEOUT)
    except requests.ConnectionError as e:
        raise _Broken(f"cannot connect: {_reason(e)}") from None
    except requests.RequestException as e:
        raise _Broken(_reason(e)) from None
    if r.status_code == 404:
        r.close()
        raise DownloadError(f"{path}: not on the {src.describe()} (HTTP 404)")
    if r.status_code == 416 and start:  # .part already holds the whole file
        whole = r.headers.get("Content-Range", "").rpartition("/")[2]
        r.close()
        return start, int(whole) if whole.isdigit() else None, iter(())
    if r.status_code not in (200, 206):
        r.close()
        raise DownloadError(f"{path}: {http_status(r.status_code, r.reason)} from the "
                            f"{src.describe()}")
    offset, total = 0, _int(r.headers.get("Content-Length", ""))
    if r.status_code == 206:
        # Content-Range: bytes START-END/TOTAL
        span, _, whole = r.headers.get("Content-Range", "").partition("/")
        first = _int(span.removeprefix("bytes ").partition("-")[0])
        offset = -1 if first is None else first
        total = _int(whole)
        if offset != start:
            r.close()
            raise _Broken(f"the server resumed at byte {offset}, not {start}")

    def body() -> Iterator[bytes]:
        import urllib3

        try:
            # the bytes as stored: never undo a Content-Encoding before hashing
            yield from r.raw.stream(CHUNK, decode_content=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise _Broken(_reason(e)) from None
        finally:
            r.close()

    return offset, total, body()


def _file_stream(src: Source, path: str, start: int) -> tuple[int, int | None, Iterator[bytes]]:
    target = Path(src.base) / path
    try:
        f = target.open("rb")
    except FileNotFoundError:
        raise DownloadError(f"{path}: not on the {src.describe()}") from None
    except OSError as e:
        raise DownloadError(f"{path}: cannot read it on the {src.describe()}: "
                            f"{e.strerror}") from None
    total = os.fstat(f.fileno()).st_size
    f.seek(min(start, total))

    def body() -> Iterator[bytes]:
        with f:
            while block := f.read(CHUNK):
                yield block

    return min(start, total), total, body()


class _Part:
    """SHA256.part and the sha256 of the bytes in it, kept in step with every write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self.size = 0
        if path.exists():  # a transfer an earlier build left: hash what it got, once
            with path.open("rb") as f:
                while block := f.read(CHUNK):
                    self.hasher.update(block)
                    self.size += len(block)

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.hasher = hashlib.sha256()
        self.size = 0


def fetch(src: Source, path: str, sha256: str, size: int | None, cache: Path,
          say: Callable[[str], None] = lambda _: None) -> Fetched:
    """The verified local copy of the mirror's path: from the cache, or downloaded into it."""
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / sha256
    t0 = time.monotonic()
    with waiting_lock(cache / f"{sha256}.lock",
                      lambda: say(f"    waiting for another download of {path}")):
        if final.is_file():
            return Fetched(final, 0, 0, 0.0)
        part = _Part(cache / f"{sha256}.part")
        if size is not None and part.size > size:
            part.restart()
        resumed_at = part.size
        before = part.size
        for fresh in (False, True):
            resumed = _download(src, path, part, size, say)
            digest = part.hasher.hexdigest()
            if digest == sha256:
                break
            if not fresh and resumed:
                # the bytes kept from an earlier transfer may be the damaged ones, not the
                # mirror's file: one whole download tells
                say(f"    {path}: the partial download kept in the cache ({part.path}) was "
                    f"damaged (sha256 {digest[:16]}... once complete); downloading it again "
                    "from byte 0")
                part.restart()
                resumed_at = before = 0
                continue
            part.restart()
            raise DownloadError(f"{path}: sha256 {digest[:16]}... downloaded whole from the "
                                f"{src.describe()}, the release says {sha256[:16]}...; refused")
        with part.path.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(part.path, final)
    return Fetched(final, max(0, part.size - before), resumed_at, time.monotonic() - t0)


def _download(src: Source, path: str, part: _Part, size: int | None,
              say: Callable[[str], None]) -> bool:
    """Complete part from the mirror, resuming a broken transfer a few times; whether any of
    its bytes came from before a resume (an earlier build's or an earlier attempt's)."""
    resumed = False
    problem = ""
    for attempt in range(ATTEMPTS):
        check_interrupted()
        if attempt:
            say(f"    {problem}; resuming at byte {part.size}")
            time.sleep(RETRY_PAUSE * attempt)
        resumed = resumed or part.size > 0
        try:
            _transfer(src, path, part, size)
        except _Broken as e:
            problem = str(e)
            continue
        if size is not None and part.size != size:
            part.restart()
            raise DownloadError(f"{path}: the {src.describe()} has {part.size} bytes, the "
                                f"release says {size}: truncated or replaced; refused")
        return resumed
    raise DownloadError(f"{path}: the download from the {src.describe()} broke off "
                        f"{ATTEMPTS} times ({problem}); {part.size} bytes are kept in "
                        f"{part.path} and the next build resumes there")


def _transfer(src: Source, path: str, part: _Part, size: int | None) -> None:
    """Append the rest of path to part.path."""
    offset, total, body = src.stream(path, part.size)
    if size is not None and total is not None and total != size:
        close = getattr(body, "close", None)
        if close is not None:
            close()
        raise DownloadError(f"{path}: the {src.describe()} has {total} bytes, the release "
                            f"says {size}: truncated or replaced; refused")
    if offset != part.size:  # the server sent the whole file again: start over
        part.restart()
    limit = size if size is not None else (total if total is not None else MAX_UNSIZED)
    got = 0
    with part.path.open("ab") as f:
        for block in body:
            if part.size + len(block) > limit:
                raise DownloadError(f"{path}: the {src.describe()} sends more than the "
                                    f"{limit} bytes expected; refused")
            f.write(block)
            part.hasher.update(block)
            part.size += len(block)
            got += len(block)
            if got % (64 * CHUNK) < len(block):
                check_interrupted()
    if total is not None and part.size < total:
        raise _Broken(f"the transfer ended at byte {part.size} of {total}")
