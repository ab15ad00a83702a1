"""Starlette and FastAPI integration: one :class:`EnvelopeClient` per application, and
clean HTTP answers (and a log line) for the library's errors.

The client must live as long as the application: its KMS connections, data-key caches,
rate limiter and circuit breakers are all per client, so a client per request would
make a KMS call per request and never trip its breaker. ::

    from typing import Annotated

    from fastapi import Depends, FastAPI, Request
    from starlette.responses import StreamingResponse

    from aioenvelope import EnvelopeClient, KmsKeyring
    from aioenvelope.integrations.starlette import (
        envelope_lifespan, get_envelope_client, install_error_handlers, stream_response,
    )

    app = FastAPI(lifespan=envelope_lifespan(lambda: EnvelopeClient(KmsKeyring("alias/data"))))
    install_error_handlers(app)
    Envelope = Annotated[EnvelopeClient, Depends(get_envelope_client)]

    @app.put("/files/{name}")
    async def upload(name: str, request: Request, client: Envelope) -> None:
        async with client.encrypt_stream(request.stream()) as ciphertext:
            await storage.save(name, ciphertext)  # any consumer of async chunks

    @app.get("/files/{name}")
    async def download(name: str, client: Envelope) -> StreamingResponse:
        return await stream_response(client.decrypt_stream(storage.open(name)))

Plain Starlette works the same way: ``Starlette(lifespan=envelope_lifespan(...))`` and
``client = await get_envelope_client(request)`` in an endpoint.

What :func:`install_error_handlers` maps (JSON bodies ``{"error": code}``, plus
``"retry_after": n`` with a ``Retry-After: n`` header where shown)::

    KMSDecryptRateLimited            429  decrypt_rate_limited          Retry-After: n
    CircuitOpenError                 503  kms_unavailable               Retry-After: n
    KeyServiceError, transient       503  key_service_unavailable       Retry-After: 2
    KeyServiceError, not transient   500  key_service_error
    EncryptionContextMismatchError   409  encryption_context_mismatch
    AuthenticationError              422  message_not_authentic
    TruncatedMessageError            422  message_truncated
    MessageLimitError                422  message_limit_exceeded
    MalformedMessageError            422  malformed_message
    CommitmentPolicyError            422  algorithm_suite_not_allowed
    SignedStreamRefusedError         422  signed_message_refused
    NoUsableKeyError                 422  no_usable_key
    BranchKeyStoreError (+ subs)     500  key_store_error
    anything else                    unchanged (a 500 unless you map it)

``Retry-After`` is whole seconds from the error's ``retry_after``, rounded up, at least
1. Every answer but the 429 and the open breaker's 503 also logs one WARNING line on the
``aioenvelope.integrations`` logger (method, path, status, code, the error's class and
text), which is what to alert on: a 409 or 422 from your own storage means a corrupt,
tampered or misplaced object. Why 409/422 and not 500: the same request fails the same
way however often it is repeated, and a 5xx would invite clients and SDKs to retry and
load balancers to eject a healthy instance. If your endpoint knows better (a ciphertext
the client sent is a 400; a context that encodes a tenant should give a 404, so the
answer does not confirm the object exists), catch the error there, or register your own
handler for its class: :func:`install_error_handlers` leaves handlers already
registered for a class alone, and one registered later replaces its own.

An error raised after a ``StreamingResponse`` started (its status line is sent before
its first chunk is pulled) cannot change its status. Streams make their one KMS call
and read the message header before their first chunk, so return them with
:func:`stream_response`, which pulls that chunk before the response starts (a wrong
context, a malformed header, a rate limit: all still answered as above), and which
streams only where a body that fails can be told from one that ended:

- HTTP/1.1 (and 2): streamed. A later failure (a tampered or truncated message) is
  logged (the same WARNING line, saying the body was cut off) and re-raised; the server
  drops the connection without the terminating zero-length chunk (uvicorn does,
  tested), so the client sees an incomplete body.
- HTTP/1.0 (nginx's default ``proxy_http_version``): a streamed body would end where
  the connection closes, failure or not, so none is streamed. The rest of the stream is
  read first (every frame verified, as ``decrypt()`` would), then sent with a
  ``Content-Length``; a failure on the way is raised before the status line and goes
  to the app's exception handlers like any other. Past ``http10_buffer_limit`` bytes
  (16 MiB by default) the stream is closed unread and the answer is a 505
  ``{"error": "http_1_1_required", ...}``.
Don't stream ``request.stream()`` straight back as a ``StreamingResponse`` either:
below ASGI spec 2.4 Starlette listens for a disconnect while streaming, and that
listener consumes the request body's messages too.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, TypeVar, overload

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from ..client import EnvelopeClient
from ..errors import ConfigurationError, EnvelopeError
from ._answers import ANSWERED, answer_for, log_answered, log_cut_off
from ._http10 import (
    DEFAULT_HTTP10_BUFFER_LIMIT,
    HTTP10_REFUSAL,
    check_buffer_limit,
    gather_within,
    marks_body_end,
)

__all__ = [
    "DEFAULT_HTTP10_BUFFER_LIMIT",
    "envelope_client_dependency",
    "envelope_lifespan",
    "get_envelope_client",
    "install_error_handlers",
    "stream_response",
]

DEFAULT_STATE_KEY = "envelope"

AppT = TypeVar("AppT", bound=Starlette)
_State = Mapping[str, Any]  # what a stateful lifespan yields (Starlette's own type)


def _check_state_key(state_key: str) -> None:
    if not isinstance(state_key, str) or not state_key.isidentifier():
        raise ConfigurationError(f"state_key must be an identifier; got {state_key!r}")


# -- one client per application -----------------------------------------------------------


@overload
def envelope_lifespan(
    factory: Callable[[], EnvelopeClient],
    *,
    state_key: str = ...,
    inner: None = ...,
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]: ...
@overload
def envelope_lifespan(
    factory: Callable[[], EnvelopeClient],
    *,
    state_key: str = ...,
    inner: Callable[[AppT], AbstractAsyncContextManager[None]],
) -> Callable[[AppT], AbstractAsyncContextManager[None]]: ...
@overload
def envelope_lifespan(
    factory: Callable[[], EnvelopeClient],
    *,
    state_key: str = ...,
    inner: Callable[[AppT], AbstractAsyncContextManager[_State]],
) -> Callable[[AppT], AbstractAsyncContextManager[_State]]: ...
def envelope_lifespan(
    factory: Callable[[], EnvelopeClient],
    *,
    state_key: str = DEFAULT_STATE_KEY,
    inner: Callable[[Any], AbstractAsyncContextManager[_State | None]] | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """A lifespan (``FastAPI(lifespan=...)``, ``Starlette(lifespan=...)``) that builds
    one client at start-up, enters it, stores it on ``app.state.<state_key>``, and exits
    it at shutdown.

    ``factory`` is called at start-up, inside the running loop, because the keyring's
    aiobotocore clients bind to the loop that opens them and a client can be entered
    only once; entering it runs the keyring's key check, so a misconfigured key stops
    the app from starting. ``inner``, your own lifespan, runs inside: it can use the
    client during its start-up and shutdown, and whatever state it yields is passed on.
    Nest two of these (``inner=envelope_lifespan(..., state_key="archive")``) for two
    clients.
    """
    _check_state_key(state_key)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[_State | None]:
        if getattr(app.state, state_key, None) is not None:
            raise ConfigurationError(
                f"app.state.{state_key} is already set: give each envelope_lifespan its "
                "own state_key"
            )
        async with factory() as client:
            setattr(app.state, state_key, client)
            try:
                if inner is None:
                    yield None
                else:
                    async with inner(app) as state:
                        yield state
            finally:
                # A request that outlives shutdown then gets a clear error, not a
                # closed client.
                with contextlib.suppress(AttributeError):
                    delattr(app.state, state_key)

    return lifespan


def _client_on(request: HTTPConnection, state_key: str) -> EnvelopeClient:
    client = getattr(request.app.state, state_key, None)
    if not isinstance(client, EnvelopeClient):
        found = "nothing" if client is None else f"a {type(client).__name__}"
        raise ConfigurationError(
            f"no EnvelopeClient on app.state.{state_key} ({found}): pass "
            "lifespan=envelope_lifespan(factory) to the application, and make sure the "
            "lifespan ran (in tests: `with TestClient(app)`, or "
            "`async with app.router.lifespan_context(app)` around an httpx.ASGITransport)"
        )
    return client


async def get_envelope_client(request: Request) -> EnvelopeClient:
    """The application's client: ``Depends(get_envelope_client)`` in FastAPI, or
    ``await get_envelope_client(request)`` in a Starlette endpoint.

    Async because FastAPI runs plain ``def`` dependencies in a worker thread. It looks
    at ``request.app.state``; an application mounted inside another has its own state
    and Starlette runs no lifespan for it, so copy the client across in your own
    lifespan (``inner=``) if a mounted app needs it. Raises
    :class:`~aioenvelope.errors.ConfigurationError` if no lifespan stored a client:
    failing loudly beats each endpoint building its own.
    """
    return _client_on(request, DEFAULT_STATE_KEY)


def envelope_client_dependency(
    state_key: str = DEFAULT_STATE_KEY,
) -> Callable[[Request], Awaitable[EnvelopeClient]]:
    """:func:`get_envelope_client` for a client stored under another ``state_key``."""
    _check_state_key(state_key)

    async def get_client(request: Request) -> EnvelopeClient:
        return _client_on(request, state_key)

    return get_client


# -- errors ---------------------------------------------------------------------------


def _where(scope: Scope) -> tuple[str, str]:
    return str(scope.get("method", "")), str(scope.get("path", ""))


async def _answer(conn: HTTPConnection, exc: Exception) -> Response:
    answer = answer_for(exc)
    if conn.scope["type"] != "http" or answer is None:
        raise exc  # a websocket has no status to answer with: as if unhandled
    log_answered(*_where(conn.scope), exc, answer)
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


def install_error_handlers(app: Starlette) -> None:
    """Answer the library's errors as the module docstring shows: 429 and 503 with
    ``Retry-After`` for "try again later", 409/422 for a message that cannot be opened
    as asked, 500 for a key service or key store that refuses; a fixed code in a JSON
    body, never the exception's text (which names keys, regions and tables: details for
    the log line this writes, not for callers). Call it before the app starts serving:
    Starlette copies its handlers when it builds its middleware, the first time it is
    called.

    A handler the app registered for one of these classes before this call is kept.
    Websocket endpoints are left alone (they have no status to answer with). An error
    raised after a streamed response started cannot change its status; see
    :func:`stream_response`.
    """
    for cls in ANSWERED:
        if cls not in app.exception_handlers:
            app.add_exception_handler(cls, _answer)


# -- streams ------------------------------------------------------------------------------


class _ByteStream(Protocol):
    """What :meth:`EnvelopeClient.encrypt_stream`, ``decrypt_stream``, ``reencrypt_stream``
    and ``reencrypt_stream`` return."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


async def _close(stream: _ByteStream) -> None:
    with anyio.CancelScope(shield=True):  # a cancelled request still closes its source
        await stream.aclose()


async def _first_then_rest(
    first: bytes | None, chunks: AsyncIterator[bytes], stream: _ByteStream
) -> AsyncGenerator[bytes, None]:
    try:
        if first is not None:
            yield first
            async for chunk in chunks:
                yield chunk
    finally:
        await _close(stream)


class _EnvelopeStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that streams only where the protocol marks a body's end,
    and otherwise (HTTP/1.0) sends the whole body with a ``Content-Length``.

    The HTTP version is known only from the scope, which a response gets when it is
    sent, so the choice is made here rather than in :func:`stream_response`.
    """

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        *,
        http10_buffer_limit: int,
        status_code: int,
        headers: Mapping[str, str] | None,
        media_type: str | None,
    ) -> None:
        super().__init__(chunks, status_code=status_code, headers=headers, media_type=media_type)
        self._chunks = chunks
        self._http10_buffer_limit = http10_buffer_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or marks_body_end(scope.get("http_version", "")):
            await self._stream(scope, receive, send)
            return
        try:
            # Raises before anything is sent, so the app's exception handlers answer.
            held = await gather_within(self._chunks, self._http10_buffer_limit)
        finally:
            await self._chunks.aclose()  # closes the stream, read to the end or not
        if held is None:
            refusal = JSONResponse(HTTP10_REFUSAL.body, status_code=HTTP10_REFUSAL.status)
            await refusal(scope, receive, send)
        else:
            await self._send_whole(held, send)
        if self.background is not None:
            await self.background()

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream; an error after the status line went out is logged and re-raised.

        Re-raised so that the server drops the connection without the body's end marker
        (the only way left to say "incomplete"); the app's exception handlers are not
        called for it (Starlette refuses once a response started), so the log line an
        operator alerts on is written here.
        """
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await super().__call__(scope, receive, sending)
        except EnvelopeError as exc:
            if started:
                log_cut_off(*_where(scope), exc)
            raise

    async def _send_whole(self, held: list[bytes], send: Send) -> None:
        headers = [
            (name, value)
            for name, value in self.raw_headers
            if name not in (b"content-length", b"transfer-encoding")
        ]
        headers.append((b"content-length", str(sum(map(len, held))).encode()))
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": headers}
            )
            for chunk in held:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4: the client went away (as StreamingResponse does)
            raise ClientDisconnect() from None


async def stream_response(
    stream: _ByteStream,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
    media_type: str | None = "application/octet-stream",
    http10_buffer_limit: int = DEFAULT_HTTP10_BUFFER_LIMIT,
) -> StreamingResponse:
    """``stream`` as a ``StreamingResponse``, with its first chunk already pulled.

    That is where the stream makes its KMS call and reads the message header, so a
    rate limit or an open breaker still becomes a 429/503 (and a wrong context or a
    malformed header is raised from the endpoint, before anything is sent).

    A later error (a tampered or truncated message) must not let partial plaintext
    pass for the whole. Over HTTP/1.1 and 2 the body is streamed and the error ends it
    without its end marker (the server drops the connection mid-body). Over HTTP/1.0,
    where a streamed body ends at the connection's close whatever happened, the rest is
    read first, up to ``http10_buffer_limit`` bytes, and sent with a ``Content-Length``;
    the error, if any, is raised before the status line, for the app's exception
    handlers. Past the limit the stream is closed without reading further and the
    answer is a 505 (HTTP Version Not Supported) with
    ``{"error": "http_1_1_required", "detail": ...}``.

    The stream is closed when the body ends or fails, or, if the server abandons it (a
    client that went away), when the event loop finalizes it.
    """
    chunks = stream.__aiter__()
    try:
        limit = check_buffer_limit(http10_buffer_limit)
        first = await anext(chunks, None)
    except BaseException:
        await _close(stream)
        raise
    return _EnvelopeStreamingResponse(
        _first_then_rest(first, chunks, stream),
        http10_buffer_limit=limit,
        status_code=status_code,
        headers=headers,
        media_type=media_type,
    )
