"""Whole bodies for HTTP/1.0, framework-free, so the Starlette and aiohttp integrations'
``stream_response`` cannot drift apart.

HTTP/1.0 has no chunked encoding: a body of unknown length ends when the server closes
the connection. A streamed response that fails half-way is cut off by closing the
connection, which to an HTTP/1.0 client (or a proxy speaking HTTP/1.0 to the app, as
nginx does by default) is exactly how a complete body ends: partial plaintext passes for
the whole. So an HTTP/1.0 request is never streamed to. Its body is read to the end
first, which for a decrypting stream means every frame verified (and the signature, if
any) just as ``decrypt()`` does, then sent with a ``Content-Length``; a failure on the
way is raised before the status line, so it becomes an error response like any other.
Up to a limit: past it the stream is not read (nor decrypted) further and the answer is
a 505.

HTTP/1.1 marks the end of a chunked body with a zero-length chunk, which servers do not
send when the body fails, and HTTP/2 and 3 end a stream explicitly, so those are
streamed.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass

from ..errors import ConfigurationError

__all__ = [
    "DEFAULT_HTTP10_BUFFER_LIMIT",
    "HTTP10_REFUSAL",
    "Refusal",
    "check_buffer_limit",
    "gather_within",
    "marks_body_end",
]

DEFAULT_HTTP10_BUFFER_LIMIT = 16 * 1024 * 1024
"""16 MiB: files an HTTP/1.0 client is likely to ask for, per request in flight."""

_FRAMED_VERSIONS = frozenset({"1.1", "2", "3"})


@dataclass(frozen=True)
class Refusal:
    status: int
    body: dict[str, object]


HTTP10_REFUSAL = Refusal(
    505,
    {
        "error": "http_1_1_required",
        "detail": "this response is streamed and too large to buffer for HTTP/1.0, "
        "which cannot mark where a streamed body ends; repeat the request over "
        "HTTP/1.1 (behind nginx: proxy_http_version 1.1)",
    },
)
"""The answer to an HTTP/1.0 request whose body would exceed the buffer limit.

505 (HTTP Version Not Supported) says what is wrong and where: the protocol version,
which is usually a proxy's setting, so a 5xx that shows up in the operator's error rates
rather than a 4xx blaming the end user. 426 (Upgrade Required) would need an ``Upgrade``
header, which is hop-by-hop (proxies drop it) and means switching protocols on the same
connection, which HTTP/1.0 does not define; 413 is about the request's content; 500
would not say why.
"""


def check_buffer_limit(limit: object) -> int:
    """``limit`` if it is a byte count (an ``int``, at least 0), else a ConfigurationError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigurationError(
            f"http10_buffer_limit must be a number of bytes (an int, 0 or more); got {limit!r}"
        )
    return limit


def marks_body_end(http_version: str) -> bool:
    """Whether a response over ``http_version`` ("1.0", "1.1", "2", ...) can be streamed:
    whether a body cut off by a failure can be told from one that ended (HTTP/1.1's
    terminating chunk, HTTP/2 and 3's end of stream). Anything not known to, is not."""
    return http_version in _FRAMED_VERSIONS


async def gather_within(chunks: AsyncIterable[bytes], limit: int) -> list[bytes] | None:
    """Every chunk of ``chunks``, if together they come to at most ``limit`` bytes;
    ``None`` as soon as they would exceed it, having pulled nothing more.

    Whatever ``chunks`` raises is raised. Closing ``chunks`` is the caller's job. Memory:
    at most ``limit`` bytes held, plus the one chunk that crossed it.
    """
    held: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            return None
        if chunk:
            held.append(chunk)
    return held
