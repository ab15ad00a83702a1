"""The Vault transit keyring under pressure: concurrent calls share one login and its
outcome, one deadline covers a whole call, a hostile message cannot make the keyring
throw its token away, the client's close cuts calls off cleanly, and what the keyring
raises never carries the token. Against the real OpenBao dev server (through a
FaultProxy that holds and counts requests as the server side saw them), or a raw socket
server where Vault's own answers cannot be made odd enough."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
from fault_proxy import FaultProxy, wait_for
from vault_server import VaultServer, transit_operation

from aioenvelope import (
    AppRoleAuth,
    EnvelopeClient,
    RateLimit,
    VaultTransitKeyring,
    errors,
)

CONTEXT = {"tenant": "t1", "purpose": "vault-pressure"}
PLAINTEXT = b"under pressure"
TOKEN = "hvs.not-to-be-seen-anywhere"


def only_for(key: str, *capabilities: str) -> str:
    """A policy granting ``update`` on each of ``capabilities`` (datakey, decrypt,
    encrypt) of ``key`` and nothing else (the default policy comes with AppRole)."""
    paths = {"datakey": f"transit/datakey/plaintext/{key}"}
    return "".join(
        f'path "{paths.get(c, f"transit/{c}/{key}")}" {{ capabilities = ["update"] }}\n'
        for c in capabilities
    )


def approle_for(
    vault_server: VaultServer, key: str, *capabilities: str, **role: str | int
) -> AppRoleAuth:
    name = f"p-{key}-{'-'.join(capabilities)}"
    vault_server.put_policy(name, only_for(key, *capabilities))
    role_id, secret_id = vault_server.approle([name], **role)
    return AppRoleAuth(role_id, secret_id)


async def outcomes(calls: list[Callable[[], Awaitable[object]]]) -> list[BaseException]:
    """Run ``calls`` concurrently; each one's exception (each must fail)."""
    results = await asyncio.gather(*(call() for call in calls), return_exceptions=True)
    assert all(isinstance(r, BaseException) for r in results), results
    return [r for r in results if isinstance(r, BaseException)]


async def raw_server(reply: bytes) -> tuple[asyncio.Server, str]:
    """A server that answers every request with the bytes ``reply`` and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def answering() -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(reply: bytes) -> str:
        server, url = await raw_server(reply)
        servers.append(server)
        return url

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and every exception reachable from it as cause or context."""
    seen: list[BaseException] = []
    while exc is not None and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


# -- one login for every waiting call ----------------------------------------------------


async def test_a_hanging_login_is_one_login_for_all_waiting_calls(
    vault_server: VaultServer,
) -> None:
    """The login hangs while eight calls need a token: the server sees one login, and
    every call fails with that login's timeout (before, each waiter logged in again
    after the previous one's deadline: eight logins, the last call waiting eight
    deadlines)."""
    key = vault_server.create_key()
    auth = approle_for(vault_server, key, "datakey")
    with FaultProxy(vault_server.url, operation_of=transit_operation) as proxy:
        keyring = VaultTransitKeyring(key, url=proxy.url, auth=auth, deadline=0.3, check_keys=False)
        async with EnvelopeClient(keyring, cache=None) as client:
            proxy.hang(True)
            failed = await outcomes(
                [
                    partial(client.encrypt, PLAINTEXT, encryption_context={"i": str(i)})
                    for i in range(8)
                ]
            )
            proxy.hang(False)
            logins = proxy.requests().get("login", 0)
    assert logins == 1
    assert all(isinstance(f, errors.VaultError) for f in failed)
    assert {(f.operation, f.error_code) for f in failed if isinstance(f, errors.VaultError)} == {
        ("login", "Timeout")
    }
    assert "datakey" not in keyring.vault_calls  # none was sent


async def test_a_bad_secret_id_is_one_login_for_concurrent_calls_and_no_request(
    vault_server: VaultServer,
) -> None:
    """Twenty concurrent calls with a wrong secret ID: one login, its refusal is every
    call's answer (a login error, not transient), and no datakey is counted, since none
    was sent."""
    key = vault_server.create_key()
    role_id, _ = vault_server.approle(["default"])
    keyring = VaultTransitKeyring(
        key, url=vault_server.url, auth=AppRoleAuth(role_id, "wrong-secret"), check_keys=False
    )
    async with EnvelopeClient(keyring, cache=None) as client:
        failed = await outcomes(
            [
                partial(client.encrypt, PLAINTEXT, encryption_context={"i": str(i)})
                for i in range(20)
            ]
        )
    assert keyring.vault_calls == {"login": 1}
    assert all(
        isinstance(f, errors.VaultError) and f.operation == "login" and not f.transient
        for f in failed
    )


async def test_a_failed_login_surfaces_as_a_login_error_on_decrypt_and_spends_no_rate_limit(
    vault_server: VaultServer,
) -> None:
    """Decrypt with a wrong secret ID: a VaultError of the login (not a NoUsableKeyError
    blaming the message), and the decrypt rate limit's single token is not taken by a
    request that was never sent (the second decrypt is refused by the login again, not
    by the rate limit)."""
    key = vault_server.create_key()
    writer = VaultTransitKeyring(key, url=vault_server.url, token=vault_server.root_token)
    async with EnvelopeClient(writer, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    role_id, _ = vault_server.approle(["default"])
    keyring = VaultTransitKeyring(
        key, url=vault_server.url, auth=AppRoleAuth(role_id, "wrong-secret"), check_keys=False
    )
    limit = RateLimit(rate=0.001, burst=1)
    async with EnvelopeClient(keyring, cache=None, decrypt_rate_limit=limit) as client:
        for _ in range(2):
            with pytest.raises(errors.VaultError) as info:
                await client.decrypt(message, encryption_context=CONTEXT)
            assert info.value.operation == "login"
            assert not isinstance(info.value, errors.NoUsableKeyError)
    assert "decrypt" not in keyring.vault_calls


# -- one deadline per call -------------------------------------------------------------


async def test_a_slow_login_and_a_slow_request_share_the_calls_deadline(
    vault_server: VaultServer,
) -> None:
    """A login and a request each slower than half the deadline: the call times out
    (before, each had a deadline of its own and the call succeeded after almost twice
    its deadline)."""
    key = vault_server.create_key()
    auth = approle_for(vault_server, key, "datakey")
    with FaultProxy(vault_server.url, operation_of=transit_operation) as proxy:
        keyring = VaultTransitKeyring(key, url=proxy.url, auth=auth, deadline=0.6, check_keys=False)
        async with EnvelopeClient(keyring, cache=None) as client:
            proxy.slow_next(1, 0.45, operation="login")
            proxy.slow_next(1, 0.45, operation="datakey")
            with pytest.raises(errors.VaultError) as info:
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert (info.value.operation, info.value.error_code) == ("datakey", "Timeout")
    assert "within 0.6 s, the call's one deadline" in str(info.value)


async def test_the_wait_for_a_connection_is_within_the_deadline(
    vault_server: VaultServer,
) -> None:
    """Forty calls to a hung server, thirty-two connections: the eight that wait for a
    connection still fail at their deadline, not a full deadline after getting one. (The
    one bound on time here is the deadline's promise itself, with a half-deadline of
    slack; before, the waiters took two deadlines.)"""
    key = vault_server.create_key()
    deadline = 0.5
    with FaultProxy(vault_server.url, operation_of=transit_operation) as proxy:
        keyring = VaultTransitKeyring(
            key, url=proxy.url, token=vault_server.root_token, deadline=deadline
        )
        async with EnvelopeClient(keyring, cache=None) as client:
            proxy.hang(True)

            async def one(i: int) -> float:
                started = time.monotonic()
                with pytest.raises(errors.VaultError) as info:
                    await client.encrypt(PLAINTEXT, encryption_context={"i": str(i)})
                assert info.value.error_code == "Timeout"
                return time.monotonic() - started

            took = await asyncio.gather(*(one(i) for i in range(40)))
            proxy.hang(False)
    assert max(took) < 1.5 * deadline


async def test_decrypt_stops_at_the_first_outage_instead_of_trying_every_edk(
    vault_server: VaultServer,
) -> None:
    """A message under four keys, the server hung: the first EDK's timeout ends the
    decrypt (transient), and the server sees one decrypt request, not four (each of
    which waited out a deadline of its own)."""
    keys = [vault_server.create_key() for _ in range(4)]
    with FaultProxy(vault_server.url, operation_of=transit_operation) as proxy:
        keyring = VaultTransitKeyring(
            keys[0],
            additional_key_names=keys[1:],
            url=proxy.url,
            token=vault_server.root_token,
            deadline=0.3,
        )
        async with EnvelopeClient(keyring, cache=None) as client:
            message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            proxy.hang(True)
            with pytest.raises(errors.VaultError) as info:
                await client.decrypt(message, encryption_context=CONTEXT)
            proxy.hang(False)
            decrypts = proxy.requests().get("decrypt", 0)
    assert (info.value.error_code, info.value.transient) == ("Timeout", True)
    assert decrypts == 1


# -- a 403: the policy's, or a dead token's ----------------------------------------------


async def test_messages_under_a_key_the_policy_cannot_decrypt_with_cost_no_login(
    vault_server: VaultServer,
) -> None:
    """An escrow key the role may encrypt to but not decrypt with: messages naming only
    it (anyone's to send) are refused by the policy. The token is asked about itself
    (lookup-self), found alive and kept: no login, so a secret ID good for two logins is
    not spent and legitimate decrypts go on working (before, each such message threw
    the token away and logged in again, until the secret ID was used up)."""
    main, escrow = vault_server.create_key(), vault_server.create_key()
    name = f"esc-{main}"
    vault_server.put_policy(
        name, only_for(main, "datakey", "decrypt") + only_for(escrow, "encrypt")
    )
    role_id, secret_id = vault_server.approle([name], secret_id_num_uses=2, token_ttl="1h")
    attacker = VaultTransitKeyring(escrow, url=vault_server.url, token=vault_server.root_token)
    async with EnvelopeClient(attacker, cache=None) as client:
        hostile = await client.encrypt(b"evil", encryption_context=CONTEXT)
    keyring = VaultTransitKeyring(
        main,
        additional_key_names=[escrow],
        url=vault_server.url,
        auth=AppRoleAuth(role_id, secret_id),
        check_keys=False,
    )
    async with EnvelopeClient(keyring, cache=None) as client:
        good = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        for _ in range(3):
            with pytest.raises(errors.NoUsableKeyError, match="HTTP 403"):
                await client.decrypt(hostile, encryption_context=CONTEXT)
        assert await client.decrypt(good, encryption_context=CONTEXT) == PLAINTEXT
    assert keyring.vault_calls["login"] == 1
    assert keyring.vault_calls["lookup"] == 3


# -- the client's close -------------------------------------------------------------------


async def test_closing_the_client_during_a_retry_is_a_library_error_and_no_breaker_verdict(
    vault_server: VaultServer,
) -> None:
    """The client exits while a call is between retries: the call fails with a
    ConfigurationError saying the client was closed (not a bare AssertionError), and
    the cut-off request counts as no failure of the server."""
    key = vault_server.create_key()
    with FaultProxy(vault_server.url, operation_of=transit_operation) as proxy:
        keyring = VaultTransitKeyring(key, url=proxy.url, token=vault_server.root_token)
        client = EnvelopeClient(keyring, cache=None)
        await client.__aenter__()
        proxy.fail_next(1, 500, operation="datakey")
        proxy.slow_next(1, 0.5, operation="datakey")
        task = asyncio.create_task(client.encrypt(PLAINTEXT, encryption_context=CONTEXT))
        await wait_for(lambda: proxy.requests().get("datakey", 0) >= 1, "the first datakey")
        await client.__aexit__(None, None, None)
        with pytest.raises(errors.ConfigurationError, match="EnvelopeClient was closed while"):
            await task
    assert client.stats.breaker_states[keyring.breaker_name] == "closed"


# -- what is raised ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", b"garbage\r\n\r\n"],
    ids=["bad-content-length", "not-http"],
)
async def test_the_token_is_not_reachable_from_what_is_raised(
    reply: bytes,
    answering: Callable[[bytes], Awaitable[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp's response errors hold the request's headers (the token among them): they
    are never the cause or context of a VaultError, whose text still names them."""
    caplog.set_level(logging.DEBUG)
    url = await answering(reply)
    keyring = VaultTransitKeyring("k1", url=url, token=TOKEN, check_keys=False, max_attempts=2)
    with pytest.raises(errors.VaultError) as info:
        async with EnvelopeClient(keyring, cache=None) as client:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert info.value.error_code == "ConnectionError"
    assert "Error" in str(info.value)  # aiohttp's exception type, named in the text
    assert TOKEN not in "".join(traceback.format_exception(info.value))
    assert TOKEN not in " ".join(repr(e) + repr(vars(e)) for e in chain(info.value))
    assert TOKEN not in caplog.text


async def test_an_error_is_never_its_own_cause(unused_tcp_port: int) -> None:
    """A single failed attempt is raised as it is, not chained to itself (a loop in
    ``__cause__`` that trips up anything walking the chain)."""
    keyring = VaultTransitKeyring(
        "k1",
        url=f"http://127.0.0.1:{unused_tcp_port}",
        token="t",
        check_keys=False,
        max_attempts=1,
    )
    async with EnvelopeClient(keyring, cache=None) as client:
        with pytest.raises(errors.VaultError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert info.value.error_code == "ConnectionError"
    assert info.value.__cause__ is not info.value


async def test_a_deeply_nested_json_answer_is_a_vault_error(
    answering: Callable[[bytes], Awaitable[str]],
) -> None:
    """200,000 nested brackets in an error answer: a VaultError (the server's words
    left out), not a bare RecursionError from the JSON parser."""
    body = b"[" * 200_000
    url = await answering(
        b"HTTP/1.1 500 Internal\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    keyring = VaultTransitKeyring("k1", url=url, token="t", check_keys=False, max_attempts=1)
    async with EnvelopeClient(keyring, cache=None) as client:
        with pytest.raises(errors.VaultError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert info.value.error_code == "ServerError"


async def test_a_standby_redirect_is_not_followed_and_says_where_to_point(
    answering: Callable[[bytes], Awaitable[str]],
) -> None:
    """An HA standby answers 307 to the active node: not followed (the token would go
    wherever Location says), retried as during a fail-over, then a transient
    ``Redirected`` error naming the target without its credentials."""
    url = await answering(
        b"HTTP/1.1 307 Temporary Redirect\r\n"
        b"Location: http://user:pw@active.example:8200/v1/transit/datakey/plaintext/k1\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    keyring = VaultTransitKeyring("k1", url=url, token="t", check_keys=False, max_attempts=2)
    async with EnvelopeClient(keyring, cache=None) as client:
        with pytest.raises(errors.VaultError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert (info.value.error_code, info.value.transient) == ("Redirected", True)
    assert "http://active.example:8200" in str(info.value)
    assert "pw" not in str(info.value)


async def test_answers_that_are_not_vaults_count_against_the_breaker(
    answering: Callable[[bytes], Awaitable[str]],
) -> None:
    """A 200 whose body is not JSON (a proxy's page, say) is not Vault answering: five
    of them open the breaker, as an outage would, instead of each proving it up."""
    page = b"<html>sign in</html>"
    url = await answering(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(page)
        + page
    )
    keyring = VaultTransitKeyring("k1", url=url, token="t", check_keys=False)
    async with EnvelopeClient(keyring, cache=None) as client:
        for i in range(5):
            with pytest.raises(errors.VaultError) as info:
                await client.encrypt(PLAINTEXT, encryption_context={"i": str(i)})
            assert info.value.error_code == "InvalidResponse"
        with pytest.raises(errors.CircuitOpenError):
            await client.encrypt(PLAINTEXT, encryption_context={"i": "5"})
    assert client.stats.breaker_states[keyring.breaker_name] == "open"
