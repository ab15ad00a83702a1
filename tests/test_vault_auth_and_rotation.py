"""Tokens and key versions on a real OpenBao dev server: AppRole with a narrow policy,
tokens that expire under a running client, policies that lack a capability, and key
rotation with ``min_decryption_version``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from vault_server import VaultServer

from aioenvelope import AppRoleAuth, EnvelopeClient, VaultTransitKeyring, errors, inspect

CONTEXT = {"tenant": "t1", "purpose": "vault-auth"}
PLAINTEXT = b"under a short-lived token"


def narrow_policy(key: str, *, decrypt: bool = True, read: bool = True) -> str:
    """The policy the docs recommend: update on the three transit paths of one key (no
    create: a typo cannot make a key), and read on the key for the start-up check."""
    paths = [f"transit/datakey/plaintext/{key}", f"transit/encrypt/{key}"]
    if decrypt:
        paths.append(f"transit/decrypt/{key}")
    hcl = "".join(f'path "{p}" {{ capabilities = ["update"] }}\n' for p in paths)
    if read:
        hcl += f'path "transit/keys/{key}" {{ capabilities = ["read"] }}\n'
    return hcl


@pytest.fixture
def policy_for(vault_server: VaultServer) -> Callable[..., str]:
    """``policy_for(key, decrypt=..., read=...)``: a new policy's name."""
    count = 0

    def make(key: str, **options: bool) -> str:
        nonlocal count
        count += 1
        name = f"{key}-p{count}"
        vault_server.put_policy(name, narrow_policy(key, **options))
        return name

    return make


async def test_approle_with_the_narrow_policy_encrypts_and_decrypts(
    vault_server: VaultServer, policy_for: Callable[..., str]
) -> None:
    """Logged in with AppRole under update-only transit paths and read on the key: the
    check, a round trip, one login; the same works with check_keys=False and no read."""
    key = vault_server.create_key()
    role_id, secret_id = vault_server.approle([policy_for(key)])
    keyring = VaultTransitKeyring(key, url=vault_server.url, auth=AppRoleAuth(role_id, secret_id))
    async with EnvelopeClient(keyring) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
    assert keyring.vault_calls["login"] == 1

    role_id, secret_id = vault_server.approle([policy_for(key, read=False)])
    unchecked = VaultTransitKeyring(
        key, url=vault_server.url, auth=AppRoleAuth(role_id, secret_id), check_keys=False
    )
    async with EnvelopeClient(unchecked, cache=None) as client:
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT


async def test_start_up_check_without_read_says_to_grant_it_or_skip_the_check(
    vault_server: VaultServer, policy_for: Callable[..., str]
) -> None:
    """A policy with no read on the key fails the check, naming the path and the way
    out (check_keys=False)."""
    key = vault_server.create_key()
    token = vault_server.token([policy_for(key, read=False)])
    keyring = VaultTransitKeyring(key, url=vault_server.url, token=token)
    with pytest.raises(errors.VaultKeyCheckError) as info:
        async with EnvelopeClient(keyring):
            pass
    said = str(info.value)
    assert f"may not read transit/keys/{key}" in said
    assert "check_keys=False" in said
    assert token not in said


async def test_a_token_past_its_ttl_is_renewed_or_replaced_without_a_failed_request(
    vault_server: VaultServer, policy_for: Callable[..., str]
) -> None:
    """Tokens of 3 s, at most 5 s in all: a client encrypting and decrypting for 5 s
    never meets a 403; the keyring renewed the token, then logged in again when it
    could not be renewed further."""
    key = vault_server.create_key()
    role_id, secret_id = vault_server.approle([policy_for(key)], token_ttl="3s", token_max_ttl="5s")
    keyring = VaultTransitKeyring(key, url=vault_server.url, auth=AppRoleAuth(role_id, secret_id))
    rounds = 0
    async with EnvelopeClient(keyring, cache=None) as client:
        loop = asyncio.get_running_loop()
        until = loop.time() + 5.5
        while loop.time() < until:
            message = await client.encrypt(PLAINTEXT, encryption_context={"n": str(rounds)})
            assert await client.decrypt(message) == PLAINTEXT
            rounds += 1
            await asyncio.sleep(0.1)
    calls = keyring.vault_calls
    assert calls.get("renew", 0) >= 1
    assert calls["login"] >= 2
    assert calls["datakey"] == rounds  # every request went through, none retried by us


async def test_a_revoked_token_costs_one_login_and_one_retry_not_a_loop(
    vault_server: VaultServer, policy_for: Callable[..., str]
) -> None:
    """The server revokes the keyring's token mid-lease: the next call's 403, and a 403
    on ``auth/token/lookup-self`` (the token asked about itself), make it log in once and
    retry, and the call succeeds. A policy's denial, on a token however old, is told
    apart the same way (the lookup succeeds) and costs no login: never a loop."""
    key = vault_server.create_key()
    role_id, secret_id = vault_server.approle([policy_for(key, decrypt=False)])
    keyring = VaultTransitKeyring(key, url=vault_server.url, auth=AppRoleAuth(role_id, secret_id))
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT)
        vault_server.request("PUT", "sys/leases/revoke-prefix/auth/approle/login", {})
        await client.encrypt(PLAINTEXT)
        assert keyring.vault_calls["login"] == 2
        assert keyring.vault_calls["lookup"] == 1
        # Decrypt is denied by the policy: the live token's 403 is the policy's.
        for _ in range(3):
            with pytest.raises(errors.NoUsableKeyError):
                await client.decrypt(message)
        assert keyring.vault_calls["login"] == 2
        assert keyring.vault_calls["lookup"] == 4


async def test_a_policy_without_decrypt_says_which_capability_is_missing(
    vault_server: VaultServer, policy_for: Callable[..., str]
) -> None:
    """403 on decrypt is an answer, not an outage: NoUsableKeyError whose text names
    the path and capability to grant, and no token."""
    key = vault_server.create_key()
    token = vault_server.token([policy_for(key, decrypt=False)])
    keyring = VaultTransitKeyring(key, url=vault_server.url, token=token)
    async with EnvelopeClient(keyring) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        with pytest.raises(errors.NoUsableKeyError) as info:
            await client.decrypt(message, encryption_context=CONTEXT)
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
    said = str(info.value)
    assert f"'update' on transit/decrypt/{key}" in said
    assert "HTTP 403" in said
    assert token not in said
    cause = info.value.__cause__  # the last refusal, chained
    assert isinstance(cause, errors.VaultError)
    assert cause.error_code == "PermissionDenied"
    assert cause.transient is False


async def test_a_bad_secret_id_fails_the_login_without_showing_it(
    vault_server: VaultServer, policy_for: Callable[..., str]
) -> None:
    """Wrong AppRole credentials: a VaultError of the login, not transient, and neither
    ID in its text or in the auth's repr."""
    key = vault_server.create_key()
    role_id, _ = vault_server.approle([policy_for(key)])
    auth = AppRoleAuth(role_id, "not-the-secret-id-0000")
    assert role_id not in repr(auth)
    assert "not-the-secret-id" not in repr(auth)
    keyring = VaultTransitKeyring(key, url=vault_server.url, auth=auth)
    with pytest.raises(errors.VaultError) as info:
        async with EnvelopeClient(keyring):
            pass
    assert info.value.operation == "login"
    assert info.value.transient is False
    assert "not-the-secret-id" not in str(info.value)
    assert role_id not in str(info.value)


async def test_rotation_reencrypt_and_min_decryption_version(
    vault_server: VaultServer,
) -> None:
    """After ``rotate``, new messages use v2 and old ones still open; ``reencrypt`` to
    the same keyring moves an old message to v2. Once ``min_decryption_version`` is 2,
    the moved message opens and an un-migrated one fails, saying why and what to do."""
    key = vault_server.create_key()
    keyring = VaultTransitKeyring(key, url=vault_server.url, token=vault_server.root_token)
    async with EnvelopeClient(keyring, cache=None) as client:
        migrated = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        left = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert vault_server.rotate(key) == 2
        fresh = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert inspect(fresh).encrypted_data_keys[0].ciphertext.startswith(b"vault:v2:")
        assert await client.decrypt(migrated) == PLAINTEXT  # v1 still opens
        migrated = await client.reencrypt(migrated, to_keyring=keyring)
        assert inspect(migrated).encrypted_data_keys[0].ciphertext.startswith(b"vault:v2:")

        vault_server.configure_key(key, min_decryption_version=2)
        assert await client.decrypt(migrated, encryption_context=CONTEXT) == PLAINTEXT
        with pytest.raises(errors.NoUsableKeyError) as info:
            await client.decrypt(left, encryption_context=CONTEXT)
    said = str(info.value)
    assert "min_decryption_version" in said
    assert "re-encrypt" in said
