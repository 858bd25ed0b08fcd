"""A failed network request in a few words, for the one error line a user sees.

requests wraps urllib3, which wraps the socket error, and each layer's text repeats the
others' ("HTTPConnectionPool(host=..., port=...): Max retries exceeded with url: ... (Caused
by NewConnectionError(...))"). reason() walks that chain and names the cause: "connection
refused", "timed out", "name not resolved", "HTTP 404 Not Found". Nothing here imports
requests, so --help stays fast and any caller (HTTP, SFTP, a socket) can use it.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Iterator

# errno -> the words a user reads (strerror is capitalised and sometimes long)
_ERRNO = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed",
}
# urllib3/requests class names, matched by name so that this module needs neither
_TIMEOUTS = {"Timeout", "ConnectTimeout", "ReadTimeout", "ConnectTimeoutError",
             "ReadTimeoutError", "TimeoutError"}
_NAME_ERRORS = {"NameResolutionError", "LocationParseError"}
_CUT_SHORT = {"ProtocolError", "IncompleteRead", "ChunkedEncodingError", "RemoteDisconnected"}
_SSL = {"SSLError", "SSLCertVerificationError"}
# what the wrappers prefix to the real message
_NOISE = re.compile(r"^(HTTPS?ConnectionPool\(.*?\): |<urllib3[^>]*>: |\[Errno -?\d+\] )")
MAX_LEN = 120


def _chain(e: BaseException) -> Iterator[BaseException]:
    """e and every exception it wraps (args, urllib3's .reason, __cause__, __context__),
    outermost first, each once."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        inner = [a for a in x.args if isinstance(a, BaseException)]
        for attr in ("reason", "__cause__", "__context__"):
            value = getattr(x, attr, None)
            if isinstance(value, BaseException):
                inner.append(value)
        todo.extend(inner)


def http_status(code: int, phrase: str | None = None) -> str:
    """'HTTP 404 Not Found' (the phrase only when the server sent one)."""
    return f"HTTP {code} {phrase}".rstrip() if phrase else f"HTTP {code}"


def os_reason(e: BaseException) -> str:
    """The system's own words for a failed file or SFTP operation ('No space left on
    device'), else the exception's text, else its class name."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def reason(e: BaseException) -> str:
    """A short lower-case cause of a failed request, for '...: cannot get URL: REASON'."""
    chain = list(_chain(e))
    names = {type(x).__name__ for x in chain}
    for x in chain:
        response = getattr(x, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return http_status(code, getattr(response, "reason", None))
    for x in chain:
        if isinstance(x, OSError) and x.errno in _ERRNO:
            return _ERRNO[x.errno]
    if any(isinstance(x, socket.gaierror) for x in chain) or names & _NAME_ERRORS:
        return "name not resolved"
    if any(isinstance(x, TimeoutError) for x in chain) or names & _TIMEOUTS:
        return "timed out"
    if names & _SSL:
        return "TLS error: " + _text(next(x for x in reversed(chain)
                                          if type(x).__name__ in _SSL))
    if names & _CUT_SHORT:
        return "connection closed early" + next(
            (_counts(x) for x in chain if type(x).__name__ == "IncompleteRead"), "")
    for x in reversed(chain):  # the innermost OSError says most
        if isinstance(x, OSError) and x.strerror:
            return x.strerror[0].lower() + x.strerror[1:]
    return _text(chain[-1])


def _counts(e: BaseException) -> str:
    """urllib3's IncompleteRead counts bytes (http.client's holds the bytes themselves)."""
    partial, expected = getattr(e, "partial", None), getattr(e, "expected", None)
    if isinstance(partial, bytes):
        partial = len(partial)
    if not isinstance(partial, int):
        return ""
    more = f", {expected} more expected" if isinstance(expected, int) else ""
    return f" ({partial} bytes read{more})"


def _text(e: BaseException) -> str:
    text = str(e.args[0]) if e.args and isinstance(e.args[0], str) else str(e)
    text = _NOISE.sub("", text.splitlines()[0] if text else "") or type(e).__name__
    return text if len(text) <= MAX_LEN else text[:MAX_LEN - 3] + "..."
