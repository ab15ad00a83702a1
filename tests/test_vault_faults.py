"""The Vault transit keyring when the server is not well: sealed, stopped, slow, failing
with 5xx; and what caching saves it (one datakey for 10,000 encrypts, one decrypt for
10,000 concurrent decrypts). The server is the real OpenBao dev server; a FaultProxy in
front of it delays and fails requests and counts them as the server side saw them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from fake_clock import FakeClock
from fastapi import FastAPI, Request, Response
from fault_proxy import FaultProxy
from task_leaks import other_tasks, settle
from vault_server import VaultServer, running_vault, transit_operation

from aioenvelope import CacheConfig, EnvelopeClient, VaultTransitKeyring, errors
from aioenvelope.integrations.starlette import install_error_handlers

CONTEXT = {"tenant": "t1", "purpose": "vault-faults"}
PLAINTEXT = b"while the server is unwell"
THRESHOLD = 5  # CircuitBreakerConfig's default failures in a row


@pytest.fixture
def proxy(vault_server: VaultServer) -> Iterator[FaultProxy]:
    with FaultProxy(vault_server.url, operation_of=transit_operation) as proxy:
        yield proxy


@pytest.fixture
def vault_key(vault_server: VaultServer) -> str:
    return vault_server.create_key()


@pytest.fixture
def through_proxy(
    vault_server: VaultServer, proxy: FaultProxy, vault_key: str
) -> Callable[..., VaultTransitKeyring]:
    def make(**options: Any) -> VaultTransitKeyring:
        return VaultTransitKeyring(
            vault_key, url=proxy.url, token=vault_server.root_token, **options
        )

    return make


def established_to(port: int) -> int:
    """This machine's TCP connections to ``port`` that are still ESTABLISHED, from
    /proc/net/tcp (the client side of each: remote port ``port``)."""
    count = 0
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if int(remote.rsplit(":", 1)[1], 16) == port and state == "01":
                count += 1
    return count


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_a_sealed_server_is_an_outage_retried_then_reported_transient(
    vault_server: VaultServer, vault_key: str
) -> None:
    """Sealed (503 ``Vault is sealed``): each call is retried within its deadline, then
    fails transient with ``Sealed``; five such calls open the breaker; once unsealed
    (and the breaker's probe lets a call through) the keyring works again."""
    keyring = VaultTransitKeyring(
        vault_key, url=vault_server.url, token=vault_server.root_token, deadline=1.0
    )
    clock = FakeClock()
    async with EnvelopeClient(keyring, cache=None, clock=clock) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        vault_server.seal()
        try:
            for _ in range(THRESHOLD):
                with pytest.raises(errors.VaultError) as info:
                    await client.decrypt(message)
                assert info.value.error_code == "Sealed"
                assert info.value.transient is True
                assert "sealed" in str(info.value)
            assert client.stats.breaker_states[keyring.breaker_name] == "open"
            with pytest.raises(errors.CircuitOpenError):
                await client.encrypt(PLAINTEXT)
        finally:
            vault_server.unseal()
        clock.advance(30)
        assert await client.decrypt(message) == PLAINTEXT
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"


async def test_a_stopped_server_is_a_transient_connection_error() -> None:
    """A server that has gone (connection refused): retried within the deadline, then a
    transient VaultError that says it could not connect, and names the server."""
    servers = running_vault()
    server = next(servers)
    key = server.create_key()
    keyring = VaultTransitKeyring(key, url=server.url, token=server.root_token, deadline=1.0)
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        servers.close()  # stops it by its PID
        with pytest.raises(errors.VaultError) as info:
            await client.decrypt(message)
    assert info.value.transient is True
    assert info.value.error_code == "ConnectionError"
    assert "connection error" in str(info.value)
    assert server.url in str(info.value)
    assert keyring.vault_calls["decrypt"] == 1


async def test_a_slow_server_times_out_at_the_deadline_leaving_no_task_or_connection(
    through_proxy: Callable[..., VaultTransitKeyring], proxy: FaultProxy
) -> None:
    """A request held longer than the deadline fails transient (``Timeout``) at the
    deadline; a merely slow one succeeds. After the client exits no task of ours is
    left, and no connection to the server is still open."""
    before = other_tasks()
    keyring = through_proxy(deadline=0.5)
    async with EnvelopeClient(keyring, cache=None) as client:
        proxy.slow_next(1, 3.0, operation="datakey")
        with pytest.raises(errors.VaultError) as info:
            await client.encrypt(PLAINTEXT)
        assert info.value.error_code == "Timeout"
        assert info.value.transient is True
        assert "within 0.5 s" in str(info.value)
        proxy.slow_next(1, 0.1, operation="datakey")
        message = await client.encrypt(PLAINTEXT)
        assert await client.decrypt(message) == PLAINTEXT
    await settle(lambda: other_tasks() <= before, "the keyring's tasks end")
    await settle(lambda: established_to(port_of(proxy.url)) == 0, "its connections close")


async def test_5xx_bursts_are_retried_within_the_deadline_then_open_the_breaker(
    through_proxy: Callable[..., VaultTransitKeyring], proxy: FaultProxy
) -> None:
    """Two 502s then an answer: one call, three requests, success. Then every request
    fails: each call makes ``max_attempts`` requests and fails transient; the fifth
    opens the breaker, after which calls cost no request. No task or connection left."""
    before = other_tasks()
    keyring = through_proxy(deadline=5.0, max_attempts=3)
    async with EnvelopeClient(keyring, cache=None, clock=FakeClock()) as client:
        proxy.json_error_next(2, 502, {"errors": ["bad gateway"]}, operation="datakey")
        message = await client.encrypt(PLAINTEXT)
        assert proxy.requests()["datakey"] == 3
        assert keyring.vault_calls["datakey"] == 1

        proxy.json_error_next(100, 500, {"errors": ["internal error"]})
        for _ in range(THRESHOLD):
            with pytest.raises(errors.VaultError) as info:
                await client.decrypt(message)
            assert info.value.transient is True
            assert info.value.error_code == "ServerError"
        assert "the last of 3 attempts" in str(info.value)
        assert proxy.requests()["decrypt"] == 3 * THRESHOLD
        assert client.stats.breaker_states[keyring.breaker_name] == "open"
        with pytest.raises(errors.CircuitOpenError):
            await client.decrypt(message)
        with pytest.raises(errors.CircuitOpenError):
            await client.encrypt(PLAINTEXT)
        assert proxy.requests()["decrypt"] == 3 * THRESHOLD
        assert proxy.requests()["datakey"] == 3
    await settle(lambda: other_tasks() <= before, "the keyring's tasks end")
    await settle(lambda: established_to(port_of(proxy.url)) == 0, "its connections close")


async def test_cache_hits_keep_working_while_the_breaker_is_open(
    through_proxy: Callable[..., VaultTransitKeyring], proxy: FaultProxy
) -> None:
    """With caching, a message whose data key is cached still decrypts, and encrypts
    under a cached data key still succeed, while the server is down."""
    keyring = through_proxy(max_attempts=1)
    async with EnvelopeClient(keyring, cache=CacheConfig(), clock=FakeClock()) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(message) == PLAINTEXT
        proxy.json_error_next(THRESHOLD, 503, {"errors": ["Vault is sealed"]})
        for i in range(THRESHOLD):
            with pytest.raises(errors.VaultError):
                await client.encrypt(PLAINTEXT, encryption_context={"other": str(i)})
        assert client.stats.breaker_states[keyring.breaker_name] == "open"
        assert await client.decrypt(message) == PLAINTEXT
        again = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(again) == PLAINTEXT


async def test_a_callers_session_is_left_open_with_no_connection_in_use(
    through_proxy: Callable[..., VaultTransitKeyring], proxy: FaultProxy
) -> None:
    """After failures and timeouts through a caller's session, the session is open and
    usable, and none of its connections is held by the keyring."""
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=connector) as session:
        keyring = through_proxy(session=session, deadline=0.3, max_attempts=1)
        async with EnvelopeClient(keyring, cache=None) as client:
            for _ in range(4):
                proxy.slow_next(1, 2.0, operation="datakey")
                with pytest.raises(errors.VaultError):
                    await client.encrypt(PLAINTEXT)
            message = await client.encrypt(PLAINTEXT)  # a connection was free for it
            assert await client.decrypt(message) == PLAINTEXT
        assert not session.closed
        async with session.get(f"{proxy.url}/v1/sys/health") as response:
            assert response.status == 200


async def test_ten_thousand_encrypts_under_one_context_make_one_datakey_request(
    through_proxy: Callable[..., VaultTransitKeyring], proxy: FaultProxy
) -> None:
    """Caching and coalescing as for KMS: 10,000 concurrent encrypts under one context
    share one data key, one datakey request as the server saw it."""
    async with EnvelopeClient(through_proxy(), cache=CacheConfig()) as client:
        messages = await asyncio.gather(
            *(client.encrypt(PLAINTEXT, encryption_context=CONTEXT) for _ in range(10_000))
        )
    assert len(set(messages)) == 10_000
    assert proxy.requests().get("datakey") == 1
    assert proxy.requests().get("encrypt", 0) == 0


async def test_ten_thousand_concurrent_decrypts_of_one_message_make_one_decrypt_request(
    through_proxy: Callable[..., VaultTransitKeyring], proxy: FaultProxy
) -> None:
    """10,000 concurrent decrypts of one message: one decrypt request (coalesced, then
    cached), as the server saw it."""
    async with EnvelopeClient(through_proxy(), cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    async with EnvelopeClient(through_proxy(), cache=CacheConfig()) as client:
        plaintexts = await asyncio.gather(*(client.decrypt(message) for _ in range(10_000)))
    assert set(plaintexts) == {PLAINTEXT}
    assert proxy.requests().get("decrypt") == 1


async def test_rate_limited_answers_are_retried_and_refusals_are_not(
    vault_server: VaultServer,
    through_proxy: Callable[..., VaultTransitKeyring],
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """429 (a rate-limit quota) is retried like a 5xx; a 400 is an answer, sent once.
    The log lines of both name the operation and key, never the token."""
    caplog.set_level("DEBUG", logger="aioenvelope")
    keyring = through_proxy(deadline=5.0)
    async with EnvelopeClient(keyring, cache=None) as client:
        proxy.json_error_next(2, 429, {"errors": ["rate limit quota exceeded"]})
        message = await client.encrypt(PLAINTEXT)
        assert proxy.requests()["datakey"] == 3
        proxy.json_error_next(1, 400, {"errors": ["invalid request"]})
        with pytest.raises(errors.NoUsableKeyError) as info:
            await client.decrypt(message)
        assert proxy.requests()["decrypt"] == 1
        assert "InvalidRequest" not in str(info.value)
        assert "HTTP 400: invalid request" in str(info.value)
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
    logged = [record.getMessage() for record in caplog.records]
    assert any("decrypt" in line for line in logged)
    assert not [line for line in logged if vault_server.root_token in line]


@pytest.mark.parametrize("answer", ["5xx", "forbidden"])
async def test_the_web_integrations_answer_vault_failures_like_any_key_service(
    through_proxy: Callable[..., VaultTransitKeyring], proxy: FaultProxy, answer: str
) -> None:
    """One error base for every key service: a FastAPI app with install_error_handlers
    answers a Vault outage with 503 and Retry-After, and a refusal to encrypt (403) with
    a generic 500, exactly as it does for KMS, with no token, URL or key name in the
    body. (A 403 on decrypt is folded into NoUsableKeyError, a 422, as KMS's AccessDenied
    is: another encrypted data key of the message may still open.)"""
    keyring = through_proxy(deadline=0.5, max_attempts=2)
    async with EnvelopeClient(keyring, cache=None) as client:
        app = FastAPI()
        install_error_handlers(app)

        @app.post("/seal")
        async def seal(request: Request) -> Response:
            return Response(await client.encrypt(await request.body()))

        if answer == "5xx":
            proxy.json_error_next(100, 500, {"errors": ["internal error"]})
        else:
            denied = {"errors": ["1 error occurred:\n\t* permission denied\n\n"]}
            proxy.json_error_next(1, 403, denied)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            answered = await http.post("/seal", content=PLAINTEXT)
    if answer == "5xx":
        assert answered.status_code == 503
        assert answered.json() == {"error": "key_service_unavailable", "retry_after": 2}
        assert answered.headers["retry-after"] == "2"
    else:
        assert answered.status_code == 500
        assert answered.json() == {"error": "key_service_error"}
