"""Moving one file from a URL (http, https, file) into a partial file: resume, retries, timeouts.

The standard library's ``urllib`` does the HTTP (proxies from ``http_proxy``/``https_proxy``
work as usual). An interrupted transfer leaves ``<partial>`` and ``<partial>.json`` (the URL and
the server's ETag / Last-Modified); the next attempt, in this process or a later one, asks for the
rest with ``Range`` and ``If-Range``, so a server whose file changed in between sends it whole.
"""

from __future__ import annotations

import errno
import http.client
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rmt.data.labels import is_decimal
from rmt.errors import DownloadError, ZooError, first_line
from rmt.models.checkpoint import looks_like_html

Progress = Callable[[int, Optional[int]], None]  # (bytes so far, total bytes or None)
Notify = Callable[[str], None]  # a human-readable status line

_CHUNK = 1 << 20
_TRANSIENT_HTTP = {408, 425, 429}  # and every 5xx: a server's trouble may pass
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_MAX_BACKOFF_S = 30.0
_MAX_TIMEOUT_S = 86400.0  # a day; far beyond it, sockets refuse the value (it overflows their clock)


@dataclass(frozen=True)
class TransferOptions:
    """How patient a transfer is.

    Attributes:
        timeout_s: seconds to wait for a connection or for the next bytes.
        retries: further attempts after a transient failure (dropped connection, timeout,
            HTTP 408/425/429/5xx); each resumes where the last one stopped.
        backoff_s: wait before retry n is ``backoff_s * 2 ** (n - 1)`` seconds (at most 30).
    """

    timeout_s: float = 30.0
    retries: int = 5
    backoff_s: float = 1.0

    @classmethod
    def from_env(cls) -> "TransferOptions":
        """Defaults, changed by ``RMT_DOWNLOAD_TIMEOUT``, ``RMT_DOWNLOAD_RETRIES``, ``RMT_DOWNLOAD_BACKOFF``."""
        values = {}
        for field_name, variable, kind, low, high, wanted in (
            ("timeout_s", "RMT_DOWNLOAD_TIMEOUT", float, 0.0, _MAX_TIMEOUT_S,
             f"a finite number above 0, at most {_MAX_TIMEOUT_S:g}"),
            ("retries", "RMT_DOWNLOAD_RETRIES", int, 0, math.inf, "a whole number, 0 or more"),
            ("backoff_s", "RMT_DOWNLOAD_BACKOFF", float, 0.0, math.inf, "a finite number, 0 or more"),
        ):
            text = os.environ.get(variable)
            if text is None or text == "":
                continue
            try:
                value = kind(text)
            except ValueError:
                value = math.nan
            # nan, inf (1e400 too) and out-of-range values overflow or break the socket timeout and the backoff sleep
            if not (math.isfinite(value) and low <= value <= high) or (field_name == "timeout_s" and value == 0):
                what = "count" if kind is int else "number of seconds"
                raise ZooError(f"{variable}={text!r} is not a valid {what}: give {wanted}")
            values[field_name] = value
        return cls(**values)


def offline() -> bool:
    """True when ``RMT_OFFLINE`` asks for no network access at all."""
    return os.environ.get("RMT_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def unreachable(url: str, timeout_s: float) -> Optional[str]:
    """Why the host of an http(s) ``url`` cannot be reached at all (its name does not resolve, or
    the connection is refused or has no route, or the URL is malformed), or None: a quick check before handing a download
    to a library that retries such failures at length. None too when a proxy serves the URL (the
    proxy resolves the host) and for other kinds of failure (slow, say), which the download meets."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:  # a malformed host or port
        return f"{url!r} is not a valid URL ({e})"
    if parts.scheme not in ("http", "https") or not host:
        return None
    proxies = urllib.request.getproxies()  # http_proxy, https_proxy, all_proxy (as "all") ...
    if (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return None
    try:
        with socket.create_connection((host, port or (443 if parts.scheme == "https" else 80)), timeout=timeout_s):
            return None
    except OSError as e:
        failure = _connection_failure(url, e)
        return str(failure) if failure.unreachable else None


def fetch(
    url: str,
    partial: Path,
    *,
    options: Optional[TransferOptions] = None,
    progress: Optional[Progress] = None,
    notify: Optional[Notify] = None,
) -> int:
    """Transfer ``url`` into ``partial``, resuming what an earlier attempt left there. Returns the size.

    Raises DownloadError (one line) for a permanent failure, or once the retries are spent.
    OSErrors from writing ``partial`` propagate: the caller knows which directory that is.
    """
    options = options or TransferOptions.from_env()
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as e:
        raise DownloadError(f"{url!r} is not a valid URL ({e})") from None
    if scheme == "file":
        return copy_file(_file_url_path(url), partial, progress)
    if scheme not in ("http", "https"):
        raise DownloadError(f"unsupported URL {url!r}: use http://, https:// or file://")
    if offline():
        raise DownloadError(f"RMT_OFFLINE is set: not downloading {url}", unreachable=True)
    attempt = 0
    while True:
        try:
            return _http_attempt(url, partial, options, progress, notify)
        except _Transient as e:
            attempt += 1
            kept = partial.stat().st_size if partial.exists() else 0
            if e.unreachable or attempt > options.retries:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                keep = f"; {kept:,} bytes kept, run the same command again to resume" if kept else ""
                raise DownloadError(f"{e}{tries}{keep}", resumable=kept > 0, unreachable=e.unreachable) from None
            wait = min(options.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
            if notify:
                notify(f"{e}; retrying in {wait:g} s (attempt {attempt + 1} of {options.retries + 1})")
            time.sleep(wait)


class _Transient(Exception):
    """A failure worth retrying; ``unreachable`` when no connection could be made at all."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _meta_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _resume_state(url: str, partial: Path) -> tuple[int, Optional[str]]:
    """Bytes to resume from and the If-Range validator; a partial of another URL is discarded."""
    meta_path = _meta_path(partial)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        size = partial.stat().st_size
    except (OSError, ValueError):
        meta, size = None, 0
    if not isinstance(meta, dict) or meta.get("url") != url or size == 0:
        partial.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        return 0, None
    return size, meta.get("etag") or meta.get("last_modified")


def _http_attempt(
    url: str, partial: Path, options: TransferOptions, progress: Optional[Progress], notify: Optional[Notify]
) -> int:
    start, validator = _resume_state(url, partial)
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
        if validator:
            headers["If-Range"] = validator
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=options.timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and start:  # our partial does not fit the file any more: start over
            partial.unlink(missing_ok=True)
            raise _Transient(f"the server refused to resume {url} (HTTP 416)") from None
        message = f"HTTP {e.code} {e.reason} from {url}"
        if e.code in _TRANSIENT_HTTP or 500 <= e.code < 600:
            raise _Transient(message) from None
        if e.code in (401, 403):
            message += ": access denied (a private link or one that expired)"
        raise DownloadError(message) from None
    except urllib.error.URLError as e:
        raise _connection_failure(url, e.reason) from None
    except (OSError, http.client.HTTPException) as e:
        raise _connection_failure(url, e) from None

    with response:
        content_type = response.headers.get("Content-Type", "")
        if "text/html" in content_type.lower():
            discard_partial(partial)
            raise DownloadError(_html_message(url))
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != start:
                discard_partial(partial)
                raise _Transient(f"the server resumed {url} at the wrong offset")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
            if notify:
                notify(f"resuming at {start:,} bytes")
        else:
            start, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and is_decimal(length) else None
            partial.parent.mkdir(parents=True, exist_ok=True)
            _meta_path(partial).write_text(
                json.dumps({"url": url, "etag": response.headers.get("ETag"),
                            "last_modified": response.headers.get("Last-Modified")}),
                encoding="utf-8",
            )
        done = start
        with open(partial, mode) as f:
            if progress:
                progress(done, total)
            while True:
                chunk = _read(response, url, done, total)
                if not chunk:
                    break
                if done == 0 and looks_like_html(chunk):
                    f.close()
                    discard_partial(partial)
                    raise DownloadError(_html_message(url))
                f.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    if total is not None and done != total:
        if done > total:
            discard_partial(partial)
            raise DownloadError(f"{url} sent {done:,} bytes, more than the {total:,} it announced")
        raise _Transient(f"the connection to {_host(url)} closed after {done:,} of {total:,} bytes")
    return done


def _read(response: http.client.HTTPResponse, url: str, done: int, total: Optional[int]) -> bytes:
    try:
        return response.read(_CHUNK)
    except (OSError, http.client.HTTPException) as e:
        of = f" of {total:,}" if total is not None else ""
        raise _Transient(f"the connection to {_host(url)} broke after {done:,}{of} bytes ({_reason(e)})") from None


def _connection_failure(url: str, reason: object) -> _Transient:
    host = _host(url)
    if isinstance(reason, socket.gaierror):
        return _Transient(f"cannot resolve {host} ({_reason(reason)}): offline or no route to it", unreachable=True)
    if isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS:
        return _Transient(f"cannot connect to {host} ({_reason(reason)}): offline or no route to it", unreachable=True)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return _Transient(f"no answer from {host} (timed out)")
    return _Transient(f"cannot download from {host} ({_reason(reason)})")


def copy_file(source: Path, partial: Path, progress: Optional[Progress] = None) -> int:
    """Copy a local file into ``partial`` (from scratch: a local copy has nothing to resume)."""
    if source.is_dir():
        raise DownloadError(f"{source} is a directory, not a file")
    try:
        reader = open(source, "rb")
    except FileNotFoundError:
        raise DownloadError(f"no such file: {source}") from None
    except OSError as e:
        raise DownloadError(f"cannot read {source}: {e.strerror or e}") from None
    partial.parent.mkdir(parents=True, exist_ok=True)
    total = os.fstat(reader.fileno()).st_size
    done = 0
    with reader, open(partial, "wb") as f:
        while True:
            try:
                chunk = reader.read(_CHUNK)
            except OSError as e:
                raise DownloadError(f"cannot read {source}: {e.strerror or e}") from None
            if not chunk:
                break
            f.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    _meta_path(partial).unlink(missing_ok=True)
    return done


def _file_url_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    netloc = f"//{parts.netloc}" if parts.netloc not in ("", "localhost") else ""  # UNC hosts on Windows
    return Path(urllib.request.url2pathname(netloc + parts.path))


def discard_partial(partial: Path) -> None:
    """Remove a partial file and its resume record."""
    partial.unlink(missing_ok=True)
    _meta_path(partial).unlink(missing_ok=True)


def _html_message(url: str) -> str:
    return (
        f"{url} answered with an HTML page, not the file (a share, login or error page; Baidu pan does this): "
        "open the link in a browser, download the file itself, then import it with --from FILE"
    )


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _reason(error: object) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return first_line(error)


def _user_agent() -> str:
    import rmt

    return f"rmt/{rmt.__version__} python-urllib"
