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
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
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
from moto_keyrings import shared_session
from web_kms import one_attempt_kms_keyring

from aioenvelope import EnvelopeClient, Keyring, KmsKeyring, RateLimit, RawAesKeyring, errors
from aioenvelope.integrations.aiohttp import (
    ENVELOPE_CLIENT,
    envelope_cleanup_ctx,
    envelope_client,
    envelope_error_middleware,
    stream_response,
)

CONTEXT = {"tenant": "t1", "purpose": "aiohttp-integration-tests"}
MIB = 1 << 20
LOGGER = "aioenvelope.integrations"
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


def integration_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the middleware logged (the lines an operator alerts on)."""
    return [r for r in caplog.records if r.name == LOGGER]


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
    """Five KMS 500s in a row (each a 503 ``key_service_unavailable``) open the breaker
    (default config); then encrypt, decrypt and a streamed encrypt are 503s
    ``kms_unavailable`` with Retry-After: 30 and send KMS nothing, until the held clock
    passes the reset timeout and a probe succeeds."""
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
                # Each failure itself is a transient KMSError: 503 with a short wait.
                async with http.post("/encrypt", data=b"x") as response:
                    assert await retry_later(response) == (
                        503,
                        "2",
                        {"error": "key_service_unavailable", "retry_after": 2},
                    )
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


# -- messages that cannot be opened as asked ------------------------------------------------

KEY_BYTES = os.urandom(32)


def app_keyring() -> RawAesKeyring:
    return RawAesKeyring("test-namespace", "aiohttp-key", KEY_BYTES)


async def sealed_under(keyring: Keyring, context: Mapping[str, str]) -> bytes:
    async with EnvelopeClient(keyring) as writer:
        return await writer.encrypt(os.urandom(64 * 1024), encryption_context=context)


async def unopenable(case: str) -> bytes:
    """A message that :func:`app_keyring` cannot open under CONTEXT, for one reason."""
    if case == "wrong context":  # e.g. a blob copied from another tenant's row
        return await sealed_under(app_keyring(), {**CONTEXT, "tenant": "t2"})
    if case == "another key":
        other = RawAesKeyring("test-namespace", "another-key", os.urandom(32))
        return await sealed_under(other, CONTEXT)
    blob = await sealed_under(app_keyring(), CONTEXT)
    if case in ("tampered", "truncated"):
        return damaged(blob, case)
    assert case == "not a message", case
    return b"a plain CSV file, never encrypted\n"


UNOPENABLE = [
    ("wrong context", 409, "encryption_context_mismatch", errors.EncryptionContextMismatchError),
    ("tampered", 422, "message_not_authentic", errors.AuthenticationError),
    ("truncated", 422, "message_truncated", errors.TruncatedMessageError),
    ("not a message", 422, "malformed_message", errors.MalformedMessageError),
    ("another key", 422, "no_usable_key", errors.NoUsableKeyError),
]


@pytest.mark.parametrize(
    ("case", "status", "code", "error"), UNOPENABLE, ids=[c[0] for c in UNOPENABLE]
)
async def test_a_message_that_cannot_be_opened_is_a_clean_4xx_and_one_warning_line(
    tmp_path: Path,
    case: str,
    status: int,
    code: str,
    error: type[errors.EnvelopeError],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bug: a bare 500. Now a 409 (intact, but bound to another context) or a 422
    (nobody can open these bytes), a JSON body with a fixed code and nothing else (no
    exception text, no key name, no plaintext), and one WARNING line with the method,
    path, status, code, error class and the error's own text, for the operator."""
    blob = await unopenable(case)
    async with EnvelopeClient(app_keyring()) as client:
        with pytest.raises(error) as raised:
            await client.decrypt(blob, encryption_context=CONTEXT)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with (
            serving(envelope_app(lambda: EnvelopeClient(app_keyring()), tmp_path)) as http,
            http.post("/decrypt", data=blob) as response,
        ):
            status_and_type = (response.status, response.content_type)
            body = await response.read()
            assert "Retry-After" not in response.headers
    assert status_and_type == (status, "application/json")
    assert json.loads(body) == {"error": code}
    records = integration_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (
            logging.WARNING,
            f"POST /decrypt answered {status} {code}: {type(raised.value).__name__}: "
            f"{raised.value}",
        )
    ]
    assert (vars(records[0])["http_status"], vars(records[0])["error_code"]) == (status, code)
    assert KEY_BYTES.hex() not in caplog.text


async def test_the_log_line_stays_one_line_whatever_the_path_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A path is the client's to choose: a percent-encoded newline must not start a
    forged log line of its own."""
    keyring = app_keyring()
    await store_message(keyring, tmp_path / "a\nWARNING forged", os.urandom(MIB), "truncated")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with listening(envelope_app(lambda: EnvelopeClient(keyring), tmp_path)) as port:
            answer = await exchange(port, http10_get("/objects/a%0AWARNING%20forged"))
    assert answer.status == 422
    (record,) = integration_records(caplog)
    assert record.getMessage().startswith(
        "GET /objects/a\\nWARNING forged answered 422 message_truncated: "
    )
    assert "\n" not in record.getMessage()


# -- key services that fail: 503 when transient, a generic 500 otherwise --------------------


def proxied_kms_keyring(proxy: FaultProxy, key: KmsKey, *, deadline: float = 2.0) -> KmsKeyring:
    return KmsKeyring(
        key.arn,
        session=shared_session(),
        region_name=REGION,
        endpoint_url=proxy.url,
        check_keys=False,
        deadline=deadline,
    )


async def test_a_transient_key_service_failure_is_a_503_with_a_short_retry_after(
    kms_key: KmsKey, fault_proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """KMS answering 500 to every Decrypt until the keyring's deadline: an outage, not
    an answer about this request, so 503 ``key_service_unavailable`` with Retry-After: 2;
    the key ARN only in the log."""
    keyring = proxied_kms_keyring(fault_proxy, kms_key, deadline=0.5)
    app = envelope_app(lambda: EnvelopeClient(keyring, cache=None), tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with serving(app) as http:
            async with http.post("/encrypt", data=b"sealed before the outage") as response:
                blob = await response.read()
            fault_proxy.fail_next(100, 500, operation="Decrypt")
            async with http.post("/decrypt", data=blob) as response:
                answer = await retry_later(response)
    assert answer == (503, "2", {"error": "key_service_unavailable", "retry_after": 2})
    (record,) = integration_records(caplog)
    assert record.getMessage().startswith("POST /decrypt answered 503 key_service_unavailable: ")
    assert kms_key.arn in record.getMessage()


async def test_kms_refusing_access_is_a_generic_500_on_encrypt_and_no_usable_key_on_decrypt(
    kms_key: KmsKey, fault_proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """AccessDenied is an answer, not an outage: no Retry-After. On encrypt a
    ``KMSError``, a server misconfiguration: 500 with a generic body, the ARN only in
    the log. On decrypt a KmsKeyring folds KMS's refusal into ``NoUsableKeyError``, so
    the message's 422, the log line giving KMS's reason."""
    keyring = proxied_kms_keyring(fault_proxy, kms_key)
    app = envelope_app(lambda: EnvelopeClient(keyring, cache=None), tmp_path)
    answers: list[tuple[int, bytes, bool]] = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with serving(app) as http:
            async with http.post("/encrypt", data=b"sealed before the change") as response:
                blob = await response.read()
            fault_proxy.refuse_next(1, "AccessDeniedException", operation="GenerateDataKey")
            async with http.post("/encrypt", data=b"x") as response:
                answers.append(
                    (response.status, await response.read(), "Retry-After" in response.headers)
                )
            fault_proxy.refuse_next(1, "AccessDeniedException", operation="Decrypt")
            async with http.post("/decrypt", data=blob) as response:
                answers.append(
                    (response.status, await response.read(), "Retry-After" in response.headers)
                )
    assert [(status, json.loads(body), later) for status, body, later in answers] == [
        (500, {"error": "key_service_error"}, False),
        (422, {"error": "no_usable_key"}, False),
    ]
    lines = [r.getMessage() for r in integration_records(caplog)]
    assert [line.split(": ")[:2] for line in lines] == [
        ["POST /encrypt answered 500 key_service_error", "KMSError"],
        ["POST /decrypt answered 422 no_usable_key", "NoUsableKeyError"],
    ]
    assert all("AccessDeniedException" in line and kms_key.arn in line for line in lines)


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


DAMAGE_CODES = {"tampered": "message_not_authentic", "truncated": "message_truncated"}


@pytest.mark.parametrize("damage", DAMAGES)
async def test_damaged_message_over_http10_is_an_error_status_not_a_body_cut_at_the_close(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The bug: the first megabyte or so of plaintext went out under a 200, then aiohttp
    dropped the connection, which is how an HTTP/1.0 body ends. Now the whole message is
    checked first and the error is raised from the handler, before anything is sent:
    the middleware answers 422 with the damage's code and logs it."""
    keyring = RawAesKeyring("test-namespace", "aiohttp-key", os.urandom(32))
    plaintext = os.urandom(2 * MIB)
    await store_message(keyring, tmp_path / "doc", plaintext, damage)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with listening(envelope_app(lambda: EnvelopeClient(keyring), tmp_path)) as port:
            answer = await exchange(port, http10_get("/objects/doc"))
    assert (answer.status, answer.complete, answer.framed) == (422, True, True), answer.raw[:300]
    assert json.loads(answer.body) == {"error": DAMAGE_CODES[damage]}
    assert plaintext[:64] not in answer.body
    assert [r.getMessage().split(":")[0] for r in integration_records(caplog)] == [
        f"GET /objects/doc answered 422 {DAMAGE_CODES[damage]}"
    ]


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
@pytest.mark.parametrize("damage", DAMAGES)
async def test_damaged_message_over_http11_ends_without_the_terminating_chunk(
    tmp_path: Path, damage: str, close: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """HTTP/1.1 is streamed, with or without ``Connection: close``: chunked (never
    close-delimited), and when decryption fails aiohttp drops the connection without
    the zero-length chunk that ends a chunked body, so the client sees it incomplete.
    The middleware cannot answer any more, but logs why the body was cut off."""
    keyring = RawAesKeyring("test-namespace", "aiohttp-key", os.urandom(32))
    plaintext = os.urandom(2 * MIB)
    await store_message(keyring, tmp_path / "doc", plaintext, damage)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with listening(envelope_app(lambda: EnvelopeClient(keyring), tmp_path)) as port:
            answer = await exchange(port, http11_get("/objects/doc", close=close))
    assert_streamed_then_cut_short(answer, plaintext)
    assert [r.getMessage().split(":")[0] for r in integration_records(caplog)] == [
        "GET /objects/doc cut off mid-body (the status had been sent; would have been "
        f"422 {DAMAGE_CODES[damage]})"
    ]


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
