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
import logging
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
from moto_keyrings import shared_session
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from web_kms import one_attempt_kms_keyring

import aioenvelope
from aioenvelope import (
    BranchKeyStore,
    CircuitBreakerConfig,
    EnvelopeClient,
    HierarchicalKeyring,
    Keyring,
    KmsKeyring,
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
LOGGER = "aioenvelope.integrations"
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


def integration_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the integration logged (the lines an operator alerts on)."""
    return [r for r in caplog.records if r.name == LOGGER]


def assert_logged_once(
    caplog: pytest.LogCaptureFixture, line: str, *, status: int, code: str
) -> None:
    """Exactly one WARNING line from the integration, ``line``, with the structured
    fields a log handler can index."""
    records = integration_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.WARNING, line)]
    fields = vars(records[0])
    assert (fields["http_status"], fields["error_code"]) == (status, code)


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
    transient KMS errors, answered 503 ``key_service_unavailable`` with a short
    Retry-After; every call after them is a 503 ``kms_unavailable`` with Retry-After
    counting down the 30 s reset timeout, and none reaches KMS."""
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
            response = await http.post("/encrypt", content=b"during the outage")
            assert_retry_later(response, 503, "key_service_unavailable", 2)
            assert kms_key.arn not in response.text
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


# -- messages that cannot be opened as asked -----------------------------------------------

KEY_BYTES = os.urandom(32)


async def sealed_under(keyring: Keyring, context: Mapping[str, str]) -> bytes:
    async with EnvelopeClient(keyring) as writer:
        return await writer.encrypt(os.urandom(64 * 1024), encryption_context=context)


async def unopenable(case: str) -> bytes:
    """A message that the app's keyring (``RawAesKeyring("starlette-tests", "app",
    KEY_BYTES)``) cannot open under CONTEXT, for one reason."""
    ours = RawAesKeyring("starlette-tests", "app", KEY_BYTES)
    if case == "wrong context":  # e.g. a blob copied from another tenant's row
        return await sealed_under(ours, {"tenant": "t2"})
    if case == "another key":
        return await sealed_under(
            RawAesKeyring("starlette-tests", "other", os.urandom(32)), CONTEXT
        )
    blob = await sealed_under(ours, CONTEXT)
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
    case: str,
    status: int,
    code: str,
    error: type[errors.EnvelopeError],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bug: a bare 500 with a traceback. Now a 409 (intact, but bound to another
    context) or a 422 (nobody can open these bytes), a JSON body with a fixed code and
    nothing else (no exception text, no key name, no plaintext), and one WARNING line
    with the method, path, status, code, error class and the error's own text, for the
    operator to alert on."""
    blob = await unopenable(case)
    keyring = RawAesKeyring("starlette-tests", "app", KEY_BYTES)
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(error) as raised:
            await client.decrypt(blob, encryption_context=CONTEXT)
    app = make_app(lambda: EnvelopeClient(RawAesKeyring("starlette-tests", "app", KEY_BYTES)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with serving(app) as http:
            response = await http.post("/decrypt", content=blob)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.content == json.dumps({"error": code}, separators=(",", ":")).encode()
    assert "Retry-After" not in response.headers
    assert_logged_once(
        caplog,
        f"POST /decrypt answered {status} {code}: {type(raised.value).__name__}: {raised.value}",
        status=status,
        code=code,
    )
    assert KEY_BYTES.hex() not in caplog.text


async def test_a_handler_the_app_registered_first_is_kept() -> None:
    """An app that maps a wrong context to a 404 (its context encodes the tenant, so
    the answer must not confirm the object exists) keeps its handler, whichever of the
    two was installed first."""
    app = FastAPI()

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    app.add_exception_handler(errors.EncryptionContextMismatchError, not_found)
    install_error_handlers(app)

    @app.get("/records/{name}")
    async def record(name: str) -> None:
        raise errors.EncryptionContextMismatchError("sealed for another tenant")

    @app.get("/files/{name}")
    async def file(name: str) -> None:
        raise errors.AuthenticationError("frame 3 failed authentication")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        assert (await http.get("/records/r1")).status_code == 404
        answer = await http.get("/files/f1")
        assert (answer.status_code, answer.json()) == (422, {"error": "message_not_authentic"})


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
    kms_key: KmsKey, fault_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """KMS answering 500 to every Decrypt until the keyring's deadline: an outage, not
    an answer about this request, so 503 ``key_service_unavailable`` with Retry-After: 2
    (the breaker's own 503 takes over if it persists); the key ARN only in the log."""
    keyring = proxied_kms_keyring(fault_proxy, kms_key, deadline=0.5)
    app = make_app(lambda: EnvelopeClient(keyring, cache=None))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with serving(app) as http:
            blob = (await http.post("/encrypt", content=b"sealed before the outage")).content
            fault_proxy.fail_next(100, 500, operation="Decrypt")
            response = await http.post("/decrypt", content=blob)
    assert_retry_later(response, 503, "key_service_unavailable", 2)
    assert kms_key.arn not in response.text
    (record,) = integration_records(caplog)
    assert record.getMessage().startswith("POST /decrypt answered 503 key_service_unavailable: ")
    assert vars(record)["error_class"] in ("KMSError", "KMSTimeoutError")
    assert kms_key.arn in record.getMessage()


async def test_kms_refusing_access_is_a_generic_500_on_encrypt_and_no_usable_key_on_decrypt(
    kms_key: KmsKey, fault_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """AccessDenied is an answer, not an outage: no Retry-After. On encrypt it is a
    ``KMSError`` (a server misconfiguration): 500 with a generic body, the ARN only in
    the log. On decrypt a KmsKeyring folds KMS's refusal of a data key into
    ``NoUsableKeyError`` (a message may carry keys it is not meant to open), so the
    answer is the message's 422 and the log line gives KMS's reason."""
    keyring = proxied_kms_keyring(fault_proxy, kms_key)
    app = make_app(lambda: EnvelopeClient(keyring, cache=None))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with serving(app) as http:
            blob = (await http.post("/encrypt", content=b"sealed before the change")).content
            fault_proxy.refuse_next(1, "AccessDeniedException", operation="GenerateDataKey")
            refused_encrypt = await http.post("/encrypt", content=b"x")
            fault_proxy.refuse_next(1, "AccessDeniedException", operation="Decrypt")
            refused_decrypt = await http.post("/decrypt", content=blob)
    assert (refused_encrypt.status_code, refused_encrypt.json()) == (
        500,
        {"error": "key_service_error"},
    )
    assert "Retry-After" not in refused_encrypt.headers
    assert (refused_decrypt.status_code, refused_decrypt.json()) == (
        422,
        {"error": "no_usable_key"},
    )
    assert kms_key.arn not in refused_encrypt.text + refused_decrypt.text
    lines = [r.getMessage() for r in integration_records(caplog)]
    assert [line.split(": ")[:2] for line in lines] == [
        ["POST /encrypt answered 500 key_service_error", "KMSError"],
        ["POST /decrypt answered 422 no_usable_key", "NoUsableKeyError"],
    ]
    assert all("AccessDeniedException" in line and kms_key.arn in line for line in lines)


async def test_a_branch_key_store_refused_by_kms_is_a_generic_500(
    branch_keys: tuple[str, str],
    make_branch_key_store: Callable[..., BranchKeyStore],
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hierarchical keyring's KMS Decrypt is of the branch key, which the server
    must always be allowed: a refusal is its misconfiguration, a 500 ``key_service_error``
    whatever the message."""
    tenant = branch_keys[0]
    async with EnvelopeClient(
        HierarchicalKeyring(make_branch_key_store(), branch_key_id=tenant)
    ) as w:
        blob = await w.encrypt(b"a record", encryption_context=CONTEXT)
    store = make_branch_key_store(endpoint_url=fault_proxy.url)
    app = make_app(lambda: EnvelopeClient(HierarchicalKeyring(store, branch_key_id=tenant)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with serving(app) as http:
            fault_proxy.refuse_next(1, "AccessDeniedException", operation="Decrypt")
            response = await http.post("/decrypt", content=blob)
            again = await http.post("/decrypt", content=blob)
    assert (response.status_code, response.json()) == (500, {"error": "key_service_error"})
    assert (again.status_code, again.content) == (200, b"a record")
    (record,) = integration_records(caplog)
    assert record.getMessage().startswith(
        "POST /decrypt answered 500 key_service_error: KMSError: "
    )
    assert "AccessDeniedException" in record.getMessage()


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
    a stored message with :func:`stream_response`. With ``corrupt_is_500``, the app
    maps the errors of a message gone bad at rest to a 500 of its own (registered after
    :func:`install_error_handlers`, for the base classes only)."""

    def __init__(
        self,
        http10_buffer_limit: int = DEFAULT_HTTP10_BUFFER_LIMIT,
        *,
        corrupt_is_500: bool = False,
    ) -> None:
        self.keyring = RawAesKeyring("starlette-tests", "downloads", os.urandom(32))
        self.sources: dict[str, CountedSource] = {}
        self.app = FastAPI(lifespan=envelope_lifespan(lambda: EnvelopeClient(self.keyring)))
        install_error_handlers(self.app)

        async def corrupt_at_rest(request: Request, exc: Exception) -> Response:
            return JSONResponse({"error": "stored_object_corrupt"}, status_code=500)

        if corrupt_is_500:
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


DAMAGE_CODES = {"tampered": "message_not_authentic", "truncated": "message_truncated"}


@pytest.mark.parametrize("damage", DAMAGES)
async def test_damaged_message_over_http10_is_an_error_status_not_a_body_cut_at_the_close(
    damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The bug: the first megabyte or so of plaintext went out under a 200, then the
    connection closed, which is how an HTTP/1.0 body ends. Now the whole message is
    checked first, and the failure reaches the app's exception handlers: a 422 with the
    damage's code, and the operator's log line."""
    downloads = Downloads()
    await downloads.store("doc", os.urandom(2 * MIB), damage)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with uvicorn_serving(downloads.app) as port:
            answer = await exchange(port, http10_get("/objects/doc"))
    assert (answer.status, answer.complete) == (422, True), answer.raw[:300]
    assert json.loads(answer.body) == {"error": DAMAGE_CODES[damage]}
    assert downloads.sources["doc"].closed
    assert [r.getMessage().split(":")[0] for r in integration_records(caplog)] == [
        f"GET /objects/doc answered 422 {DAMAGE_CODES[damage]}"
    ]


@pytest.mark.parametrize("damage", DAMAGES)
async def test_an_apps_own_handler_for_a_base_class_replaces_the_mapping_for_its_family(
    damage: str,
) -> None:
    """An app that knows its storage may answer a corrupt object with its own 500: one
    handler for ``MalformedMessageError`` covers ``TruncatedMessageError`` too, since
    install_error_handlers registers the roots of each family only."""
    downloads = Downloads(corrupt_is_500=True)
    await downloads.store("doc", os.urandom(2 * MIB), damage)
    async with uvicorn_serving(downloads.app) as port:
        answer = await exchange(port, http10_get("/objects/doc"))
    assert (answer.status, answer.complete) == (500, True), answer.raw[:300]
    assert json.loads(answer.body) == {"error": "stored_object_corrupt"}


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
@pytest.mark.parametrize("damage", DAMAGES)
async def test_damaged_message_over_http11_ends_without_the_terminating_chunk(
    damage: str, close: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """HTTP/1.1 is streamed, with or without ``Connection: close``: chunked (never
    close-delimited), and when decryption fails uvicorn drops the connection without
    the zero-length chunk that ends a chunked body, so the client sees it incomplete."""
    downloads = Downloads()
    plaintext = os.urandom(2 * MIB)
    await downloads.store("doc", plaintext, damage)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with uvicorn_serving(downloads.app) as port:
            answer = await exchange(port, http11_get("/objects/doc", close=close))
    assert_streamed_then_cut_short(answer, plaintext)
    # The status went out before the damage was reached, so no handler ran: the line
    # that says why the body was cut off comes from stream_response.
    assert [r.getMessage().split(":")[0] for r in integration_records(caplog)] == [
        "GET /objects/doc cut off mid-body (the status had been sent; would have been "
        f"422 {DAMAGE_CODES[damage]})"
    ]


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
