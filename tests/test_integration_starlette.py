"""The Starlette/FastAPI integration, through FastAPI apps served by httpx's ASGI transport
and, where the bytes on the wire matter (how a failed download ends), by a real uvicorn
on a loopback port.

httpx does not run lifespans, so :func:`serving` enters ``app.router.lifespan_context``
by hand, as a server would at start-up. The 429 and 503 come from the library for real:
a decrypt rate limit on a held clock against the moto KMS, and KMS failures injected by
:class:`fault_proxy.FaultProxy` until the circuit breaker opens.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated

import httpx
import pytest
import uvicorn
from fake_clock import FakeClock
from fastapi import Depends, FastAPI, Request, Response
from fault_proxy import FaultProxy
from http_framing import (
    CountedSource,
    assert_http10_buffer_limit_held,
    assert_streamed_then_cut_short,
    damaged,
    exchange,
    http10_get,
    http11_get,
)
from kms_server import REGION, KmsKey, MotoKms
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from web_kms import one_attempt_kms_keyring

import aioenvelope
from aioenvelope import (
    CircuitBreakerConfig,
    EnvelopeClient,
    Keyring,
    RateLimit,
    RawAesKeyring,
    errors,
)
from aioenvelope.integrations.starlette import (
    DEFAULT_HTTP10_BUFFER_LIMIT,
    envelope_client_dependency,
    envelope_lifespan,
    get_envelope_client,
    install_error_handlers,
    stream_response,
)

CONTEXT = {"tenant": "t1"}
MIB = 1 << 20
Envelope = Annotated[EnvelopeClient, Depends(get_envelope_client)]
Archive = Annotated[EnvelopeClient, Depends(envelope_client_dependency("archive"))]


class RecordingKeyring(RawAesKeyring):
    """A raw AES keyring that notes when its client opens and closes it."""

    def __init__(self, name: str, events: list[str]) -> None:
        super().__init__("starlette-tests", name, os.urandom(32))
        self.name = name
        self.events = events

    async def open(self) -> None:
        self.events.append(f"{self.name} open")

    async def close(self) -> None:
        self.events.append(f"{self.name} close")


def counting(make: Callable[[], EnvelopeClient]) -> tuple[Callable[[], EnvelopeClient], list[int]]:
    """``make`` and a list that grows by one each time it is called."""
    calls: list[int] = []

    def factory() -> EnvelopeClient:
        calls.append(1)
        return make()

    return factory, calls


def make_app(factory: Callable[[], EnvelopeClient] | None) -> FastAPI:
    """The endpoints under test; with ``factory``, the envelope lifespan builds the client."""
    app = FastAPI(lifespan=envelope_lifespan(factory) if factory else None)
    install_error_handlers(app)
    store: dict[str, list[bytes]] = {}

    @app.get("/client-id")
    async def client_id(client: Envelope) -> int:
        return id(client)

    @app.post("/encrypt")
    async def encrypt(request: Request, client: Envelope) -> Response:
        blob = await client.encrypt(await request.body(), encryption_context=CONTEXT)
        return Response(blob, media_type="application/octet-stream")

    @app.post("/decrypt")
    async def decrypt(request: Request, client: Envelope) -> Response:
        data = await client.decrypt(await request.body(), encryption_context=CONTEXT)
        return Response(data, media_type="application/octet-stream")

    @app.put("/objects/{name}", status_code=204)
    async def upload(name: str, request: Request, client: Envelope) -> None:
        async with client.encrypt_stream(request.stream(), encryption_context=CONTEXT) as s:
            store[name] = [chunk async for chunk in s]

    @app.get("/objects/{name}")
    async def download(name: str, client: Envelope) -> StreamingResponse:
        plaintext = client.decrypt_stream(store[name], encryption_context=CONTEXT)
        return await stream_response(plaintext)

    return app


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` started (its lifespan entered) and an HTTP client for it."""
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as http,
    ):
        yield http


def counting_body_messages(app: ASGIApp, sizes: list[int]) -> ASGIApp:
    """``app``, noting the size of each response body message it sends (httpx's ASGI
    transport joins them, so this is where streaming shows)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                sizes.append(len(message.get("body", b"")))
            await send(message)

        await app(scope, receive, counting_send)

    return wrapped


def assert_retry_later(response: httpx.Response, status: int, error: str, seconds: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Retry-After"] == str(seconds)
    assert response.json() == {"error": error, "retry_after": seconds}


@pytest.fixture
def proxy(moto_kms: MotoKms) -> Iterator[FaultProxy]:
    with FaultProxy(moto_kms.endpoint_url) as fault_proxy:
        yield fault_proxy


# -- one client per application ------------------------------------------------------------


async def test_lifespan_enters_one_client_for_the_app_and_exits_it_at_shutdown() -> None:
    events: list[str] = []
    factory, calls = counting(lambda: EnvelopeClient(RecordingKeyring("main", events)))
    app = make_app(factory)
    assert calls == []  # nothing is built before start-up

    async with serving(app) as http:
        client = app.state.envelope
        assert isinstance(client, EnvelopeClient)
        ids = {(await http.get("/client-id")).json() for _ in range(3)}
        assert ids == {id(client)}
        assert (calls, events) == ([1], ["main open"])

    assert (calls, events) == ([1], ["main open", "main close"])
    assert not hasattr(app.state, "envelope")  # a late request fails clearly
    with pytest.raises(errors.ConfigurationError, match="closed"):
        await client.encrypt(b"too late")

    # Started again (a second test client, say), the app gets a fresh client: one can
    # be entered only once, which is why the lifespan takes a factory.
    async with serving(app) as http:
        assert (await http.get("/client-id")).json() == id(app.state.envelope) != id(client)
    assert calls == [1, 1]


async def test_inner_lifespans_run_inside_with_the_client_and_pass_their_state_on() -> None:
    """Two clients under two keys, and the user's own stateful lifespan innermost: it
    starts after both clients are open, stops before they close, and its state is what
    the composed lifespan yields."""
    events: list[str] = []

    @asynccontextmanager
    async def own_lifespan(app: FastAPI) -> AsyncIterator[Mapping[str, str]]:
        events.append(
            f"own start: {app.state.envelope.keyring.name}, {app.state.archive.keyring.name}"
        )
        yield {"greeting": "hello"}
        events.append("own stop")

    lifespan = envelope_lifespan(
        lambda: EnvelopeClient(RecordingKeyring("main", events)),
        inner=envelope_lifespan(
            lambda: EnvelopeClient(RecordingKeyring("archive", events)),
            state_key="archive",
            inner=own_lifespan,
        ),
    )
    app = FastAPI(lifespan=lifespan)

    @app.get("/keyrings")
    async def keyrings(main: Envelope, archive: Archive) -> list[str]:
        return [
            client.keyring.name
            for client in (main, archive)
            if isinstance(client.keyring, RecordingKeyring)
        ]

    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app) as state,
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as http,
    ):
        assert state == {"greeting": "hello"}
        assert (await http.get("/keyrings")).json() == ["main", "archive"]
    assert events == [
        "main open",
        "archive open",
        "own start: main, archive",
        "own stop",
        "archive close",
        "main close",
    ]


async def test_two_lifespans_under_one_state_key_fail_at_startup() -> None:
    events: list[str] = []
    factory, calls = counting(lambda: EnvelopeClient(RecordingKeyring("main", events)))
    app = FastAPI(lifespan=envelope_lifespan(factory, inner=envelope_lifespan(factory)))
    with pytest.raises(errors.ConfigurationError, match="own state_key"):
        async with app.router.lifespan_context(app):
            pass
    assert calls == [1]  # the second client was never built
    assert events == ["main open", "main close"]


async def test_dependency_without_the_lifespan_fails_clearly() -> None:
    """No lifespan installed, a lifespan installed but never run, a plain Starlette
    endpoint: each says what is missing instead of handing out ``None``."""
    no_lifespan = make_app(None)
    not_started = make_app(lambda: EnvelopeClient(RecordingKeyring("main", [])))

    async def endpoint(request: Request) -> Response:
        client = await get_envelope_client(request)
        return Response(repr(client))

    starlette_app = Starlette(routes=[Route("/", endpoint)])
    for app, path in (
        (no_lifespan, "/client-id"),
        (not_started, "/client-id"),
        (starlette_app, "/"),
    ):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            with pytest.raises(errors.ConfigurationError, match=r"app\.state\.envelope") as info:
                await http.get(path)
        assert "envelope_lifespan" in str(info.value)


def test_state_key_must_be_an_identifier() -> None:
    with pytest.raises(errors.ConfigurationError, match="identifier"):
        envelope_lifespan(lambda: EnvelopeClient(RawAesKeyring("n", "k", bytes(32))), state_key="")
    with pytest.raises(errors.ConfigurationError, match="identifier"):
        envelope_client_dependency("not an attribute")


# -- encrypting and decrypting through endpoints ---------------------------------------------


async def test_encrypt_and_decrypt_round_trip_through_endpoints() -> None:
    keyring: Keyring = RawAesKeyring("starlette-tests", "round-trip", os.urandom(32))
    app = make_app(lambda: EnvelopeClient(keyring))
    payload = b"4111 1111 1111 1111"
    async with serving(app) as http:
        blob = (await http.post("/encrypt", content=payload)).content
        assert payload not in blob
        assert aioenvelope.inspect(blob).encryption_context == CONTEXT
        answer = await http.post("/decrypt", content=blob)
    assert (answer.status_code, answer.content) == (200, payload)


async def test_streamed_upload_and_streamed_download_round_trip_a_few_mib() -> None:
    """PUT encrypts ``request.stream()`` as it arrives (in odd-sized chunks); GET sends
    ``decrypt_stream`` back as a ``StreamingResponse``, frame by frame."""
    keyring = RawAesKeyring("starlette-tests", "streams", os.urandom(32))
    app = make_app(lambda: EnvelopeClient(keyring))
    payload = os.urandom(3 * MIB + 12_345)

    async def upload() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100_003):
            yield payload[start : start + 100_003]

    sizes: list[int] = []
    transport = httpx.ASGITransport(app=counting_body_messages(app, sizes))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as http,
    ):
        put = await http.put("/objects/big", content=upload())
        assert put.status_code == 204, put.text
        sizes.clear()
        response = await http.get("/objects/big")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content == payload
    # Sent as it was decrypted, a few frames at a time, never as one body.
    assert len(sizes) > 3
    assert max(sizes) <= MIB


# -- errors that mean "try again later" --------------------------------------------------------


async def test_decrypt_rate_limit_answers_429_with_retry_after(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """rate=0.4/s, burst 1, the clock held: the first decrypt spends the token, the next
    is refused for 2.5 s (Retry-After: 3), streamed or not; after 2.5 s it succeeds."""
    clock = FakeClock()
    app = make_app(
        lambda: EnvelopeClient(
            one_attempt_kms_keyring(moto_kms.endpoint_url, kms_key),
            cache=None,  # every decrypt is a KMS call, and needs a token
            decrypt_rate_limit=RateLimit(rate=0.4, burst=1),
            clock=clock,
        )
    )
    async with serving(app) as http:
        blob = (await http.post("/encrypt", content=b"secret")).content
        assert (await http.put("/objects/doc", content=b"streamed secret")).status_code == 204
        assert (await http.post("/decrypt", content=blob)).content == b"secret"

        assert_retry_later(
            await http.post("/decrypt", content=blob), 429, "decrypt_rate_limited", 3
        )
        assert_retry_later(await http.get("/objects/doc"), 429, "decrypt_rate_limited", 3)
        assert app.state.envelope.stats.rate_limited == 2

        clock.now += 2.5
        assert (await http.get("/objects/doc")).content == b"streamed secret"


async def test_open_circuit_answers_503_with_retry_after(
    kms_key: KmsKey, proxy: FaultProxy
) -> None:
    """Two KMS 500s in a row open the breaker (threshold 2): the failures themselves are
    not mapped (they reach the server as errors), every call after them is a 503 with
    Retry-After counting down the 30 s reset timeout, and none reaches KMS."""
    clock = FakeClock()
    app = make_app(
        lambda: EnvelopeClient(
            one_attempt_kms_keyring(proxy.url, kms_key),
            cache=None,
            circuit_breaker=CircuitBreakerConfig(failure_threshold=2, reset_timeout=30.0),
            clock=clock,
        )
    )
    async with serving(app) as http:
        blob = (await http.post("/encrypt", content=b"before the outage")).content
        proxy.fail_next(2, 500)
        for _ in range(2):
            with pytest.raises(errors.KMSError) as info:
                await http.post("/encrypt", content=b"during the outage")
            assert type(info.value) is errors.KMSError  # not yet a CircuitOpenError
            failure = info.value
            assert (failure.operation, failure.error_code, failure.transient) == (
                "GenerateDataKey",
                "KMSInternalException",
                True,
            )
            assert failure.key_id == kms_key.arn
        assert app.state.envelope.stats.breaker_states[REGION] == "open"
        sent = sum(proxy.requests().values())

        assert_retry_later(await http.post("/encrypt", content=b"x"), 503, "kms_unavailable", 30)
        assert_retry_later(await http.post("/decrypt", content=blob), 503, "kms_unavailable", 30)
        clock.now += 10.5
        assert_retry_later(await http.post("/encrypt", content=b"x"), 503, "kms_unavailable", 20)
        assert sum(proxy.requests().values()) == sent  # refused without the network


@pytest.mark.parametrize(
    ("delay", "seconds"), [(0.0, 1), (0.001, 1), (1.0, 1), (1.2, 2), (29.99, 30)]
)
async def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(
    delay: float, seconds: int
) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/limited")
    async def limited() -> None:
        raise errors.KMSDecryptRateLimited("spent", retry_after=delay)

    @app.get("/open")
    async def circuit_open() -> None:
        raise errors.CircuitOpenError("down", region=REGION, retry_after=delay)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        assert_retry_later(await http.get("/limited"), 429, "decrypt_rate_limited", seconds)
        assert_retry_later(await http.get("/open"), 503, "kms_unavailable", seconds)


# -- how a failed download ends, through a real uvicorn ----------------------------------------
#
# Over HTTP/1.0 a body without a Content-Length ends when the connection closes, so a
# download cut short by a decryption failure would read as complete. These tests send
# hand-made HTTP/1.0 and HTTP/1.1 requests to uvicorn on a loopback port and judge the
# answer as an HTTP client would (h11, in tests/http_framing.py).

DAMAGES = ["tampered", "truncated"]


@asynccontextmanager
async def uvicorn_serving(app: ASGIApp) -> AsyncIterator[int]:
    """``app`` served by uvicorn on 127.0.0.1 (lifespan and all); yields the port."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                pytest.fail("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


class Downloads:
    """A FastAPI app with one download endpoint, ``GET /objects/{name}``, that decrypts
    a stored message with :func:`stream_response`; the app maps the errors of a message
    gone bad at rest to a 500 of its own, as docs/errors.md suggests."""

    def __init__(self, http10_buffer_limit: int = DEFAULT_HTTP10_BUFFER_LIMIT) -> None:
        self.keyring = RawAesKeyring("starlette-tests", "downloads", os.urandom(32))
        self.sources: dict[str, CountedSource] = {}
        self.app = FastAPI(lifespan=envelope_lifespan(lambda: EnvelopeClient(self.keyring)))
        install_error_handlers(self.app)

        async def corrupt_at_rest(request: Request, exc: Exception) -> Response:
            return JSONResponse({"error": "stored_object_corrupt"}, status_code=500)

        self.app.add_exception_handler(errors.AuthenticationError, corrupt_at_rest)
        self.app.add_exception_handler(errors.MalformedMessageError, corrupt_at_rest)

        @self.app.get("/objects/{name}")
        async def download(name: str, client: Envelope) -> StreamingResponse:
            source = self.sources[name] = CountedSource(self.stored[name])
            plaintext = client.decrypt_stream(source.pieces(), encryption_context=CONTEXT)
            return await stream_response(plaintext, http10_buffer_limit=http10_buffer_limit)

        self.stored: dict[str, bytes] = {}

    async def store(self, name: str, plaintext: bytes, damage: str | None = None) -> None:
        async with EnvelopeClient(self.keyring) as writer:
            blob = await writer.encrypt(plaintext, encryption_context=CONTEXT, frame_length=4096)
        self.stored[name] = damaged(blob, damage) if damage else blob


async def test_http10_download_is_sent_whole_with_a_content_length() -> None:
    downloads = Downloads()
    plaintext = os.urandom(MIB + 17)
    await downloads.store("doc", plaintext)
    async with uvicorn_serving(downloads.app) as port:
        answer = await exchange(port, http10_get("/objects/doc"))
    assert (answer.status, answer.complete) == (200, True)
    assert answer.headers["content-length"] == str(len(plaintext))
    assert "transfer-encoding" not in answer.headers
    assert answer.body == plaintext
    assert downloads.sources["doc"].closed


@pytest.mark.parametrize("damage", DAMAGES)
async def test_damaged_message_over_http10_is_an_error_status_not_a_body_cut_at_the_close(
    damage: str,
) -> None:
    """The bug: the first megabyte or so of plaintext went out under a 200, then the
    connection closed, which is how an HTTP/1.0 body ends. Now the whole message is
    checked first, and the failure reaches the app's exception handler."""
    downloads = Downloads()
    await downloads.store("doc", os.urandom(2 * MIB), damage)
    async with uvicorn_serving(downloads.app) as port:
        answer = await exchange(port, http10_get("/objects/doc"))
    assert (answer.status, answer.complete) == (500, True), answer.raw[:300]
    assert json.loads(answer.body) == {"error": "stored_object_corrupt"}
    assert downloads.sources["doc"].closed


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
@pytest.mark.parametrize("damage", DAMAGES)
async def test_damaged_message_over_http11_ends_without_the_terminating_chunk(
    damage: str, close: bool
) -> None:
    """HTTP/1.1 is streamed, with or without ``Connection: close``: chunked (never
    close-delimited), and when decryption fails uvicorn drops the connection without
    the zero-length chunk that ends a chunked body, so the client sees it incomplete."""
    downloads = Downloads()
    plaintext = os.urandom(2 * MIB)
    await downloads.store("doc", plaintext, damage)
    async with uvicorn_serving(downloads.app) as port:
        answer = await exchange(port, http11_get("/objects/doc", close=close))
    assert_streamed_then_cut_short(answer, plaintext)


async def test_http10_download_past_the_buffer_limit_is_a_505_and_stops_decrypting() -> None:
    limit = 256 * 1024
    downloads = Downloads(http10_buffer_limit=limit)
    plaintext = os.urandom(8 * MIB)
    await downloads.store("big", plaintext)
    await downloads.store("at-limit", plaintext[:limit])
    await downloads.store("over-limit", plaintext[: limit + 1])
    async with uvicorn_serving(downloads.app) as port:
        answers = {"big": await exchange(port, http10_get("/objects/big"))}
        source = downloads.sources["big"]
        for name in ("at-limit", "over-limit"):
            answers[name] = await exchange(port, http10_get(f"/objects/{name}"))
        answers["streamed"] = await exchange(port, http11_get("/objects/big"))
    assert_http10_buffer_limit_held(answers, source, plaintext, limit)


@pytest.mark.parametrize("limit", [-1, 1.5, True, "16 MiB", None])
async def test_http10_buffer_limit_must_be_a_byte_count(limit: object) -> None:
    source = CountedSource(b"never read")
    async with EnvelopeClient(RawAesKeyring("n", "k", bytes(32))) as client:
        stream = client.decrypt_stream(source.pieces())
        with pytest.raises(errors.ConfigurationError, match="http10_buffer_limit"):
            await stream_response(stream, http10_buffer_limit=limit)  # type: ignore[arg-type]
    assert source.pulled == 0
