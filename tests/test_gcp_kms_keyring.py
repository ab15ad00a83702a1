"""The Google Cloud KMS keyring on google-cloud-kms's real async client, against the fake
Cloud KMS of ``gcp_kms_fake.py`` (a gRPC server doing AES-GCM with the AAD): round trips,
EDK naming, what is bound to what, rotation, the start-up check, credentials, a caller's
client, configuration, and hostile EDKs.

The shared behaviour of every remote keyring (retries, breaker, rate limit, counts under
caching) runs in the conformance suite (``gcp-kms`` harness); faults, deadlines and
leaks are in ``test_gcp_kms_faults.py``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from gcp_kms_fake import KEY_RING, GcpKmsFake, fake_transport
from google.auth.credentials import AnonymousCredentials
from google.oauth2 import service_account
from keyring_harness import leaks
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_keyring

from aioenvelope import (
    AlgorithmSuite,
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    GcpKmsKeyring,
    Keyring,
    MultiKeyring,
    errors,
    inspect,
)
from aioenvelope.format.encryption_context import serialize_encryption_context

CONTEXT = {"tenant": "t1", "purpose": "gcp-kms-keyring"}
PLAINTEXT = b"sealed under Cloud KMS"

Make = Callable[..., GcpKmsKeyring]


@pytest.fixture
def make(gcp_kms: GcpKmsFake) -> Make:
    """A keyring on the fake: the real client, its transport on an insecure channel."""

    def make_keyring(key_name: str, **options: Any) -> GcpKmsKeyring:
        options.setdefault("credentials", AnonymousCredentials())  # type: ignore[no-untyped-call]
        options.setdefault("client_options", gcp_kms.client_options())
        return GcpKmsKeyring(key_name, **options)

    return make_keyring


async def encrypt_with(keyring: Keyring, **options: Any) -> bytes:
    async with EnvelopeClient(keyring, cache=None, **options) as client:
        return await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)


async def decrypt_with(keyring: Keyring, message: bytes) -> bytes:
    async with EnvelopeClient(keyring, cache=None) as client:
        return await client.decrypt(message, encryption_context=CONTEXT)


# -- round trips and EDKs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "suite",
    [
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
    ],
    ids=lambda suite: suite.name,
)
async def test_round_trip_makes_one_encrypt_and_one_decrypt_call(
    gcp_kms: GcpKmsFake, make: Make, suite: AlgorithmSuite
) -> None:
    """A message round trips: one Encrypt to wrap its data key, one Decrypt to unwrap."""
    key = gcp_kms.create_key("orders")
    message = await encrypt_with(make(key), algorithm_suite=suite)
    assert await decrypt_with(make(key), message) == PLAINTEXT
    assert gcp_kms.calls["Encrypt"] == 1
    assert gcp_kms.calls["Decrypt"] == 1


@pytest.mark.parametrize(
    "suite",
    [
        AlgorithmSuite.AES_128_GCM_IV12_TAG16_HKDF_SHA256,
        AlgorithmSuite.AES_192_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384,
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
    ],
    ids=lambda suite: suite.name,
)
async def test_data_keys_of_each_suite_length_are_made_wrapped_and_recovered(
    gcp_kms: GcpKmsFake, make: Make, suite: AlgorithmSuite
) -> None:
    """The keyring makes a data key of the suite's length (16, 24, 32 bytes: the ESDK
    writes the shorter ones) and recovers exactly it, through the Keyring interface."""
    keyring = make(gcp_kms.create_key("orders"))
    async with EnvelopeClient(keyring):
        made = await keyring.on_encrypt(EncryptionMaterials(suite, CONTEXT))
        assert made.plaintext_data_key is not None
        assert len(made.plaintext_data_key) == suite.key_length
        found = await keyring.on_decrypt(
            DecryptionMaterials(suite, CONTEXT), made.encrypted_data_keys
        )
    assert found.plaintext_data_key == made.plaintext_data_key


async def test_edk_names_the_key_without_version_and_holds_cloud_kms_ciphertext(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """The EDK is provider ``gcp-kms``, info the key's resource name (no
    ``/cryptoKeyVersions/N``: Decrypt finds the version in the ciphertext), ciphertext
    as Cloud KMS returned it (the fake's names its version: 0x01, version 1)."""
    key = gcp_kms.create_key("orders")
    header = inspect(await encrypt_with(make(key)))
    [edk] = header.encrypted_data_keys
    assert edk.provider_id == "gcp-kms"
    assert edk.provider_info == key.encode()
    assert edk.ciphertext[:5] == b"\x01\x00\x00\x00\x01"


async def test_several_keys_each_decrypt_alone(gcp_kms: GcpKmsFake, make: Make) -> None:
    """Wrapped under three keys (in parallel: three Encrypt calls), each key's keyring
    alone opens the message with one Decrypt."""
    keys = [gcp_kms.create_key(f"k{i}") for i in range(3)]
    message = await encrypt_with(make(keys[0], additional_key_names=keys[1:]))
    assert gcp_kms.calls["Encrypt"] == 3
    assert [e.provider_info for e in inspect(message).encrypted_data_keys] == [
        k.encode() for k in keys
    ]
    for n, key in enumerate(keys, start=1):
        assert await decrypt_with(make(key), message) == PLAINTEXT
        assert gcp_kms.calls["Decrypt"] == n


async def test_multikeyring_with_aws_kms_either_side_decrypts_alone(
    gcp_kms: GcpKmsFake, make: Make, moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """A MultiKeyring of Cloud KMS (generator) and AWS KMS (moto): each alone decrypts."""
    key = gcp_kms.create_key("orders")
    both = MultiKeyring(generator=make(key), children=[moto_kms_keyring(moto_kms, kms_key.arn)])
    message = await encrypt_with(both)
    providers = [e.provider_id for e in inspect(message).encrypted_data_keys]
    assert providers == ["gcp-kms", "aws-kms"]
    assert await decrypt_with(make(key), message) == PLAINTEXT
    assert await decrypt_with(moto_kms_keyring(moto_kms, kms_key.arn), message) == PLAINTEXT


async def test_message_under_another_key_is_refused_without_a_request(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """A keyring on key B meets only key A's EDK: NoUsableKeyError naming both, and no
    Decrypt sent."""
    key_a, key_b = gcp_kms.create_key("a"), gcp_kms.create_key("b")
    message = await encrypt_with(make(key_a))
    with pytest.raises(errors.NoUsableKeyError) as info:
        await decrypt_with(make(key_b), message)
    assert key_a in str(info.value)
    assert key_b in str(info.value)
    assert gcp_kms.calls["Decrypt"] == 0


async def test_context_is_bound_as_aad_so_a_swapped_edk_does_not_open_elsewhere(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """The EDK was wrapped with the context's serialization as AAD: offered under another
    context, Cloud KMS refuses it (INVALID_ARGUMENT: an answer, not an outage)."""
    key = gcp_kms.create_key("orders")
    keyring = make(key)
    [edk] = inspect(await encrypt_with(keyring)).encrypted_data_keys
    other = DecryptionMaterials(
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, {**CONTEXT, "tenant": "t2"}
    )
    async with EnvelopeClient(keyring):
        with pytest.raises(errors.NoUsableKeyError) as info:
            await keyring.on_decrypt(other, [edk])
    cause = info.value.__cause__
    assert isinstance(cause, errors.GcpKmsError)
    assert cause.error_code == "INVALID_ARGUMENT"
    assert cause.transient is False
    assert serialize_encryption_context(CONTEXT) != serialize_encryption_context(
        other.encryption_context
    )


async def test_wrong_required_context_is_refused(gcp_kms: GcpKmsFake, make: Make) -> None:
    """Decrypting with a context the message was not made with fails before any key is
    tried (the stored context differs)."""
    key = gcp_kms.create_key("orders")
    message = await encrypt_with(make(key))
    async with EnvelopeClient(make(key), cache=None) as client:
        with pytest.raises(errors.EncryptionContextMismatchError):
            await client.decrypt(message, encryption_context={"tenant": "t2"})


async def test_rotation_leaves_old_edks_openable_and_new_ones_use_the_new_version(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """After a rotation the new primary wraps new data keys, and messages wrapped under
    the old version still open (the version is in the ciphertext, not in the EDK)."""
    key = gcp_kms.create_key("orders")
    old = await encrypt_with(make(key))
    assert gcp_kms.rotate(key) == 2
    new = await encrypt_with(make(key))
    [new_edk] = inspect(new).encrypted_data_keys
    assert new_edk.ciphertext[:5] == b"\x01\x00\x00\x00\x02"
    assert inspect(old).encrypted_data_keys[0].provider_info == new_edk.provider_info
    assert await decrypt_with(make(key), old) == PLAINTEXT
    assert await decrypt_with(make(key), new) == PLAINTEXT


async def test_hostile_edks_that_cannot_be_ours_cost_no_request(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """A megabyte of provider info, a huge or empty ciphertext under our key's name,
    another provider: none is sent to Cloud KMS, and the error is short."""
    key = gcp_kms.create_key("orders")
    keyring = make(key)
    info = key.encode()
    hostile = [
        EncryptedDataKey("gcp-kms", info + b"x" * 1_000_000, b"\x01" * 60),
        EncryptedDataKey("gcp-kms", info, b"\x01" * 100_000),
        EncryptedDataKey("gcp-kms", info, b""),
        EncryptedDataKey("aws-kms", info, b"\x01" * 60),
    ]
    materials = DecryptionMaterials(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, CONTEXT)
    async with EnvelopeClient(keyring):
        with pytest.raises(errors.NoUsableKeyError) as info_:
            await keyring.on_decrypt(materials, hostile)
    assert gcp_kms.calls["Decrypt"] == 0
    assert len(str(info_.value)) < 2000
    assert "2 naming its keys did not hold a Cloud KMS ciphertext" in str(info_.value)


# -- the start-up check ------------------------------------------------------------------


async def test_start_up_check_reads_each_key_once(gcp_kms: GcpKmsFake, make: Make) -> None:
    """Entering the client calls GetCryptoKey once per key; check_keys=False skips it."""
    keys = [gcp_kms.create_key("a"), gcp_kms.create_key("b")]
    async with EnvelopeClient(make(keys[0], additional_key_names=keys[1:])):
        assert gcp_kms.calls["GetCryptoKey"] == 2
    async with EnvelopeClient(make(keys[0], check_keys=False)):
        assert gcp_kms.calls["GetCryptoKey"] == 2


async def test_start_up_check_names_a_missing_key(gcp_kms: GcpKmsFake, make: Make) -> None:
    """A key that does not exist fails on entering the client, naming it."""
    missing = f"{KEY_RING}/cryptoKeys/typo"
    with pytest.raises(errors.GcpKmsKeyCheckError) as info:
        async with EnvelopeClient(make(missing)):
            pass
    assert missing in str(info.value)
    assert "does not exist" in str(info.value)
    assert "check_keys=False" in str(info.value)


async def test_start_up_check_refuses_a_key_of_another_purpose(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """An asymmetric key cannot Encrypt: refused at start-up, saying its purpose."""
    key = gcp_kms.create_key("signing", purpose="ASYMMETRIC_SIGN")
    with pytest.raises(errors.GcpKmsKeyCheckError) as info:
        async with EnvelopeClient(make(key)):
            pass
    assert "purpose is ASYMMETRIC_SIGN, not ENCRYPT_DECRYPT" in str(info.value)


async def test_start_up_check_refuses_a_disabled_primary_version(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """A key whose primary version is disabled cannot Encrypt: refused at start-up."""
    key = gcp_kms.create_key("orders")
    gcp_kms.set_state(key, 1, "DISABLED")
    with pytest.raises(errors.GcpKmsKeyCheckError) as info:
        async with EnvelopeClient(make(key)):
            pass
    assert "primary version 1 is DISABLED, not ENABLED" in str(info.value)


async def test_start_up_check_denied_names_the_permission_it_needs(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """PERMISSION_DENIED on GetCryptoKey says which role reads a key (the encrypter /
    decrypter role does not) and that check_keys=False skips the check."""
    key = gcp_kms.create_key("orders")
    gcp_kms.fail_next(1, "PERMISSION_DENIED")
    with pytest.raises(errors.GcpKmsKeyCheckError) as info:
        async with EnvelopeClient(make(key)):
            pass
    assert "roles/cloudkms.viewer" in str(info.value)
    assert isinstance(info.value.__cause__, errors.GcpKmsError)


async def test_no_data_key_in_any_log_record_with_every_logger_at_debug(
    gcp_kms: GcpKmsFake, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """With every logger at DEBUG, google-cloud-kms's transport logs each request and
    response with its payload as JSON in the record's extras: an Encrypt request and a
    Decrypt response hold the plaintext data key. The keyring redacts those payloads:
    the data key shows in no record, in its message or any attribute; other calls'
    payloads (GetCryptoKey) are left alone."""
    caplog.set_level("DEBUG")
    caplog.set_level("DEBUG", logger="google")
    suite = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    keyring = make(gcp_kms.create_key("orders"))
    async with EnvelopeClient(keyring, cache=None):
        made = await keyring.on_encrypt(EncryptionMaterials(suite, CONTEXT))
        opened = await keyring.on_decrypt(
            DecryptionMaterials(suite, CONTEXT), made.encrypted_data_keys
        )
    assert made.plaintext_data_key is not None
    assert opened.plaintext_data_key == made.plaintext_data_key
    texts = [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    assert leaks(texts, {"data key": made.plaintext_data_key}) == []
    redacted = {
        str(getattr(r, "rpcName", "")).rstrip("'").rsplit("/", 1)[-1]
        for r in caplog.records
        if "<redacted by aioenvelope" in repr(r.__dict__)
    }
    assert redacted == {"Encrypt", "Decrypt"}  # the SDK did log them, and they were cut
    assert any(  # GetCryptoKey's payload is left as the SDK logged it
        keyring.key_name in str(getattr(r, "response", {}).get("payload"))
        for r in caplog.records
        if "GetCryptoKey" in str(getattr(r, "rpcName", ""))
    )


# -- credentials and clients -------------------------------------------------------------


def _recording(address: str, seen: list[Any]) -> Callable[..., Any]:
    make = fake_transport(address)

    def transport(**kwargs: Any) -> Any:
        seen.append(kwargs.get("credentials"))
        return make(**kwargs)

    return transport


@pytest.fixture
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No credentials file and an empty gcloud configuration directory: what
    google.auth.default() finds then is up to the test."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    return monkeypatch


async def test_default_credentials_come_from_google_application_credentials(
    gcp_kms: GcpKmsFake, no_ambient_credentials: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no credentials=, google.auth.default() finds the service account key file
    that GOOGLE_APPLICATION_CREDENTIALS names, and the client is made with it; its
    private key shows in no repr."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / "service-account.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test-project",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "envelope@test-project.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    no_ambient_credentials.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    seen: list[Any] = []
    key = gcp_kms.create_key("orders")
    keyring = GcpKmsKeyring(key, client_options={"transport": _recording(gcp_kms.address, seen)})
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(message) == PLAINTEXT
    [credentials] = seen
    assert isinstance(credentials, service_account.Credentials)
    assert credentials.service_account_email == "envelope@test-project.iam.gserviceaccount.com"
    body = pem.splitlines()[1]
    assert body not in repr(keyring)


@pytest.fixture
def silent_metadata_server() -> Iterator[str]:
    """A TCP listener that accepts and never answers: a metadata server that stalls."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


async def test_missing_credentials_fail_start_up_within_the_deadline(
    gcp_kms: GcpKmsFake, no_ambient_credentials: pytest.MonkeyPatch, silent_metadata_server: str
) -> None:
    """No credentials anywhere, and a metadata server that never answers (google.auth's
    own probe would wait 3 s, three times): entering the client fails at the keyring's
    deadline with a ConfigurationError that says where credentials come from."""
    no_ambient_credentials.setenv("GCE_METADATA_IP", silent_metadata_server)
    no_ambient_credentials.setenv("GCE_METADATA_HOST", silent_metadata_server)
    key = gcp_kms.create_key("orders")
    keyring = GcpKmsKeyring(key, client_options=gcp_kms.client_options(), deadline=0.3)
    with pytest.raises(errors.ConfigurationError) as info:
        async with EnvelopeClient(keyring):
            pass
    assert "no Google credentials" in str(info.value)
    assert "within the deadline of 0.3 s" in str(info.value)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(info.value)
    assert gcp_kms.calls == {}


async def test_a_callers_client_is_used_as_given_and_left_open(
    gcp_kms: GcpKmsFake,
) -> None:
    """client= is the caller's: the keyring calls through it and never closes it, so it
    still works after the EnvelopeClient exits (the caller closes it)."""
    key = gcp_kms.create_key("orders")
    own = gcp_kms.client()
    try:
        message = await encrypt_with(GcpKmsKeyring(key, client=own))
        assert await decrypt_with(GcpKmsKeyring(key, client=own), message) == PLAINTEXT
        response = await own.get_crypto_key(request={"name": key})
        assert response.name == key
    finally:
        await own.transport.close()  # type: ignore[no-untyped-call]


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "orders",
        "projects/p/locations/global/keyRings/r",
        "projects/p/locations/global/keyRings/r/cryptoKeys/k/extra",
        "projects/p/locations/global/keyRings/r/cryptoKeys/k\n",
    ],
)
def test_a_name_that_is_not_a_key_resource_name_is_refused(name: str) -> None:
    """Key names are checked when the keyring is made, with the expected form."""
    with pytest.raises(errors.ConfigurationError, match="is not a Cloud KMS key name"):
        GcpKmsKeyring(name)


def test_a_key_version_name_is_refused_with_why() -> None:
    """A version's name is not a key's: Encrypt would pin that version forever."""
    with pytest.raises(errors.ConfigurationError, match="name the key, not one of its versions"):
        GcpKmsKeyring(f"{KEY_RING}/cryptoKeys/k/cryptoKeyVersions/3")


def test_other_configuration_errors() -> None:
    """The same key twice, a non-positive deadline, a string of names, client= with
    credentials=: each a ConfigurationError when made."""
    key = f"{KEY_RING}/cryptoKeys/k"
    with pytest.raises(errors.ConfigurationError, match="named twice"):
        GcpKmsKeyring(key, additional_key_names=[key])
    with pytest.raises(errors.ConfigurationError, match="deadline"):
        GcpKmsKeyring(key, deadline=0)
    with pytest.raises(errors.ConfigurationError, match="sequence"):
        GcpKmsKeyring(key, additional_key_names=key)
    with pytest.raises(errors.ConfigurationError, match="not both"):
        GcpKmsKeyring(
            key,
            client=object(),  # type: ignore[arg-type]
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        )


@pytest.mark.parametrize(
    ("client_options", "said"),
    [
        ({"bogus": 1}, "TypeError"),
        (
            {"client_options": {"api_endpoint": "x", "credentials_file": "/nonexistent.json"}},
            "not a credentials file in client_options",
        ),
    ],
)
async def test_client_options_the_client_refuses_are_a_configuration_error_at_open(
    gcp_kms: GcpKmsFake, client_options: dict[str, Any], said: str
) -> None:
    """Options KeyManagementServiceAsyncClient refuses (an unknown keyword, a
    credentials file beside the credentials) are caught when the client is made, on
    entering the EnvelopeClient: a ConfigurationError naming client_options, not
    Google's raw TypeError or DuplicateCredentialArgs; no call reaches the service."""
    keyring = GcpKmsKeyring(
        gcp_kms.create_key("orders"),
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=client_options,
    )
    with pytest.raises(errors.ConfigurationError, match="client_options") as info:
        async with EnvelopeClient(keyring):
            pass
    assert said in str(info.value)
    assert gcp_kms.calls == {}


async def test_using_the_keyring_outside_a_client_says_how(gcp_kms: GcpKmsFake, make: Make) -> None:
    """A keyring never opened (not inside ``async with EnvelopeClient``) says so."""
    keyring = make(gcp_kms.create_key("orders"))
    materials = DecryptionMaterials(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, CONTEXT)
    edk = EncryptedDataKey("gcp-kms", keyring.key_name.encode(), b"\x01" * 60)
    with pytest.raises(errors.ConfigurationError, match="not open"):
        await keyring.on_decrypt(materials, [edk])


def test_repr_names_keys_and_nothing_else() -> None:
    """The repr shows the key names; never credentials or a client."""
    key = f"{KEY_RING}/cryptoKeys/k"
    keyring = GcpKmsKeyring(
        key,
        additional_key_names=[f"{KEY_RING}/cryptoKeys/k2"],
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
    )
    assert repr(keyring) == (
        f"GcpKmsKeyring({key!r}, additional_key_names=['{KEY_RING}/cryptoKeys/k2'])"
    )
    assert keyring.breaker_name == "gcp-kms global"
