"""The Vault transit keyring against a real OpenBao dev server: round trips, what is bound
to what, the start-up check, configuration, and hostile EDKs.

The shared behaviour of every remote keyring (retries, breaker, rate limit, counts under
caching) runs in the conformance suite (``vault-transit`` harness); these are the
Vault-specific parts.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from fault_proxy import FaultProxy
from kms_server import KmsKey
from vault_server import VaultServer, transit_operation

from aioenvelope import (
    AlgorithmSuite,
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    KmsKeyring,
    MultiKeyring,
    VaultTransitKeyring,
    errors,
    inspect,
)
from aioenvelope.format.encryption_context import serialize_encryption_context

CONTEXT = {"tenant": "t1", "purpose": "vault-keyring"}
PLAINTEXT = b"a record under a Vault transit key" * 5


@pytest.fixture
def vault_key(vault_server: VaultServer) -> str:
    return vault_server.create_key()


@pytest.fixture
def make_keyring(vault_server: VaultServer) -> Callable[..., VaultTransitKeyring]:
    def make(key: str, **options: Any) -> VaultTransitKeyring:
        options.setdefault("url", vault_server.url)
        options.setdefault("token", vault_server.root_token)
        return VaultTransitKeyring(key, **options)

    return make


@pytest.fixture
def proxy(vault_server: VaultServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of the dev server that counts transit requests."""
    with FaultProxy(vault_server.url, operation_of=transit_operation) as proxy:
        yield proxy


async def test_round_trip_under_one_key_writes_one_vault_edk_naming_mount_and_key(
    make_keyring: Callable[..., VaultTransitKeyring], vault_key: str
) -> None:
    """One key: one EDK, provider ``vault-transit``, info ``transit/<key>`` (no server
    address), ciphertext Vault's own ``vault:v1:`` string; it decrypts to the plaintext."""
    async with EnvelopeClient(make_keyring(vault_key)) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
    (edk,) = inspect(message).encrypted_data_keys
    assert edk.provider_id == "vault-transit"
    assert edk.provider_info == f"transit/{vault_key}".encode()
    assert edk.ciphertext.startswith(b"vault:v1:")


@pytest.mark.parametrize(
    ("suite", "made_by"),
    [
        (AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, "datakey"),
        (AlgorithmSuite.AES_128_GCM_IV12_TAG16_HKDF_SHA256, "datakey"),
        (AlgorithmSuite.AES_192_GCM_IV12_TAG16_HKDF_SHA256, "encrypt"),
    ],
    ids=["aes256", "aes128", "aes192"],
)
async def test_data_keys_have_the_suites_length_and_unwrap(
    make_keyring: Callable[..., VaultTransitKeyring],
    vault_key: str,
    suite: AlgorithmSuite,
    made_by: str,
) -> None:
    """Through the Keyring interface (the client writes only 256-bit committing suites):
    Vault's ``datakey`` makes 128- and 256-bit keys; a 192-bit suite's key is made
    locally and wrapped with ``encrypt``. Each unwraps to the same bytes."""
    keyring = make_keyring(vault_key)
    async with EnvelopeClient(keyring):
        made = await keyring.on_encrypt(EncryptionMaterials(suite, CONTEXT))
        recovered = await keyring.on_decrypt(
            DecryptionMaterials(suite, CONTEXT), made.encrypted_data_keys
        )
    assert made.plaintext_data_key is not None
    assert len(made.plaintext_data_key) == suite.key_length
    assert recovered.plaintext_data_key == made.plaintext_data_key
    assert keyring.vault_calls.get(made_by) == 1


async def test_empty_context_round_trips(
    make_keyring: Callable[..., VaultTransitKeyring], vault_key: str
) -> None:
    """No context: empty associated data on both sides, and the message opens."""
    async with EnvelopeClient(make_keyring(vault_key)) as client:
        assert await client.decrypt(await client.encrypt(PLAINTEXT)) == PLAINTEXT


async def test_several_keys_any_one_alone_decrypts(
    vault_server: VaultServer, make_keyring: Callable[..., VaultTransitKeyring]
) -> None:
    """``additional_key_names``: one datakey and one encrypt per extra key; each key's
    own keyring opens the message."""
    names = [vault_server.create_key() for _ in range(3)]
    writer = make_keyring(names[0], additional_key_names=names[1:])
    async with EnvelopeClient(writer) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert writer.vault_calls == {"keys": 3, "datakey": 1, "encrypt": 2}
    infos = [edk.provider_info for edk in inspect(message).encrypted_data_keys]
    assert infos == [f"transit/{n}".encode() for n in names]
    for name in names:
        reader = make_keyring(name)
        async with EnvelopeClient(reader) as client:
            assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        assert reader.vault_calls.get("decrypt") == 1  # only its own EDK was sent


async def test_multikeyring_of_vault_and_aws_kms_each_decrypts_alone(
    make_keyring: Callable[..., VaultTransitKeyring],
    vault_key: str,
    make_kms_keyring: Callable[..., KmsKeyring],
    kms_key: KmsKey,
) -> None:
    """Vault generates, KMS (moto) wraps too: either service alone opens the message."""
    both = MultiKeyring(generator=make_keyring(vault_key), children=[make_kms_keyring(kms_key)])
    async with EnvelopeClient(both) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    providers = [edk.provider_id for edk in inspect(message).encrypted_data_keys]
    assert providers == ["vault-transit", "aws-kms"]
    for alone in (make_keyring(vault_key), make_kms_keyring(kms_key)):
        async with EnvelopeClient(alone) as client:
            assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT


async def test_edk_moved_to_another_context_is_refused_by_vault(
    make_keyring: Callable[..., VaultTransitKeyring], vault_key: str, vault_server: VaultServer
) -> None:
    """The context is Vault's associated data: an EDK replayed under another context
    does not open (400 message authentication failed), with the right one it does."""
    async with EnvelopeClient(make_keyring(vault_key)) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    (edk,) = inspect(message).encrypted_data_keys
    right = base64.b64encode(serialize_encryption_context(CONTEXT)).decode()
    wrong = base64.b64encode(serialize_encryption_context({"tenant": "t2"})).decode()
    body = {"ciphertext": edk.ciphertext.decode()}
    vault_server.request("POST", f"transit/decrypt/{vault_key}", {**body, "associated_data": right})
    refused = vault_server.request(
        "POST", f"transit/decrypt/{vault_key}", {**body, "associated_data": wrong}, ok=(400,)
    )
    assert "message authentication failed" in str(refused["errors"])


async def test_wrong_required_context_is_refused_with_no_usable_key(
    make_keyring: Callable[..., VaultTransitKeyring], vault_key: str
) -> None:
    """A required context pair that the message does not have: Vault refuses the EDK and
    the error says the data key did not open under this key and context."""
    async with EnvelopeClient(make_keyring(vault_key)) as client:
        message = await client.encrypt(
            PLAINTEXT, encryption_context=CONTEXT, required_encryption_context_keys={"tenant"}
        )
    async with EnvelopeClient(make_keyring(vault_key)) as client:
        with pytest.raises(errors.NoUsableKeyError) as info:
            await client.decrypt(message, encryption_context={"tenant": "t2"})
    assert "NotAuthentic" not in str(info.value)
    assert "does not open under this key with this encryption context" in str(info.value)


async def test_message_under_another_vault_key_is_refused_without_a_request(
    vault_server: VaultServer, make_keyring: Callable[..., VaultTransitKeyring]
) -> None:
    """Another key's EDK names another key: skipped (no decrypt), and the error names
    the message's key and this keyring's."""
    a, b = vault_server.create_key(), vault_server.create_key()
    async with EnvelopeClient(make_keyring(a)) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    reader = make_keyring(b)
    async with EnvelopeClient(reader) as client:
        with pytest.raises(errors.NoUsableKeyError) as info:
            await client.decrypt(message)
    assert "decrypt" not in reader.vault_calls
    assert f"transit/{a}" in str(info.value)
    assert f"transit/{b}" in str(info.value)


async def test_forged_edk_naming_our_key_with_another_keys_ciphertext_does_not_open(
    vault_server: VaultServer, make_keyring: Callable[..., VaultTransitKeyring]
) -> None:
    """The ciphertext does not name its key: an EDK that claims key B but holds key A's
    ciphertext is sent to B, which refuses it (Vault authenticates it), NoUsableKeyError."""
    a, b = vault_server.create_key(), vault_server.create_key()
    keyring_a = make_keyring(a)
    async with EnvelopeClient(keyring_a) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    (edk,) = inspect(message).encrypted_data_keys
    forged = EncryptedDataKey("vault-transit", f"transit/{b}".encode(), edk.ciphertext)
    reader = make_keyring(b)
    async with EnvelopeClient(reader) as client:
        keyring_materials = await _decrypt_materials(reader, [forged])
    assert isinstance(keyring_materials, errors.NoUsableKeyError)
    assert reader.vault_calls.get("decrypt") == 1


async def _decrypt_materials(
    keyring: VaultTransitKeyring, edks: list[EncryptedDataKey]
) -> BaseException | bytes:
    materials = DecryptionMaterials(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, CONTEXT)
    try:
        result = await keyring.on_decrypt(materials, edks)
    except errors.EnvelopeError as exc:
        return exc
    assert result.plaintext_data_key is not None
    return result.plaintext_data_key


async def test_hostile_edks_that_cannot_be_ours_cost_no_request(
    make_keyring: Callable[..., VaultTransitKeyring], vault_key: str, proxy: FaultProxy
) -> None:
    """A megabyte of provider info, a huge or non-transit ciphertext under our key's
    name, another provider: none is sent to Vault, and the error is short."""
    keyring = make_keyring(vault_key, url=proxy.url)
    info = f"transit/{vault_key}".encode()
    hostile = [
        EncryptedDataKey("vault-transit", b"transit/" + b"x" * 1_000_000, b"vault:v1:AAAA"),
        EncryptedDataKey("vault-transit", info, b"vault:v1:" + b"A" * 100_000),
        EncryptedDataKey("vault-transit", info, b"not a transit ciphertext"),
        EncryptedDataKey("vault-transit", info, b"vault:v1:\x00\xff"),
        EncryptedDataKey("aws-kms", info, b"vault:v1:AAAA"),
    ]
    async with EnvelopeClient(keyring):
        before = proxy.requests()
        outcome = await _decrypt_materials(keyring, hostile)
    assert isinstance(outcome, errors.NoUsableKeyError)
    assert proxy.requests() == before
    assert len(str(outcome)) < 2000
    assert "3 naming its keys did not hold a transit ciphertext" in str(outcome)


async def test_start_up_check_names_a_missing_key_before_a_typo_creates_it(
    vault_server: VaultServer, make_keyring: Callable[..., VaultTransitKeyring]
) -> None:
    """A key that does not exist fails on entering the client (nothing created)."""
    name = f"typo-{os.urandom(4).hex()}"
    with pytest.raises(errors.VaultKeyCheckError, match=f"transit/{name}.*does not exist"):
        async with EnvelopeClient(make_keyring(name)):
            pass
    vault_server.request("GET", f"transit/keys/{name}", ok=(404,))


@pytest.mark.parametrize(
    ("key_type", "said"),
    [
        ("ed25519", "its type is ed25519; only AEAD key types"),
        ("rsa-2048", "its type is rsa-2048; only AEAD key types"),
        ("ecdsa-p256", "its type is ecdsa-p256"),
    ],
)
async def test_start_up_check_refuses_key_types_that_cannot_bind_the_context(
    vault_server: VaultServer,
    make_keyring: Callable[..., VaultTransitKeyring],
    key_type: str,
    said: str,
) -> None:
    """Signing, RSA and HMAC keys are refused at start-up, saying why."""
    name = vault_server.create_key(key_type=key_type)
    with pytest.raises(errors.VaultKeyCheckError, match=said):
        async with EnvelopeClient(make_keyring(name)):
            pass


@pytest.mark.parametrize("key_type", ["aes128-gcm96", "chacha20-poly1305"])
async def test_other_aead_key_types_round_trip(
    vault_server: VaultServer, make_keyring: Callable[..., VaultTransitKeyring], key_type: str
) -> None:
    """Every AEAD type passes the check and round-trips."""
    name = vault_server.create_key(key_type=key_type)
    async with EnvelopeClient(make_keyring(name)) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(message) == PLAINTEXT


async def test_check_keys_false_sends_nothing_on_open(
    make_keyring: Callable[..., VaultTransitKeyring], vault_key: str
) -> None:
    """``check_keys=False``: no key read at start-up, and the keyring still works."""
    keyring = make_keyring(vault_key, check_keys=False)
    async with EnvelopeClient(keyring) as client:
        assert keyring.vault_calls == {}
        assert await client.decrypt(await client.encrypt(PLAINTEXT)) == PLAINTEXT
    assert "keys" not in keyring.vault_calls


def test_url_and_token_default_to_the_environment(
    vault_server: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VAULT_ADDR (then BAO_ADDR) and VAULT_TOKEN are read when not given; nothing given
    and nothing set is a ConfigurationError that says what to set."""
    for name in ("VAULT_ADDR", "BAO_ADDR", "VAULT_TOKEN", "BAO_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(errors.ConfigurationError, match="VAULT_ADDR"):
        VaultTransitKeyring("k", token="t")
    monkeypatch.setenv("BAO_ADDR", "http://bao.example:8200")
    with pytest.raises(errors.ConfigurationError, match="VAULT_TOKEN"):
        VaultTransitKeyring("k")
    monkeypatch.setenv("VAULT_TOKEN", "s.secret")
    assert VaultTransitKeyring("k").breaker_name == "vault http://bao.example:8200"
    monkeypatch.setenv("VAULT_ADDR", vault_server.url)
    assert VaultTransitKeyring("k").breaker_name == f"vault {vault_server.url}"


async def test_env_configured_keyring_round_trips(
    vault_server: VaultServer, vault_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyring configured only by the environment reaches the server."""
    monkeypatch.setenv("VAULT_ADDR", vault_server.url)
    monkeypatch.setenv("VAULT_TOKEN", vault_server.root_token)
    async with EnvelopeClient(VaultTransitKeyring(vault_key)) as client:
        assert await client.decrypt(await client.encrypt(PLAINTEXT)) == PLAINTEXT


@pytest.mark.parametrize(
    ("args", "options", "said"),
    [
        (("a/b",), {}, "not a Vault transit key name"),
        (("",), {}, "not a Vault transit key name"),
        (("k",), {"additional_key_names": "k2"}, "sequence of key names"),
        (("k",), {"additional_key_names": ["k"]}, "named twice"),
        (("k",), {"mount": "../sys"}, "not a Vault mount path"),
        (("k",), {"url": "vault.example:8200"}, "http:// or https://"),
        (("k",), {"deadline": 0}, "deadline"),
        (("k",), {"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_configuration_is_refused_at_construction(
    args: tuple[str], options: dict[str, Any], said: str
) -> None:
    """Each mistake is a ConfigurationError that names it."""
    options.setdefault("url", "http://127.0.0.1:8200")
    options.setdefault("token", "t")
    with pytest.raises(errors.ConfigurationError, match=said):
        VaultTransitKeyring(*args, **options)


async def test_no_token_in_reprs_or_errors(vault_server: VaultServer, vault_key: str) -> None:
    """The token and the URL's password show in no repr, and not in a failure's text."""
    token = vault_server.root_token
    url = vault_server.url.replace("http://", "http://user:hunter2@")
    keyring = VaultTransitKeyring(vault_key, url=url, token=token, deadline=0.5)
    assert token not in repr(keyring)
    assert "hunter2" not in repr(keyring)
    assert "hunter2" not in keyring.breaker_name
    refused = VaultTransitKeyring(vault_key, url=vault_server.url, token="s.not-a-token")
    with pytest.raises(errors.VaultKeyCheckError) as info:
        async with EnvelopeClient(refused):
            pass
    assert "s.not-a-token" not in str(info.value)
    assert "s.not-a-token" not in repr(info.value.__cause__)


async def test_a_callers_session_is_used_and_never_closed(
    make_keyring: Callable[..., VaultTransitKeyring], vault_key: str
) -> None:
    """``session=``: the keyring uses it, and leaves it open when the client exits."""
    async with aiohttp.ClientSession() as session:
        keyring = make_keyring(vault_key, session=session)
        async with EnvelopeClient(keyring) as client:
            assert await client.decrypt(await client.encrypt(PLAINTEXT)) == PLAINTEXT
        assert not session.closed
        async with EnvelopeClient(make_keyring(vault_key, session=session)) as client:
            assert await client.decrypt(await client.encrypt(PLAINTEXT)) == PLAINTEXT


async def test_namespace_goes_into_provider_info_and_header(vault_key: str) -> None:
    """A namespace is part of the key's identity: ``ns/transit/key`` (the dev server
    has no namespaces, so only the EDK naming is checked here)."""
    keyring = VaultTransitKeyring(
        vault_key, url="http://127.0.0.1:1", token="t", namespace="team-a/"
    )
    assert keyring.provider_info(vault_key) == f"team-a/transit/{vault_key}".encode()
    assert "namespace='team-a'" in repr(keyring)


async def test_a_keyring_not_inside_a_client_says_so(
    make_keyring: Callable[..., VaultTransitKeyring], vault_key: str
) -> None:
    """Used without ``async with EnvelopeClient``: a ConfigurationError saying how."""
    keyring = make_keyring(vault_key)
    edk = EncryptedDataKey("vault-transit", f"transit/{vault_key}".encode(), b"vault:v1:AAAA")
    outcome = await _decrypt_materials(keyring, [edk])
    assert isinstance(outcome, errors.ConfigurationError)
    assert "async with EnvelopeClient" in str(outcome)
