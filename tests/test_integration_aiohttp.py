"""The aiohttp integration, through a real aiohttp server on 127.0.0.1 and a ClientSession.

One client per application (opened at start-up, closed at cleanup); round trips in one
piece and streamed both ways; and the two "retry later" errors tripped for real: the
decrypt rate limiter on moto KMS with the client's clock held still (as in
test_key_manager.py), and the circuit breaker by KMS failures injected by
:class:`fault_proxy.FaultProxy` (as in test_circuit_breaker.py).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web
from fake_clock import FakeClock
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
from web_kms import one_attempt_kms_keyring

from aioenvelope import EnvelopeClient, RateLimit, RawAesKeyring, errors
from aioenvelope.integrations.aiohttp import (
    ENVELOPE_CLIENT,
    envelope_cleanup_ctx,
    envelope_client,
    envelope_error_middleware,
    stream_response,
)

CONTEXT = {"tenant": "t1", "purpose": "aiohttp-integration-tests"}
MIB = 1 << 20
STORE: web.AppKey[Path] = web.AppKey("store", Path)
SOURCES: web.AppKey[dict[str, CountedSource]] = web.AppKey("sources", dict)
CAPPED_LIMIT = 256 * 1024


# -- the application under test ----------------------------------------------------------

routes = web.RouteTableDef()


@routes.post("/encrypt")
async def encrypt(request: web.Request) -> web.Response:
    ciphertext = await envelope_client(request).encrypt(
        await request.read(), encryption_context=CONTEXT
    )
    return web.Response(body=ciphertext)


@routes.post("/decrypt")
async def decrypt(request: web.Request) -> web.Response:
    plaintext = await envelope_client(request).decrypt(
        await request.read(), encryption_context=CONTEXT
    )
    return web.Response(body=plaintext)


@routes.post("/encrypt-stream")
async def encrypt_stream(request: web.Request) -> web.StreamResponse:
    """Upload in, ciphertext out, both streamed: the request's StreamReader is the source."""
    stream = envelope_client(request).encrypt_stream(request.content, encryption_context=CONTEXT)
    return await stream_response(request, stream)


@routes.put("/objects/{name}")
async def put_object(request: web.Request) -> web.Response:
    """A streamed upload, encrypted into a file as it arrives."""
    stream = envelope_client(request).encrypt_stream(request.content, encryption_context=CONTEXT)
    path = request.app[STORE] / request.match_info["name"]
    async with stream, await anyio.open_file(path, "wb") as out:
        async for chunk in stream:
            await out.write(chunk)
    return web.json_response({"stored": (await anyio.Path(path).stat()).st_size}, status=201)


@routes.get("/objects/{name}")
async def get_object(request: web.Request) -> web.StreamResponse:
    """A streamed download, decrypted from the file as it is sent."""
    client = envelope_client(request)
    path = request.app[STORE] / request.match_info["name"]
    async with await anyio.open_file(path, "rb") as source:
        return await stream_response(
            request, client.decrypt_stream(source, encryption_context=CONTEXT)
        )


@routes.get("/naive/{name}")
async def get_object_naively(request: web.Request) -> web.StreamResponse:
    """What stream_response avoids: the response is prepared before the KMS call."""
    client = envelope_client(request)
    path = request.app[STORE] / request.match_info["name"]
    response = web.StreamResponse()
    await response.prepare(request)
    async with (
        await anyio.open_file(path, "rb") as source,
        client.decrypt_stream(source, encryption_context=CONTEXT) as plaintext,
    ):
        async for chunk in plaintext:
            await response.write(chunk)
    await response.write_eof()
    return response


@routes.get("/capped/{name}")
async def get_capped(request: web.Request) -> web.StreamResponse:
    """A streamed download with a 256 KiB HTTP/1.0 buffer, noting how much it read."""
    name = request.match_info["name"]
    source = CountedSource(await anyio.Path(request.app[STORE] / name).read_bytes())
    request.app[SOURCES][name] = source
    plaintext = envelope_client(request).decrypt_stream(source.pieces(), encryption_context=CONTEXT)
    return await stream_response(request, plaintext, http10_buffer_limit=CAPPED_LIMIT)


def envelope_app(factory: Callable[[], EnvelopeClient], store: Path) -> web.Application:
    # One-shot bodies are read whole, so they are capped (4 MiB); streams are not.
    app = web.Application(middlewares=[envelope_error_middleware], client_max_size=4 * MIB)
    app.cleanup_ctx.append(envelope_cleanup_ctx(factory))
    app[STORE] = store
    app[SOURCES] = {}
    app.add_routes(routes)
    return app


@contextlib.asynccontextmanager
async def listening(app: web.Application) -> AsyncIterator[int]:
    """``app`` on 127.0.0.1 (a free port); yields the port."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[aiohttp.ClientSession]:
    """``app`` on 127.0.0.1 (a free port), and a ClientSession pointed at it."""
    async with listening(app) as port:
        # A bound on every request, so a response that never ends fails the test.
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=timeout) as session:
            yield session


# -- helpers -----------------------------------------------------------------------------


class CountingKeyring(RawAesKeyring):
    """A raw AES keyring that counts how often its owning client opened and closed it."""

    def __init__(self) -> None:
        super().__init__("test-namespace", "aiohttp-key", os.urandom(32))
        self.opened = 0
        self.closed = 0

    async def open(self) -> None:
        self.opened += 1
        await super().open()

    async def close(self) -> None:
        self.closed += 1
        await super().close()


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as an upload body of uneven chunks (sent with chunked encoding)."""
    sizes = itertools.cycle((1, 4096, 65535, 65537, 300_000))
    i = 0
    while i < len(data):
        size = next(sizes)
        yield data[i : i + size]
        i += size


async def retry_later(response: aiohttp.ClientResponse) -> tuple[int, str, object]:
    """Status, Retry-After and JSON body of a 429/503."""
    return response.status, response.headers["Retry-After"], await response.json()


# -- one client per application ----------------------------------------------------------


async def test_one_client_is_opened_at_startup_shared_by_requests_and_closed_at_cleanup(
    tmp_path: Path,
) -> None:
    keyring = CountingKeyring()
    built: list[EnvelopeClient] = []

    def factory() -> EnvelopeClient:
        built.append(EnvelopeClient(keyring))
        return built[-1]

    seen: list[EnvelopeClient] = []

    async def whoami(request: web.Request) -> web.Response:
        seen.append(envelope_client(request))
        return web.Response(text="ok")

    app = envelope_app(factory, tmp_path)
    app.router.add_get("/whoami", whoami)
    async with serving(app) as http:
        assert (len(built), keyring.opened, keyring.closed) == (1, 1, 0)
        assert app[ENVELOPE_CLIENT] is built[0]
        for _ in range(5):
            async with http.get("/whoami") as response:
                assert response.status == 200
            async with http.post("/encrypt", data=b"x") as response:
                assert response.status == 200
    assert len(seen) == 5
    assert all(client is built[0] for client in seen)
    assert (len(built), keyring.opened, keyring.closed) == (1, 1, 1)
    with pytest.raises(errors.ConfigurationError, match="closed"):
        await built[0].encrypt(b"too late", encryption_context=CONTEXT)


async def test_installing_the_cleanup_ctx_twice_fails_startup_and_closes_the_first_client(
    tmp_path: Path,
) -> None:
    keyring = CountingKeyring()
    app = envelope_app(lambda: EnvelopeClient(keyring), tmp_path)
    app.cleanup_ctx.append(envelope_cleanup_ctx(lambda: EnvelopeClient(keyring)))
    with pytest.raises(errors.ConfigurationError, match="already has an EnvelopeClient"):
        async with serving(app):
            pass
    assert (keyring.opened, keyring.closed) == (1, 1)


async def test_helper_without_the_cleanup_ctx_is_a_clear_error() -> None:
    raised: list[Exception] = []

    async def handler(request: web.Request) -> web.Response:
        try:
            envelope_client(request)
        except errors.ConfigurationError as exc:
            raised.append(exc)
            raise
        return web.Response(text="unreachable")

    app = web.Application(middlewares=[envelope_error_middleware])
    app.router.add_get("/", handler)
    async with serving(app) as http, http.get("/") as response:
        assert response.status == 500
    (error,) = raised
    assert "envelope_cleanup_ctx" in str(error)
    assert "no EnvelopeClient" in str(error)


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 19, 64 * 1024, 3 * MIB // 2])
async def test_encrypt_and_decrypt_endpoints_round_trip(tmp_path: Path, size: int) -> None:
    keyring = RawAesKeyring("test-namespace", "aiohttp-key", os.urandom(32))
    plaintext = os.urandom(size)
    async with serving(envelope_app(lambda: EnvelopeClient(keyring), tmp_path)) as http:
        # BytesIO: aiohttp warns that a large raw bytes body may hold the loop.
        async with http.post("/encrypt", data=io.BytesIO(plaintext)) as response:
            assert response.status == 200
            ciphertext = await response.read()
        async with http.post("/decrypt", data=io.BytesIO(ciphertext)) as response:
            assert response.status == 200
            assert await response.read() == plaintext
    # A real message: another client with the same key reads it.
    async with EnvelopeClient(keyring) as reader:
        assert await reader.decrypt(ciphertext, encryption_context=CONTEXT) == plaintext


async def test_streamed_upload_to_a_file_and_streamed_download_round_trip(
    tmp_path: Path,
) -> None:
    keyring = RawAesKeyring("test-namespace", "aiohttp-key", os.urandom(32))
    plaintext = os.urandom(4 * MIB + 12345)
    async with serving(envelope_app(lambda: EnvelopeClient(keyring), tmp_path)) as http:
        async with http.put("/objects/big", data=chunks_of(plaintext)) as response:
            assert response.status == 201
            stored = (await response.json())["stored"]
        assert stored == (tmp_path / "big").stat().st_size > len(plaintext)
        async with http.get("/objects/big") as response:
            assert response.status == 200
            assert response.headers["Transfer-Encoding"] == "chunked"
            received = bytearray()
            async for chunk in response.content.iter_any():
                received += chunk
        assert received == plaintext
    # The stored file is a whole message that another client with the key reads.
    async with EnvelopeClient(keyring) as reader:
        sealed = (tmp_path / "big").read_bytes()
        assert await reader.decrypt(sealed, encryption_context=CONTEXT) == plaintext


async def test_streamed_upload_answered_with_a_streamed_ciphertext(tmp_path: Path) -> None:
    keyring = RawAesKeyring("test-namespace", "aiohttp-key", os.urandom(32))
    plaintext = os.urandom(3 * MIB + 1)
    app = envelope_app(lambda: EnvelopeClient(keyring), tmp_path)
    async with (
        serving(app) as http,
        http.post("/encrypt-stream", data=chunks_of(plaintext)) as response,
    ):
        assert response.status == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        ciphertext = await response.read()
    async with EnvelopeClient(keyring) as reader:
        assert await reader.decrypt(ciphertext, encryption_context=CONTEXT) == plaintext


# -- 429: the decrypt rate limiter -------------------------------------------------------


async def test_rate_limited_decrypt_is_a_429_with_retry_after(
    moto_kms: MotoKms, kms_key: KmsKey, tmp_path: Path
) -> None:
    """rate=0.4/s, burst=1, the clock held: one decrypt reaches KMS, then every miss is
    refused for 2.5 s, which Retry-After rounds up to 3; after 2.5 s a token is back."""
    clock = FakeClock()
    keyring = one_attempt_kms_keyring(moto_kms.endpoint_url, kms_key)
    limit = RateLimit(rate=0.4, burst=1)

    def factory() -> EnvelopeClient:
        return EnvelopeClient(keyring, cache=None, decrypt_rate_limit=limit, clock=clock)

    plaintext = b"4111 1111 1111 1111"
    async with serving(envelope_app(factory, tmp_path)) as http:
        async with http.put("/objects/card", data=plaintext) as response:
            assert response.status == 201
        async with http.post("/encrypt", data=plaintext) as response:
            ciphertext = await response.read()
        async with http.post("/decrypt", data=ciphertext) as response:
            assert (response.status, await response.read()) == (200, plaintext)

        expected = (429, "3", {"error": "decrypt_rate_limited", "retry_after": 3})
        async with http.post("/decrypt", data=ciphertext) as response:
            assert await retry_later(response) == expected
        # An interim "100 Continue" (curl sends Expect for large bodies) is no response.
        async with http.post("/decrypt", data=ciphertext, expect100=True) as response:
            assert await retry_later(response) == expected
        # Streamed: stream_response takes the first chunk (the KMS call) before preparing.
        async with http.get("/objects/card") as response:
            assert await retry_later(response) == expected
        # Prepared before the KMS call: too late for a 429, so the body is cut off
        # rather than passed off as complete.
        async with http.get("/naive/card") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()

        clock.now += 2.5
        async with http.get("/objects/card") as response:
            assert (response.status, await response.read()) == (200, plaintext)
    assert keyring.kms_calls["Decrypt"] == 2


# -- 503: the circuit breaker ------------------------------------------------------------


async def test_open_circuit_breaker_is_a_503_with_retry_after(
    moto_kms: MotoKms, kms_key: KmsKey, tmp_path: Path
) -> None:
    """Five KMS 500s in a row open the breaker (default config); then encrypt, decrypt
    and a streamed encrypt are 503s with Retry-After: 30 and send KMS nothing, until the
    held clock passes the reset timeout and a probe succeeds."""
    async with EnvelopeClient(
        one_attempt_kms_keyring(moto_kms.endpoint_url, kms_key), cache=None
    ) as writer:
        sealed = await writer.encrypt(b"sealed before the outage", encryption_context=CONTEXT)

    clock = FakeClock()
    with FaultProxy(moto_kms.endpoint_url) as proxy:
        keyring = one_attempt_kms_keyring(proxy.url, kms_key)
        app = envelope_app(lambda: EnvelopeClient(keyring, cache=None, clock=clock), tmp_path)
        async with serving(app) as http:
            proxy.fail_next(5, 500, operation="GenerateDataKey")
            for _ in range(5):
                # KMSError itself is not the middleware's to map: a plain 500.
                async with http.post("/encrypt", data=b"x") as response:
                    assert response.status == 500
            assert app[ENVELOPE_CLIENT].stats.breaker_states[REGION] == "open"
            sent = sum(proxy.requests().values())

            expected = (503, "30", {"error": "kms_unavailable", "retry_after": 30})
            async with http.post("/encrypt", data=b"x") as response:
                assert await retry_later(response) == expected
            async with http.post("/decrypt", data=sealed) as response:
                assert await retry_later(response) == expected
            async with http.post("/encrypt-stream", data=chunks_of(os.urandom(MIB))) as response:
                assert await retry_later(response) == expected
            assert sum(proxy.requests().values()) == sent

            clock.now += 30.0
            async with http.post("/decrypt", data=sealed) as response:
                assert (response.status, await response.read()) == (
                    200,
                    b"sealed before the outage",
                )
            assert app[ENVELOPE_CLIENT].stats.breaker_states[REGION] == "closed"


# -- how a failed download ends ------------------------------------------------------------
#
# Over HTTP/1.0 a body without a Content-Length ends when the connection closes, so a
# download cut short by a decryption failure would read as complete. These send
# hand-made HTTP/1.0 and HTTP/1.1 requests and judge the answer as an HTTP client would
# (h11, in tests/http_framing.py).

DAMAGES = ["tampered", "truncated"]


async def store_message(
    keyring: RawAesKeyring, path: Path, plaintext: bytes, damage: str | None = None
) -> None:
    async with EnvelopeClient(keyring) as writer:
        blob = await writer.encrypt(plaintext, encryption_context=CONTEXT, frame_length=4096)
    await anyio.Path(path).write_bytes(damaged(blob, damage) if damage else blob)


async def test_http10_download_is_sent_whole_with_a_content_length(tmp_path: Path) -> None:
    keyring = RawAesKeyring("test-namespace", "aiohttp-key", os.urandom(32))
    plaintext = os.urandom(MIB + 17)
    await store_message(keyring, tmp_path / "doc", plaintext)
    async with listening(envelope_app(lambda: EnvelopeClient(keyring), tmp_path)) as port:
        answer = await exchange(port, http10_get("/objects/doc"))
    assert (answer.status, answer.complete) == (200, True)
    assert answer.headers["content-length"] == str(len(plaintext))
    assert "transfer-encoding" not in answer.headers
    assert answer.body == plaintext


@pytest.mark.parametrize("damage", DAMAGES)
async def test_damaged_message_over_http10_is_an_error_status_not_a_body_cut_at_the_close(
    tmp_path: Path, damage: str
) -> None:
    """The bug: the first megabyte or so of plaintext went out under a 200, then aiohttp
    dropped the connection, which is how an HTTP/1.0 body ends. Now the whole message is
    checked first and the error is raised from the handler, before anything is sent."""
    keyring = RawAesKeyring("test-namespace", "aiohttp-key", os.urandom(32))
    plaintext = os.urandom(2 * MIB)
    await store_message(keyring, tmp_path / "doc", plaintext, damage)
    async with listening(envelope_app(lambda: EnvelopeClient(keyring), tmp_path)) as port:
        answer = await exchange(port, http10_get("/objects/doc"))
    assert (answer.status, answer.complete, answer.framed) == (500, True, True), answer.raw[:300]
    assert plaintext[:64] not in answer.body


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
@pytest.mark.parametrize("damage", DAMAGES)
async def test_damaged_message_over_http11_ends_without_the_terminating_chunk(
    tmp_path: Path, damage: str, close: bool
) -> None:
    """HTTP/1.1 is streamed, with or without ``Connection: close``: chunked (never
    close-delimited), and when decryption fails aiohttp drops the connection without
    the zero-length chunk that ends a chunked body, so the client sees it incomplete."""
    keyring = RawAesKeyring("test-namespace", "aiohttp-key", os.urandom(32))
    plaintext = os.urandom(2 * MIB)
    await store_message(keyring, tmp_path / "doc", plaintext, damage)
    async with listening(envelope_app(lambda: EnvelopeClient(keyring), tmp_path)) as port:
        answer = await exchange(port, http11_get("/objects/doc", close=close))
    assert_streamed_then_cut_short(answer, plaintext)


async def test_http10_download_past_the_buffer_limit_is_a_505_and_stops_decrypting(
    tmp_path: Path,
) -> None:
    keyring = RawAesKeyring("test-namespace", "aiohttp-key", os.urandom(32))
    plaintext = os.urandom(8 * MIB)
    await store_message(keyring, tmp_path / "big", plaintext)
    await store_message(keyring, tmp_path / "at-limit", plaintext[:CAPPED_LIMIT])
    await store_message(keyring, tmp_path / "over-limit", plaintext[: CAPPED_LIMIT + 1])
    app = envelope_app(lambda: EnvelopeClient(keyring), tmp_path)
    async with listening(app) as port:
        answers = {"big": await exchange(port, http10_get("/capped/big"))}
        source = app[SOURCES]["big"]
        for name in ("at-limit", "over-limit"):
            answers[name] = await exchange(port, http10_get(f"/capped/{name}"))
        answers["streamed"] = await exchange(port, http11_get("/capped/big"))
    assert_http10_buffer_limit_held(answers, source, plaintext, CAPPED_LIMIT)
