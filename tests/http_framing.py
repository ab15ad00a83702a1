"""What an HTTP client can tell about how a response ended, from the bytes on the wire.

:func:`exchange` writes a hand-made request (an HTTP/1.0 one, say, which httpx and
aiohttp's client never send) to a real server over a loopback socket, and reads the
answer with h11 in the client's role: h11 is the judge of whether the response reached
the end its framing promised (``complete``) or the connection closed first. A body with
no ``Content-Length`` and no chunked encoding ends at the close, so h11, like every
client, calls it complete whatever happened on the server.

Also here: ciphertext damaged in the two ways a stored message goes bad (a flipped bit,
a cut-off tail), and a source that counts what the decryptor pulled from it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import anyio
import h11

TERMINATING_CHUNK = b"0\r\n\r\n"
MIB = 1 << 20


@dataclass(frozen=True)
class Exchange:
    """One response as the client saw it."""

    status: int
    http_version: str
    headers: dict[str, str]
    """Names lowercased."""
    body: bytes
    complete: bool
    """The response ended where its framing said it would, not at a dropped connection.
    True for a close-delimited (HTTP/1.0 style) body however it ended."""
    raw: bytes

    @property
    def framed(self) -> bool:
        """Whether the response said where its body ends (a length, or chunks)."""
        return "content-length" in self.headers or "chunked" in self.headers.get(
            "transfer-encoding", ""
        )


EXCHANGE_TIMEOUT = 10.0
"""Seconds: a response that never ends fails the test instead of hanging it."""


async def exchange(port: int, request: bytes) -> Exchange:
    """Send ``request`` (bytes, as is) to 127.0.0.1:``port`` and read one response,
    until it is complete or the server closes or resets the connection."""
    method = request.split(b" ", 1)[0]
    client = h11.Connection(h11.CLIENT)
    # h11 writes only HTTP/1.1; what it needs to know is that a request with this
    # method went out (a HEAD's answer has no body).
    client.send(h11.Request(method=method, target="/", headers=[("Host", "test")]))
    raw = bytearray()
    body = bytearray()
    response: h11.Response | None = None
    complete = False
    with anyio.fail_after(EXCHANGE_TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(request)
            while not complete:
                try:
                    event = client.next_event()
                except h11.RemoteProtocolError:  # the connection ended mid-response
                    break
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                        data = b""
                    raw += data
                    client.receive_data(data)
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    complete = True
                elif isinstance(event, h11.ConnectionClosed):
                    break
    assert response is not None, f"no response at all: {bytes(raw)!r}"
    return Exchange(
        status=response.status_code,
        http_version=response.http_version.decode(),
        headers={name.decode(): value.decode() for name, value in response.headers},
        body=bytes(body),
        complete=complete,
        raw=bytes(raw),
    )


def http10_get(path: str) -> bytes:
    return f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode()


def http11_get(path: str, *, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{connection}\r\n".encode()


def damaged(ciphertext: bytes, how: str) -> bytes:
    """``ciphertext`` with one bit flipped three quarters of the way in (a frame fails
    its tag), or cut off there (the source ends mid-message)."""
    at = len(ciphertext) * 3 // 4
    if how == "tampered":
        return ciphertext[:at] + bytes([ciphertext[at] ^ 1]) + ciphertext[at + 1 :]
    assert how == "truncated", how
    return ciphertext[:at]


@dataclass
class CountedSource:
    """A ciphertext source that notes how much of it was pulled, and whether it was
    closed (``aclose``d by the stream that read it)."""

    data: bytes
    piece: int = 64 * 1024
    pulled: int = 0
    closed: bool = False

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        try:
            for start in range(0, len(self.data), self.piece):
                chunk = self.data[start : start + self.piece]
                self.pulled += len(chunk)
                yield chunk
        finally:
            self.closed = True


def assert_streamed_then_cut_short(answer: Exchange, plaintext: bytes) -> None:
    """A streamed HTTP/1.1 download whose message failed mid-way: a 200 whose chunked
    body lacks its terminating chunk, holding only a verified prefix of the plaintext."""
    assert answer.status == 200
    assert answer.headers["transfer-encoding"] == "chunked"
    assert not answer.complete
    assert not answer.raw.endswith(TERMINATING_CHUNK)
    # Streamed: verified plaintext went out before the damaged frame was reached.
    assert 0 < len(answer.body) < len(plaintext)
    assert plaintext.startswith(answer.body)


def assert_http10_buffer_limit_held(
    answers: dict[str, Exchange], source: CountedSource, plaintext: bytes, limit: int
) -> None:
    """``answers`` to HTTP/1.0 GETs of "big" (8 MiB), "at-limit" and "over-limit", and to
    an HTTP/1.1 GET of "big" ("streamed"): 505 past the limit with decryption stopped
    early, the whole body with a Content-Length at it, HTTP/1.1 unaffected."""
    for refused in (answers["big"], answers["over-limit"]):
        assert (refused.status, refused.complete, refused.framed) == (505, True, True)
        assert json.loads(refused.body)["error"] == "http_1_1_required"
    assert source.closed
    # Decryption stopped near the limit: the stream reads ahead by a step or so, not
    # the rest of the 8 MiB message.
    assert source.pulled < 4 * MIB, source.pulled
    at_limit, streamed = answers["at-limit"], answers["streamed"]
    assert (at_limit.status, at_limit.headers["content-length"]) == (200, str(limit))
    assert at_limit.body == plaintext[:limit]
    # The limit is HTTP/1.0's alone: HTTP/1.1 streams the whole message.
    assert (streamed.status, streamed.complete, streamed.body) == (200, True, plaintext)
