"""aiohttp integration: one :class:`EnvelopeClient` per application, and clean HTTP
answers (and a log line) for the library's errors.

The client must live as long as the application: its KMS connections, data-key caches,
rate limiter and circuit breakers are all per client, so a client per request would
make a KMS call per request and never trip its breaker. ::

    from aiohttp import web

    from aioenvelope import EnvelopeClient, KmsKeyring
    from aioenvelope.integrations.aiohttp import (
        envelope_cleanup_ctx, envelope_client, envelope_error_middleware, stream_response,
    )

    async def seal(request: web.Request) -> web.StreamResponse:
        client = envelope_client(request)
        return await stream_response(request, client.encrypt_stream(request.content))

    app = web.Application(middlewares=[envelope_error_middleware])
    app.cleanup_ctx.append(envelope_cleanup_ctx(lambda: EnvelopeClient(KmsKeyring("alias/data"))))
    app.router.add_post("/seal", seal)

:func:`envelope_error_middleware` answers the library's errors with the same statuses,
JSON bodies and log lines as the Starlette integration's ``install_error_handlers``
(see its module docstring for the table): 429/503 with ``Retry-After`` for "try again
later", 409/422 for a message that cannot be opened as asked, 500 for a key service or
key store that refuses, and one WARNING line on the ``aioenvelope.integrations`` logger
for each but the load-shedding 429 and 503.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Protocol

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from ..client import EnvelopeClient
from ..errors import ConfigurationError, EnvelopeError
from ._answers import answer_for, log_answered, log_cut_off
from ._http10 import (
    DEFAULT_HTTP10_BUFFER_LIMIT,
    HTTP10_REFUSAL,
    check_buffer_limit,
    gather_within,
    marks_body_end,
)

__all__ = [
    "DEFAULT_HTTP10_BUFFER_LIMIT",
    "ENVELOPE_CLIENT",
    "envelope_cleanup_ctx",
    "envelope_client",
    "envelope_error_middleware",
    "stream_response",
]

ENVELOPE_CLIENT: web.AppKey[EnvelopeClient] = web.AppKey("envelope_client", EnvelopeClient)
"""Where :func:`envelope_cleanup_ctx` stores the application's client."""


def envelope_cleanup_ctx(
    factory: Callable[[], EnvelopeClient],
    *,
    key: web.AppKey[EnvelopeClient] = ENVELOPE_CLIENT,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context (``app.cleanup_ctx.append(...)``) that builds one client at
    start-up, enters it and stores it in ``app[key]``, and exits it at cleanup.

    ``factory`` is called inside the running loop, because the keyring's aiobotocore
    clients bind to the loop that opens them; entering the client also runs the
    keyring's start-up key check, so a misconfigured key stops the app from starting.
    """

    async def envelope_client_ctx(app: web.Application) -> AsyncIterator[None]:
        if key in app:
            raise ConfigurationError(
                f"the application already has an EnvelopeClient under {key!r}: install "
                "envelope_cleanup_ctx once per key"
            )
        async with factory() as client:
            app[key] = client
            yield

    return envelope_client_ctx


def envelope_client(
    request: web.Request, *, key: web.AppKey[EnvelopeClient] = ENVELOPE_CLIENT
) -> EnvelopeClient:
    """The application's client (found through ``request.config_dict``, so handlers of
    sub-applications see their parent's).

    Raises :class:`~aioenvelope.errors.ConfigurationError` if no
    :func:`envelope_cleanup_ctx` stored one: failing loudly beats each handler building
    its own client.
    """
    client = request.config_dict.get(key)
    if client is None:
        raise ConfigurationError(
            f"no EnvelopeClient under {key!r} for this application: add "
            "app.cleanup_ctx.append(envelope_cleanup_ctx(factory)) when building it"
        )
    return client


@web.middleware
async def envelope_error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer the library's errors with a fixed code in a JSON body, never the
    exception's text (which names keys, regions and tables: details for the log line
    this writes, not for callers):

    - :class:`~aioenvelope.errors.KMSDecryptRateLimited`: 429, and
      :class:`~aioenvelope.errors.CircuitOpenError`: 503, each with ``Retry-After``
      (whole seconds, rounded up, at least 1) and
      ``{"error": "decrypt_rate_limited" | "kms_unavailable", "retry_after": n}``;
    - a transient :class:`~aioenvelope.errors.KeyServiceError`: 503
      ``key_service_unavailable`` with ``Retry-After: 2``; any other: 500
      ``key_service_error``;
    - a message that cannot be opened as asked: 409 ``encryption_context_mismatch``, or
      422 ``message_not_authentic``, ``message_truncated``, ``message_limit_exceeded``,
      ``malformed_message``, ``algorithm_suite_not_allowed``, ``signed_message_refused``
      or ``no_usable_key``; a branch key store that cannot serve: 500
      ``key_store_error``.

    Each but the 429 and the open breaker's 503 is logged once at WARNING on the
    ``aioenvelope.integrations`` logger (method, path, status, code, the error's class
    and text). To answer otherwise where the handler knows better (a ciphertext the
    client sent is a 400; a context that encodes a tenant should give a 404), catch the
    error in the handler, or in a middleware listed after this one.

    An error raised after a ``StreamResponse`` was prepared cannot change the status:
    the status line has gone out. The error is logged and re-raised, and aiohttp drops
    the connection; over HTTP/1.1 that leaves a chunked body without its terminating
    chunk, which the client sees as incomplete, but over HTTP/1.0 a body without a
    ``Content-Length`` ends at the close, so the cut is invisible. Streams make their one
    KMS call (and read the message header) before their first chunk, so use
    :func:`stream_response`, which takes that chunk before preparing the response and
    does not stream to HTTP/1.0 requests.
    """
    # A snapshot, not a test for zero: what went out before the handler ran (an interim
    # "100 Continue", which some aiohttp versions count) is no response of the handler's.
    sent_before = request.writer.output_size
    try:
        return await handler(request)
    except EnvelopeError as exc:
        answer = answer_for(exc)
        if answer is None:
            raise
        if request.writer.output_size > sent_before:
            log_cut_off(request.method, request.path, exc)
            raise
        log_answered(request.method, request.path, exc, answer)
        return web.json_response(answer.body, status=answer.status, headers=answer.headers)


class _ByteStream(Protocol):
    """What :meth:`EnvelopeClient.encrypt_stream`, ``decrypt_stream``, ``reencrypt_stream``
    and ``reencrypt_stream`` return."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


async def _first_then_rest(first: bytes, rest: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    yield first
    async for chunk in rest:
        yield chunk


async def stream_response(
    request: web.Request,
    stream: _ByteStream,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    http10_buffer_limit: int = DEFAULT_HTTP10_BUFFER_LIMIT,
) -> web.StreamResponse:
    """Send ``stream`` and return the response (prepared and finished).

    The first chunk is taken before the response is prepared: that is where the stream
    makes its KMS call, so a rate limit or an open breaker still reaches
    :func:`envelope_error_middleware` as a 429/503.

    A later error (a tampered or truncated message) must not let partial plaintext pass
    for the whole. Over HTTP/1.1 the body is chunked and the error drops the connection
    before the terminating chunk. Over HTTP/1.0, where a streamed body ends at the
    connection's close whatever happened, the rest is read first, up to
    ``http10_buffer_limit`` bytes, and sent with a ``Content-Length``; the error, if any,
    is raised from here before anything is sent, like an error in the header. Past the
    limit the stream is closed without reading further and the answer is a 505 (HTTP
    Version Not Supported) with ``{"error": "http_1_1_required", "detail": ...}``.

    The stream is closed however this ends.
    """
    try:
        limit = check_buffer_limit(http10_buffer_limit)
        chunks = stream.__aiter__()
        first = await anext(chunks, b"")
        if not marks_body_end(f"{request.version.major}.{request.version.minor}"):
            async with contextlib.aclosing(_first_then_rest(first, chunks)) as whole:
                held = await gather_within(whole, limit)
            if held is None:
                return web.json_response(HTTP10_REFUSAL.body, status=HTTP10_REFUSAL.status)
            response = web.StreamResponse(status=status, headers=headers)
            response.headers.popall(hdrs.TRANSFER_ENCODING, None)
            response.content_length = sum(map(len, held))
            await response.prepare(request)
            for chunk in held:
                await response.write(chunk)
            await response.write_eof()
            return response
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if first:
            await response.write(first)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        await stream.aclose()
