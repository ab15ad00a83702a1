"""The Azure Key Vault keyring with the real azure-keyvault-keys async client against the
fake Key Vault of ``azure_kv_fake.py`` (HTTPS, a throwaway CA, the 401 bearer
challenge): round trips, EDK naming, several keys, a MultiKeyring with AWS KMS, wrong
key and wrong context, rotation, wraps done by the service (a disabled key refused on
encrypt), hostile EDKs, the start-up check, credentials, configuration.

The shared behaviour of every remote keyring (retries, breaker, rate limit, counts under
caching, no secrets in errors) runs in the conformance suite (``azure_kv`` harness).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from azure_kv_fake import TENANT, AzureKeyVaultFake, StaticTokenCredential
from fake_clock import FakeClock
from keyring_harness import leaks
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_keyring

from aioenvelope import (
    AlgorithmSuite,
    AzureKeyVaultKeyring,
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    Keyring,
    MultiKeyring,
    errors,
    inspect,
)

CONTEXT = {"tenant": "t1", "purpose": "azure-kv-keyring"}
VERSION_REFRESH = 600  # seconds: how often an unpinned key's version is read again (documented)
PLAINTEXT = b"a record under an Azure Key Vault key" * 3

Make = Callable[..., AzureKeyVaultKeyring]


def name_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


@pytest.fixture
def key(azure_kv: AzureKeyVaultFake) -> str:
    return azure_kv.create_key()


@pytest.fixture
def make(azure_kv: AzureKeyVaultFake, key: str) -> Make:
    def make_keyring(key_id: str | None = None, **options: Any) -> AzureKeyVaultKeyring:
        options.setdefault("credential", azure_kv.credential())
        options.setdefault("client_options", azure_kv.client_options())
        return AzureKeyVaultKeyring(key_id or key, **options)

    return make_keyring


async def encrypt_with(keyring: Keyring, context: dict[str, str] = CONTEXT) -> bytes:
    async with EnvelopeClient(keyring, cache=None) as client:
        return await client.encrypt(PLAINTEXT, encryption_context=context)


async def decrypt_with(keyring: Keyring, message: bytes, **kwargs: Any) -> bytes:
    async with EnvelopeClient(keyring, cache=None) as client:
        return await client.decrypt(message, **kwargs)


async def test_round_trip_makes_one_remote_wrap_and_one_remote_unwrap(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """The data key is wrapped by the service (one wrapkey request) and unwrapped by it
    (one unwrapkey); the key is read once at start-up on each client; the SDK met the
    bearer challenge and asked the credential for a Key Vault token in the challenge's
    tenant."""
    credential = azure_kv.credential()
    message = await encrypt_with(make(credential=credential))
    assert await decrypt_with(make(), message) == PLAINTEXT
    counts = azure_kv.requests(name_of(key))
    assert (counts["get"], counts["wrapkey"], counts["unwrapkey"]) == (2, 1, 1)
    assert credential.scopes[0] == ("https://vault.azure.net/.default",)
    assert credential.tenants[0] == TENANT


async def test_edk_names_the_versioned_key_url_and_holds_the_raw_wrapped_key(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """One EDK: provider ``azure-kv``, info the key's versionless URL, '/', the version
    wrapped under (Key Vault's own kid); ciphertext the 256 raw bytes of RSA-2048 OAEP."""
    message = await encrypt_with(make())
    (edk,) = inspect(message).encrypted_data_keys
    version = azure_kv.current_version(name_of(key))
    assert edk.provider_id == "azure-kv"
    assert edk.provider_info == f"{key}/{version}".encode()
    assert len(edk.ciphertext) == 256


async def test_several_keys_each_decrypt_alone(azure_kv: AzureKeyVaultFake, make: Make) -> None:
    """A keyring on three keys wraps under each (three wrapkey requests in all); a
    keyring on any one of them alone decrypts with one unwrapkey."""
    keys = [azure_kv.create_key() for _ in range(3)]
    message = await encrypt_with(make(keys[0], additional_key_ids=keys[1:]))
    infos = [e.provider_info.decode() for e in inspect(message).encrypted_data_keys]
    assert [info.rsplit("/", 1)[0] for info in infos] == keys
    for key in keys:
        assert await decrypt_with(make(key), message) == PLAINTEXT
        assert azure_kv.requests(name_of(key))["unwrapkey"] == 1


async def test_multikeyring_with_aws_kms_either_side_decrypts_alone(
    azure_kv: AzureKeyVaultFake, make: Make, key: str, moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """A MultiKeyring of Key Vault (generator) and AWS KMS (moto): each alone decrypts."""
    both = MultiKeyring(generator=make(), children=[moto_kms_keyring(moto_kms, kms_key.arn)])
    message = await encrypt_with(both)
    providers = [e.provider_id for e in inspect(message).encrypted_data_keys]
    assert providers == ["azure-kv", "aws-kms"]
    assert await decrypt_with(make(), message) == PLAINTEXT
    assert await decrypt_with(moto_kms_keyring(moto_kms, kms_key.arn), message) == PLAINTEXT


async def test_message_under_another_key_is_refused_without_a_request(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """A keyring on another key finds no EDK of its own: NoUsableKeyError naming the
    message's key, and no unwrap request at all."""
    other = azure_kv.create_key()
    message = await encrypt_with(make())
    with pytest.raises(errors.NoUsableKeyError) as info:
        await decrypt_with(make(other), message)
    assert key in str(info.value)
    assert azure_kv.requests(name_of(other))["unwrapkey"] == 0
    assert azure_kv.requests(name_of(key))["unwrapkey"] == 0


async def test_wrong_required_context_is_refused(make: Make) -> None:
    """RSA-OAEP binds no context to the wrapped key: the context is bound by the
    header, so a required context that differs is refused before any data is given."""
    message = await encrypt_with(make())
    with pytest.raises(errors.EncryptionContextMismatchError):
        await decrypt_with(make(), message, encryption_context={"tenant": "t2"})


async def test_a_swapped_context_fails_header_authentication(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """The same wrapped data key moved into a message with another context (the EDK
    unwraps: OAEP has no AAD) fails the header's authentication tag, as for raw RSA."""
    message = await encrypt_with(make(), {"tenant": "t1"})
    (edk,) = inspect(message).encrypted_data_keys
    # A message of the same shape under another context, its EDK replaced by the first's.
    forged = await encrypt_with(make(), {"tenant": "t2"})
    (their_edk,) = inspect(forged).encrypted_data_keys
    swapped = forged.replace(their_edk.ciphertext, edk.ciphertext).replace(
        their_edk.provider_info, edk.provider_info
    )
    with pytest.raises(errors.AuthenticationError):
        await decrypt_with(make(), swapped)


async def test_rotation_leaves_old_edks_openable_and_new_ones_use_the_new_version(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """After a rotation, messages made before still open (their EDK names the old
    version), and a client entered afterwards wraps under the new version."""
    old_version = azure_kv.current_version(name_of(key))
    old = await encrypt_with(make())
    new_version = azure_kv.rotate(name_of(key))
    new = await encrypt_with(make())
    assert inspect(old).encrypted_data_keys[0].provider_info.endswith(old_version.encode())
    assert inspect(new).encrypted_data_keys[0].provider_info.endswith(new_version.encode())
    assert await decrypt_with(make(), old) == PLAINTEXT
    assert await decrypt_with(make(), new) == PLAINTEXT


async def test_a_long_lived_client_follows_a_rotation_after_the_refresh_interval(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """An unpinned key's current version is read again after VERSION_REFRESH (the
    client's clock, 10 minutes): until then wraps stay on the version read at start-up, then go to
    the new one. A failed re-read keeps the old version (the encrypt succeeds) and is
    tried again a minute later."""
    name = name_of(key)
    clock = FakeClock()

    async def wrapped_under(client: EnvelopeClient) -> bytes:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        return inspect(message).encrypted_data_keys[0].provider_info.rsplit(b"/", 1)[1]

    async with EnvelopeClient(make(), cache=None, clock=clock) as client:
        first = azure_kv.current_version(name).encode()
        second = azure_kv.rotate(name).encode()
        assert await wrapped_under(client) == first
        clock.advance(VERSION_REFRESH + 1)
        assert await wrapped_under(client) == second
        third = azure_kv.rotate(name).encode()
        clock.advance(VERSION_REFRESH + 1)
        azure_kv.refuse_next(1, 403)  # the re-read (GET) is refused
        assert await wrapped_under(client) == second
        clock.advance(61)
        assert await wrapped_under(client) == third
    assert azure_kv.requests(name)["get"] == 4  # start-up, two re-reads, the refused one


async def test_a_pinned_version_wraps_under_that_version_and_reads_nothing_without_check(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """A key URL with a version wraps under it even after a rotation; with
    check_keys=False nothing is read (no GET), only the wrap is sent."""
    version = azure_kv.current_version(name_of(key))
    azure_kv.rotate(name_of(key))
    message = await encrypt_with(make(f"{key}/{version}", check_keys=False))
    assert inspect(message).encrypted_data_keys[0].provider_info == f"{key}/{version}".encode()
    assert azure_kv.requests(name_of(key))["get"] == 0
    assert await decrypt_with(make(), message) == PLAINTEXT


async def test_without_the_check_an_unversioned_key_is_read_once_for_its_version(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """check_keys=False and no version in the URL: the current version is read once
    (one GET, shared by concurrent encrypts), then every wrap goes under it."""
    async with EnvelopeClient(make(check_keys=False), cache=None) as client:
        messages = await asyncio.gather(
            *(client.encrypt(PLAINTEXT, encryption_context=CONTEXT) for _ in range(3))
        )
    counts = azure_kv.requests(name_of(key))
    assert (counts["get"], counts["wrapkey"]) == (1, 3)
    version = azure_kv.current_version(name_of(key))
    for message in messages:
        assert inspect(message).encrypted_data_keys[0].provider_info.endswith(version.encode())


async def test_a_disabled_key_is_refused_on_encrypt_by_the_service(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """The wrap goes to Key Vault (the SDK's CryptographyClient.wrap_key would wrap an
    RSA key locally with its public key and never ask): a key disabled after start-up
    refuses the encrypt with a 403 that says it is disabled."""
    async with EnvelopeClient(make(), cache=None) as client:
        azure_kv.set_enabled(name_of(key), False)
        with pytest.raises(errors.AzureKeyVaultError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert info.value.transient is False
    assert info.value.operation == "wrapkey"
    assert "disabled" in str(info.value)
    assert azure_kv.requests(name_of(key))["wrapkey"] == 1


async def test_an_oct_hsm_key_wraps_and_unwraps_remotely(
    azure_kv: AzureKeyVaultFake, make: Make
) -> None:
    """A Managed HSM oct-HSM key (its JWK has no key bytes) with A256KW: wrapped and
    unwrapped by the service, never locally under a random key; the round trip holds."""
    key = azure_kv.create_key(kty="oct-HSM")
    message = await encrypt_with(make(key, algorithm="A256KW"))
    assert await decrypt_with(make(key, algorithm="A256KW"), message) == PLAINTEXT
    counts = azure_kv.requests(name_of(key))
    assert (counts["wrapkey"], counts["unwrapkey"]) == (1, 1)


async def test_hostile_edks_that_cannot_be_ours_cost_no_request(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """EDKs naming another host, another path, a huge provider info, a version with
    '/', '..' or '?', or a huge ciphertext under our key's URL: never sent (no request,
    to our vault or anywhere), and the answer is NoUsableKeyError."""
    version = azure_kv.current_version(name_of(key))
    good = await encrypt_with(make())
    (edk,) = inspect(good).encrypted_data_keys
    host = key.split("/keys/")[0]
    hostile = [
        f"https://evil.example/keys/{name_of(key)}/{version}",
        f"{host}/keys/{name_of(key)}x/{version}",
        f"{host}/secrets/{name_of(key)}/{version}",
        f"{key}/{version}/../../other/{version}",
        f"{key}/{version}?x=1",
        f"{key}/" + "a" * 5000,
        f"{key}/{version}/",
    ]
    edks = [EncryptedDataKey("azure-kv", info.encode(), edk.ciphertext) for info in hostile]
    edks.append(EncryptedDataKey("azure-kv", edk.provider_info, b"\x00" * 100_000))
    keyring = make()
    before = azure_kv.requests()["unwrapkey"]
    async with EnvelopeClient(keyring, cache=None):
        header = inspect(good)
        materials = DecryptionMaterials(header.algorithm_suite, header.encryption_context)
        with pytest.raises(errors.NoUsableKeyError):
            await keyring.on_decrypt(materials, edks)
    assert azure_kv.requests()["unwrapkey"] == before


async def test_start_up_check_names_a_missing_key(azure_kv: AzureKeyVaultFake, make: Make) -> None:
    """A key that does not exist fails on entering the client, naming the key."""
    missing = f"{azure_kv.url}/keys/no-such-key"
    with pytest.raises(errors.AzureKeyVaultKeyCheckError) as info:
        await encrypt_with(make(missing))
    assert missing in str(info.value)
    assert "does not exist" in str(info.value)


async def test_start_up_check_refuses_a_disabled_key(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """A disabled key fails on entering the client, before any message is made."""
    azure_kv.set_enabled(name_of(key), False)
    with pytest.raises(errors.AzureKeyVaultKeyCheckError, match="it is disabled"):
        await encrypt_with(make())


async def test_start_up_check_refuses_a_key_without_wrap_operations(
    azure_kv: AzureKeyVaultFake, make: Make
) -> None:
    """A key whose permitted operations lack wrapKey fails the start-up check."""
    key = azure_kv.create_key(key_ops=("encrypt", "decrypt", "unwrapKey"))
    with pytest.raises(errors.AzureKeyVaultKeyCheckError, match="lack wrapKey"):
        await encrypt_with(make(key))


async def test_start_up_check_refuses_a_key_type_that_does_not_fit_the_algorithm(
    azure_kv: AzureKeyVaultFake, make: Make
) -> None:
    """An oct-HSM key with RSA-OAEP-256 (the default), or an RSA key with A256KW."""
    oct_key = azure_kv.create_key(kty="oct-HSM")
    with pytest.raises(errors.AzureKeyVaultKeyCheckError, match="oct-HSM"):
        await encrypt_with(make(oct_key))
    with pytest.raises(errors.AzureKeyVaultKeyCheckError, match="cannot wrap with A256KW"):
        await encrypt_with(make(algorithm="A256KW"))


async def test_a_callers_credential_is_used_and_never_closed(
    azure_kv: AzureKeyVaultFake, make: Make
) -> None:
    """A credential given by the caller gives the tokens, and is left open on exit."""
    credential = azure_kv.credential()
    message = await encrypt_with(make(credential=credential))
    assert await decrypt_with(make(credential=credential), message) == PLAINTEXT
    assert credential.calls >= 1
    assert credential.closed is False


async def test_a_credential_that_gives_no_token_fails_clearly(
    azure_kv: AzureKeyVaultFake, make: Make
) -> None:
    """A credential whose token the vault refuses: an answered Unauthorized error at
    start-up saying to check the credential's tenant, never showing the token."""
    bad = StaticTokenCredential("not-the-token")
    with pytest.raises(errors.AzureKeyVaultError) as info:
        await encrypt_with(make(credential=bad))
    assert info.value.error_code == "Unauthorized"
    assert "not-the-token" not in str(info.value)
    assert azure_kv.token not in repr(info.value)


async def test_a_challenge_for_another_resource_is_refused_unless_verification_is_off(
    azure_kv: AzureKeyVaultFake, make: Make
) -> None:
    """The fake's challenge names vault.azure.net, not 127.0.0.1: with the SDK's
    default verification the challenge is refused (no token sent), and the error says
    which option allows it."""
    options = {"connection_verify": str(azure_kv.ca_path)}
    credential = azure_kv.credential()
    with pytest.raises(errors.AzureKeyVaultError) as info:
        await encrypt_with(make(client_options=options, credential=credential))
    assert info.value.error_code == "ChallengeRejected"
    assert "verify_challenge_resource" in str(info.value)
    assert credential.calls == 0


async def test_no_token_or_key_material_in_any_log_line(
    azure_kv: AzureKeyVaultFake, make: Make, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every logger at DEBUG (ours, azure-core's HTTP logging, azure-identity) through a
    round trip, a refusal and an outage: the bearer token and the key's private
    exponent show nowhere; our own lines name the operation and the key."""
    caplog.set_level("DEBUG")
    async with EnvelopeClient(make(max_attempts=1), cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        azure_kv.refuse_next(1, 403)
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(message)
        azure_kv.fail_next(1, 503)
        with pytest.raises(errors.AzureKeyVaultError):
            await client.decrypt(message)
    secrets = {"token": azure_kv.token.encode()}
    secrets.update({f"key-{n}": s for n, s in enumerate(azure_kv.secrets(name_of(key)))})
    assert leaks([caplog.text], secrets) == []
    assert f"Azure Key Vault unwrapkey with key {key} failed: Forbidden" in caplog.text
    assert "'Authorization': 'REDACTED'" in caplog.text  # the SDK did log the headers


@pytest.mark.parametrize(
    "key_id",
    [
        "http://v.vault.azure.net/keys/k",
        "https://v.vault.azure.net/secrets/k",
        "https://v.vault.azure.net/keys/k/v1/extra",
        "https://user:pw@v.vault.azure.net/keys/k",
        "https://v.vault.azure.net/keys/k?x=1",
        "https://v.vault.azure.net/keys/bad_name",
        "https://v.vault.azure.net/keys/k/bad-version",
        "v.vault.azure.net/keys/k",
    ],
)
def test_a_key_id_that_is_not_a_key_url_is_refused(key_id: str) -> None:
    """Only https key URLs (/keys/NAME[/VERSION]) with no user, query or fragment."""
    with pytest.raises(errors.ConfigurationError, match="not a Key Vault key URL"):
        AzureKeyVaultKeyring(key_id)


def test_other_configuration_errors() -> None:
    """A key twice (versions aside), RSA1_5, SDK retry options, a str for a list, a
    deadline of 0: refused when the keyring is made."""
    url = "https://v.vault.azure.net/keys/k"
    with pytest.raises(errors.ConfigurationError, match="named twice"):
        AzureKeyVaultKeyring(url, additional_key_ids=[url + "/abc"])
    with pytest.raises(errors.ConfigurationError, match="algorithm must be one of"):
        AzureKeyVaultKeyring(url, algorithm="RSA1_5")
    with pytest.raises(errors.ConfigurationError, match="retry_total"):
        AzureKeyVaultKeyring(url, client_options={"retry_total": 10})
    with pytest.raises(errors.ConfigurationError, match="sequence of key URLs"):
        AzureKeyVaultKeyring(url, additional_key_ids=url)
    with pytest.raises(errors.ConfigurationError, match="deadline"):
        AzureKeyVaultKeyring(url, deadline=0)


@pytest.mark.parametrize(
    "option", ["logging_enable", "http_logging_policy", "logging_policy", "logger"]
)
def test_logging_client_options_are_refused_saying_why(option: str) -> None:
    """azure-core's network trace (logging_enable) logs the bearer token and the
    wrapkey/unwrapkey bodies, the plaintext data key among them: every logging option is
    refused when the keyring is made, naming the option and the reason."""
    with pytest.raises(errors.ConfigurationError, match=f"{option}.*data key"):
        AzureKeyVaultKeyring("https://v.vault.azure.net/keys/k", client_options={option: True})


async def test_a_transport_option_that_is_not_a_transport_is_a_configuration_error(
    azure_kv: AzureKeyVaultFake, make: Make
) -> None:
    """client_options={'transport': 5} used to fail with AttributeError when the client
    closed; it is refused on entering the client with ConfigurationError naming it."""
    options = {**azure_kv.client_options(), "transport": 5}
    with pytest.raises(errors.ConfigurationError, match=r"client_options\['transport'\]"):
        async with EnvelopeClient(make(client_options=options), cache=None):
            pass


def test_the_https_port_is_dropped_so_a_key_is_named_one_way() -> None:
    """':443' in a key URL names the same key as without it (and as Key Vault's kid):
    the EDK provider info and the breaker are the same either way; another port stays."""
    with_port = AzureKeyVaultKeyring("https://V.vault.azure.net:443/keys/k")
    without = AzureKeyVaultKeyring("https://v.vault.azure.net/keys/k")
    assert with_port.key_ids == without.key_ids == ("https://v.vault.azure.net/keys/k",)
    assert with_port.breaker_name == without.breaker_name
    assert with_port.provider_info("https://v.vault.azure.net:443/keys/k", "abc") == (
        b"https://v.vault.azure.net/keys/k/abc"
    )
    other = AzureKeyVaultKeyring("https://v.vault.azure.net:8443/keys/k")
    assert other.key_ids == ("https://v.vault.azure.net:8443/keys/k",)


async def test_using_the_keyring_outside_a_client_says_how(make: Make) -> None:
    """Used before its client is entered, the keyring says to enter one."""
    materials = EncryptionMaterials(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, CONTEXT)
    with pytest.raises(errors.ConfigurationError, match="not open"):
        await make().on_encrypt(materials)


def test_repr_names_keys_and_algorithm_and_no_credential() -> None:
    """The repr shows key URLs (host lower-cased) and the algorithm, not the credential;
    the breaker is named after the first key's vault."""
    credential = StaticTokenCredential("secret-token-value")
    keyring = AzureKeyVaultKeyring(
        "https://V.vault.azure.net/keys/k",
        additional_key_ids=["https://w.vault.azure.net/keys/j/0123abcd"],
        credential=credential,
    )
    assert repr(keyring) == (
        "AzureKeyVaultKeyring('https://v.vault.azure.net/keys/k', additional_key_ids="
        "['https://w.vault.azure.net/keys/j/0123abcd'], algorithm='RSA-OAEP-256')"
    )
    assert keyring.breaker_name == "azure-kv https://v.vault.azure.net"
