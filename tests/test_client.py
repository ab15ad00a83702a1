"""EnvelopeClient behaviour through the public API."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
import os
import typing

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from messages import build_encryptor

import aioenvelope
from aioenvelope import (
    AlgorithmSuite,
    CommitmentPolicy,
    DecryptionMaterials,
    EncryptionMaterials,
    EnvelopeClient,
    Keyring,
    MultiKeyring,
    RawAesKeyring,
    RawRsaKeyring,
    errors,
)
from aioenvelope.format import EncryptedDataKey

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
COMMIT_SIGN = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
WRONG_KEY_OR_CONTEXT = (
    r"could not decrypt any of the message's 1 encrypted data keys \(1 named this key\): "
    "wrong key, or the encryption context differs"
)


PUBLIC_NAMES = {
    "AlgorithmSuite",
    "AppRoleAuth",
    "AzureKeyVaultKeyring",
    "BatchFailure",
    "BatchProgress",
    "BatchResult",
    "BatchSuccess",
    "BranchKeyStore",
    "CacheConfig",
    "CircuitBreakerConfig",
    "ClientStats",
    "CommitmentPolicy",
    "DecryptResult",
    "DecryptingStream",
    "DecryptionMaterials",
    "DiscoveryFilter",
    "EncryptedDataKey",
    "EncryptingStream",
    "EncryptionMaterials",
    "EnvelopeClient",
    "GcpKmsKeyring",
    "HierarchicalKeyring",
    "Keyring",
    "KmsDiscoveryKeyring",
    "KmsKeyring",
    "MessageHeader",
    "MultiKeyring",
    "RateLimit",
    "RawAesKeyring",
    "RawRsaKeyring",
    "ReencryptingStream",
    "StreamSource",
    "Telemetry",
    "VaultTransitKeyring",
    "errors",
    "inspect",
    "run_batch",
}
KEYRINGS = {
    "AzureKeyVaultKeyring",
    "GcpKmsKeyring",
    "HierarchicalKeyring",
    "KmsDiscoveryKeyring",
    "KmsKeyring",
    "MultiKeyring",
    "RawAesKeyring",
    "RawRsaKeyring",
    "VaultTransitKeyring",
}
KEY_STORES = {"BranchKeyStore"}  # administered on their own as async context managers
STREAMS = {"DecryptingStream", "EncryptingStream", "ReencryptingStream"}
ENUMS = {"AlgorithmSuite", "CommitmentPolicy"}
VALUE_TYPES = {  # frozen-or-not dataclasses: values a caller reads or builds
    "AppRoleAuth",
    "BatchProgress",
    "CacheConfig",
    "CircuitBreakerConfig",
    "ClientStats",
    "DecryptResult",
    "DecryptionMaterials",
    "DiscoveryFilter",
    "EncryptedDataKey",
    "EncryptionMaterials",
    "MessageHeader",
    "RateLimit",
    "Telemetry",
}
# Each error's direct base classes: the hierarchy callers catch by.
ERROR_BASES: dict[str, tuple[type, ...]] = {
    "EnvelopeError": (Exception,),
    "ConfigurationError": (errors.EnvelopeError, ValueError),
    "EncryptionContextError": (errors.ConfigurationError,),
    "MalformedMessageError": (errors.EnvelopeError,),
    "TruncatedMessageError": (errors.MalformedMessageError,),
    "MessageLimitError": (errors.MalformedMessageError,),
    "AuthenticationError": (errors.EnvelopeError,),
    "CommitmentPolicyError": (errors.EnvelopeError,),
    "SignedStreamRefusedError": (errors.EnvelopeError,),
    "EncryptionContextMismatchError": (errors.EnvelopeError,),
    "KeyringError": (errors.EnvelopeError,),
    "NoUsableKeyError": (errors.KeyringError,),
    "KeyServiceError": (errors.KeyringError,),
    "KMSError": (errors.KeyServiceError,),
    "KMSTimeoutError": (errors.KMSError,),
    "KMSKeyCheckError": (errors.ConfigurationError,),
    "KMSDecryptRateLimited": (errors.EnvelopeError,),
    "CircuitOpenError": (errors.EnvelopeError,),
    "DynamoDBError": (errors.KeyServiceError,),
    "VaultError": (errors.KeyServiceError,),
    "VaultKeyCheckError": (errors.ConfigurationError,),
    "GcpKmsError": (errors.KeyServiceError,),
    "GcpKmsKeyCheckError": (errors.ConfigurationError,),
    "AzureKeyVaultError": (errors.KeyServiceError,),
    "AzureKeyVaultKeyCheckError": (errors.ConfigurationError,),
    "BranchKeyStoreError": (errors.KeyringError,),
    "BranchKeyNotFoundError": (errors.BranchKeyStoreError,),
    "BranchKeyExistsError": (errors.BranchKeyStoreError,),
    "BranchKeyIntegrityError": (errors.BranchKeyStoreError,),
}


def test_the_public_api_is_exactly_these_names_and_star_import_gives_them() -> None:
    """A name added to or dropped from ``__all__`` fails here, so either is deliberate."""
    assert len(aioenvelope.__all__) == len(set(aioenvelope.__all__))
    assert set(aioenvelope.__all__) == PUBLIC_NAMES
    namespace: dict[str, object] = {}
    exec("from aioenvelope import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC_NAMES
    assert (
        KEYRINGS
        | KEY_STORES
        | STREAMS
        | ENUMS
        | VALUE_TYPES
        | {
            "BatchFailure",
            "BatchResult",
            "BatchSuccess",
            "EnvelopeClient",
            "Keyring",
            "StreamSource",
            "errors",
            "inspect",
            "run_batch",
        }
        == PUBLIC_NAMES
    )


def test_every_public_name_is_what_it_says() -> None:
    aliases = {"BatchResult", "StreamSource"}  # type aliases: checked below
    generics = {"BatchSuccess", "BatchFailure"}  # the arms of BatchResult: checked below
    for name in PUBLIC_NAMES - aliases - generics - {"errors", "inspect", "run_batch"}:
        exported = getattr(aioenvelope, name)
        assert isinstance(exported, type), name
        assert exported.__name__ == name  # not an alias of some other class
        assert exported.__module__.startswith("aioenvelope."), name
        assert not name.startswith("_")
    for name in KEYRINGS:
        assert issubclass(getattr(aioenvelope, name), Keyring), name
    for name in STREAMS:
        stream = getattr(aioenvelope, name)
        for method in ("__aiter__", "__anext__", "aclose", "__aenter__", "__aexit__"):
            assert callable(getattr(stream, method, None)), (name, method)
    for name in KEY_STORES:
        assert issubclass(getattr(aioenvelope, name), contextlib.AbstractAsyncContextManager)
    for name in ENUMS:
        assert issubclass(getattr(aioenvelope, name), enum.Enum), name
    for name in VALUE_TYPES:
        assert dataclasses.is_dataclass(getattr(aioenvelope, name)), name
    assert issubclass(EnvelopeClient, contextlib.AbstractAsyncContextManager)
    assert aioenvelope.errors is errors
    assert errors.__name__ == "aioenvelope.errors"
    assert inspect.isfunction(aioenvelope.inspect)
    assert inspect.iscoroutinefunction(aioenvelope.run_batch)
    assert typing.get_args(aioenvelope.StreamSource)[:3] == (bytes, bytearray, memoryview)
    # A success or a failure, told apart by ``ok`` (for mypy too); both are dataclasses.
    outcomes = [typing.get_origin(arm) for arm in typing.get_args(aioenvelope.BatchResult)]
    assert outcomes == [aioenvelope.BatchSuccess, aioenvelope.BatchFailure]
    assert all(dataclasses.is_dataclass(outcome) for outcome in outcomes)
    assert AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY.value == 0x0478
    assert AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384.value == 0x0578
    assert len(AlgorithmSuite) == 11
    assert {p.name for p in CommitmentPolicy} == {
        "FORBID_ENCRYPT_ALLOW_DECRYPT",
        "REQUIRE_ENCRYPT_ALLOW_DECRYPT",
        "REQUIRE_ENCRYPT_REQUIRE_DECRYPT",
    }


async def test_the_client_hands_back_the_exported_types(client: EnvelopeClient) -> None:
    """The classes a caller imports are the ones it gets: isinstance works on them."""
    message = await client.encrypt(b"typed")
    result = await client.decrypt_with_header(message)
    assert type(result) is aioenvelope.DecryptResult
    assert type(result.header) is aioenvelope.MessageHeader
    assert type(aioenvelope.inspect(message)) is aioenvelope.MessageHeader
    assert type(result.header.encrypted_data_keys[0]) is aioenvelope.EncryptedDataKey
    assert type(client.stats) is aioenvelope.ClientStats
    async with client.encrypt_stream(b"typed") as encrypting:
        assert type(encrypting) is aioenvelope.EncryptingStream
        streamed = b"".join([chunk async for chunk in encrypting])
    async with client.decrypt_stream(streamed) as decrypting:
        assert type(decrypting) is aioenvelope.DecryptingStream
        assert b"".join([chunk async for chunk in decrypting]) == b"typed"
    other = RawAesKeyring("ns", "other", os.urandom(32))
    async with client.reencrypt_stream(message, to_keyring=other) as reencrypting:
        assert type(reencrypting) is aioenvelope.ReencryptingStream
        assert b"".join([chunk async for chunk in reencrypting])[:1] == b"\x02"
    (batch,) = await aioenvelope.run_batch([message], client.decrypt)
    assert type(batch) is aioenvelope.batch.BatchSuccess
    assert batch.value == b"typed"


def test_errors_exports_exactly_its_hierarchy() -> None:
    """Every error is importable from ``aioenvelope.errors``, derives from
    ``EnvelopeError`` and has exactly the bases callers catch it by; nothing else is
    exported, and no error class of the module is left out."""
    assert len(errors.__all__) == len(set(errors.__all__))
    assert set(errors.__all__) == set(ERROR_BASES)
    for name, bases in ERROR_BASES.items():
        error = getattr(errors, name)
        assert error.__name__ == name
        assert error.__module__ == "aioenvelope.errors"
        assert error.__bases__ == bases, name
        assert issubclass(error, errors.EnvelopeError)
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert defined == set(ERROR_BASES)


def test_configuration_error_is_a_value_error_and_an_envelope_error(
    aes_keyring: RawAesKeyring,
) -> None:
    """Code that guards arguments with ``except ValueError`` catches a misuse."""
    with pytest.raises(ValueError, match="frame_length") as info:
        EnvelopeClient(aes_keyring, frame_length=0)
    assert type(info.value) is errors.ConfigurationError
    assert isinstance(info.value, errors.EnvelopeError)
    with pytest.raises(ValueError, match="namespace"):
        RawAesKeyring("", "k", bytes(32))


# -- lifecycle ---------------------------------------------------------------------------


async def test_client_must_be_entered_before_use(aes_keyring: RawAesKeyring) -> None:
    client = EnvelopeClient(aes_keyring)
    with pytest.raises(errors.ConfigurationError, match="async with"):
        await client.encrypt(b"x")


async def test_closed_client_refuses_work(aes_keyring: RawAesKeyring) -> None:
    async with EnvelopeClient(aes_keyring) as client:
        pass
    with pytest.raises(errors.ConfigurationError, match="closed"):
        await client.decrypt(b"x")


async def test_keyring_is_opened_and_closed_with_the_client() -> None:
    events: list[str] = []

    class Recording(RawAesKeyring):
        async def open(self) -> None:
            events.append("open")

        async def close(self) -> None:
            events.append("close")

    keyring = Recording("ns", "k", os.urandom(32))
    async with EnvelopeClient(MultiKeyring(generator=keyring)) as client:
        assert events == ["open"]
        await client.encrypt(b"x")
    assert events == ["open", "close"]


# -- defaults and policy -----------------------------------------------------------------


async def test_default_suite_is_committing_without_signature(client: EnvelopeClient) -> None:
    result = await client.decrypt_with_header(await client.encrypt(b"data"))
    assert result.header.algorithm_suite is COMMIT
    assert result.header.version == 2
    assert result.plaintext == b"data"


async def test_default_frame_length_is_64_kib(aes_keyring: RawAesKeyring) -> None:
    async with EnvelopeClient(aes_keyring) as client:
        result = await client.decrypt_with_header(await client.encrypt(b"data"))
    assert result.header.frame_length == 65536


async def test_signing_suite_adds_the_public_key_to_the_context(client: EnvelopeClient) -> None:
    message = await client.encrypt(b"d", encryption_context={"a": "b"}, algorithm_suite=COMMIT_SIGN)
    header = (await client.decrypt_with_header(message)).header
    assert set(header.encryption_context) == {"a", "aws-crypto-public-key"}
    assert len(header.encryption_context["aws-crypto-public-key"]) == 68


@pytest.mark.parametrize("suite", [s for s in AlgorithmSuite if s.message_version == 1])
async def test_legacy_suites_are_readable_but_not_writable(
    client: EnvelopeClient, suite: AlgorithmSuite
) -> None:
    with pytest.raises(errors.ConfigurationError, match="not writable"):
        await client.encrypt(b"x", algorithm_suite=suite)


async def test_default_policy_refuses_non_committing_messages(aes_keyring: RawAesKeyring) -> None:
    legacy = await legacy_message(aes_keyring, AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA256)
    async with EnvelopeClient(aes_keyring) as client:
        with pytest.raises(errors.CommitmentPolicyError, match="REQUIRE_ENCRYPT_ALLOW_DECRYPT"):
            await client.decrypt(legacy)


@pytest.mark.parametrize("suite", [s for s in AlgorithmSuite if not s.committing])
async def test_allow_decrypt_policy_reads_every_legacy_suite(
    legacy_client: EnvelopeClient, aes_keyring: RawAesKeyring, suite: AlgorithmSuite
) -> None:
    message = await legacy_message(aes_keyring, suite, b"legacy data")
    assert await legacy_client.decrypt(message) == b"legacy data"


@pytest.mark.parametrize(
    ("suite", "cached"),
    [
        (AlgorithmSuite.AES_256_GCM_IV12_TAG16_NO_KDF, False),
        (AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA256, True),
    ],
    ids=["no-kdf-never-cached", "hkdf-cached"],
)
async def test_a_data_key_used_directly_is_never_cached_on_decrypt(
    legacy_client: EnvelopeClient, aes_keyring: RawAesKeyring, suite: AlgorithmSuite, cached: bool
) -> None:
    """A NO_KDF suite encrypts with the data key itself, so the key manager keeps no copy
    of it: a second decrypt of the same message asks the keyring again. A suite that
    derives a per-message key from the data key is served from the cache."""
    message = await legacy_message(aes_keyring, suite, b"legacy data")
    assert await legacy_client.decrypt(message) == b"legacy data"
    assert await legacy_client.decrypt(message) == b"legacy data"
    stats = legacy_client.stats
    assert (stats.decrypt_cache_hits, stats.decrypt_cache_misses) == ((1, 1) if cached else (0, 0))


async def test_forbid_policy_is_read_only(aes_keyring: RawAesKeyring) -> None:
    legacy = await legacy_message(aes_keyring, AlgorithmSuite.AES_128_GCM_IV12_TAG16_NO_KDF, b"old")
    async with EnvelopeClient(
        aes_keyring, commitment_policy=CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT
    ) as client:
        assert await client.decrypt(legacy) == b"old"
        with pytest.raises(errors.CommitmentPolicyError, match="FORBID_ENCRYPT_ALLOW_DECRYPT"):
            await client.encrypt(b"new")


async def test_client_algorithm_suite_is_the_default_of_encrypt_and_encrypt_stream(
    aes_keyring: RawAesKeyring,
) -> None:
    """``EnvelopeClient(algorithm_suite=...)`` is what every message gets unless the call
    names another; re-encryption keeps the old message's suite (README, Key rotation)."""
    async with EnvelopeClient(aes_keyring, algorithm_suite=COMMIT_SIGN) as client:
        assert client.algorithm_suite is COMMIT_SIGN
        one_shot = await client.encrypt(b"one shot")
        async with client.encrypt_stream(b"streamed") as stream:
            streamed = b"".join([chunk async for chunk in stream])
        overridden = await client.encrypt(b"per call", algorithm_suite=COMMIT)
        async with client.encrypt_stream(b"per call", algorithm_suite=COMMIT) as stream:
            overridden_stream = b"".join([chunk async for chunk in stream])
        rotated = await client.reencrypt(overridden, to_keyring=aes_keyring)
        assert await client.decrypt(streamed) == b"streamed"
    suites = [
        aioenvelope.inspect(m).algorithm_suite
        for m in (one_shot, streamed, overridden, overridden_stream, rotated)
    ]
    assert suites == [COMMIT_SIGN, COMMIT_SIGN, COMMIT, COMMIT, COMMIT]
    assert "aws-crypto-public-key" in aioenvelope.inspect(one_shot).encryption_context


NON_COMMITTING = [s for s in AlgorithmSuite if not s.committing]


@pytest.mark.parametrize("suite", NON_COMMITTING, ids=lambda s: s.name)
@pytest.mark.parametrize(
    "policy",
    [
        CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT,
        CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT,
    ],
    ids=lambda p: p.name,
)
def test_a_non_committing_default_suite_is_refused_when_the_client_may_write(
    aes_keyring: RawAesKeyring, suite: AlgorithmSuite, policy: CommitmentPolicy
) -> None:
    """Refused at construction, before any message could be written with it."""
    with pytest.raises(errors.ConfigurationError, match=f"^{suite.name} is readable but not"):
        EnvelopeClient(aes_keyring, algorithm_suite=suite, commitment_policy=policy)


@pytest.mark.parametrize("suite", [*NON_COMMITTING, COMMIT], ids=lambda s: s.name)
async def test_a_default_suite_under_the_forbid_policy_is_ignored_and_encrypt_refused(
    aes_keyring: RawAesKeyring, suite: AlgorithmSuite
) -> None:
    """FORBID_ENCRYPT_ALLOW_DECRYPT is read-only: whatever default suite is given, the
    client is built (it has none) and every encrypt fails with the policy error."""
    legacy = await legacy_message(aes_keyring, AlgorithmSuite.AES_256_GCM_IV12_TAG16_NO_KDF, b"old")
    async with EnvelopeClient(
        aes_keyring,
        algorithm_suite=suite,
        commitment_policy=CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT,
    ) as client:
        assert client.algorithm_suite is None
        assert await client.decrypt(legacy) == b"old"
        for call_suite in (None, suite):
            with pytest.raises(
                errors.CommitmentPolicyError,
                match=r"^this client's policy FORBID_ENCRYPT_ALLOW_DECRYPT forbids",
            ):
                await client.encrypt(b"new", algorithm_suite=call_suite)


def test_a_default_suite_that_is_not_an_algorithm_suite_is_refused(
    aes_keyring: RawAesKeyring,
) -> None:
    with pytest.raises(
        errors.ConfigurationError, match=r"^algorithm_suite must be an AlgorithmSuite, not 1144$"
    ):
        EnvelopeClient(aes_keyring, algorithm_suite=0x478)  # type: ignore[arg-type]


async def legacy_message(keyring: Keyring, suite: AlgorithmSuite, plaintext: bytes = b"x") -> bytes:
    """A v1 message wrapped by ``keyring``, written through the sans-I/O writer."""
    from aioenvelope.format.encryption_context import PUBLIC_KEY_FIELD
    from aioenvelope.format.signing import Signer

    signer = Signer(suite) if suite.signing else None
    context = {PUBLIC_KEY_FIELD: signer.encoded_public_key} if signer else {}
    materials = await keyring.on_encrypt(
        EncryptionMaterials(algorithm_suite=suite, encryption_context=context)
    )
    assert materials.plaintext_data_key is not None
    return build_encryptor(
        suite,
        data_key=materials.plaintext_data_key,
        edks=materials.encrypted_data_keys,
        signer=signer,
    ).encrypt_all(plaintext)


# -- encryption context ------------------------------------------------------------------


async def test_reserved_context_prefix_is_refused(client: EnvelopeClient) -> None:
    with pytest.raises(errors.EncryptionContextError, match="reserved prefix"):
        await client.encrypt(b"x", encryption_context={"aws-crypto-public-key": "mine"})


async def test_decrypt_accepts_a_subset_of_the_stored_context(client: EnvelopeClient) -> None:
    message = await client.encrypt(b"x", encryption_context={"a": "1", "b": "2"})
    assert await client.decrypt(message, encryption_context={"a": "1"}) == b"x"
    assert await client.decrypt(message) == b"x"


async def test_required_context_is_authenticated_but_not_stored(client: EnvelopeClient) -> None:
    message = await client.encrypt(
        b"secret",
        encryption_context={"tenant": "t1", "kind": "note"},
        required_encryption_context_keys={"tenant"},
    )
    assert b"t1" not in message
    # Without the value, or with another, the data key does not unwrap: the raw AES
    # keyring binds the whole context (stored or not) into its wrapping.
    for context in (None, {"tenant": "t2"}):
        with pytest.raises(errors.NoUsableKeyError, match=WRONG_KEY_OR_CONTEXT):
            await client.decrypt(message, encryption_context=context)
    result = await client.decrypt_with_header(message, encryption_context={"tenant": "t1"})
    assert result.plaintext == b"secret"
    assert dict(result.header.encryption_context) == {"kind": "note"}


async def test_required_keys_must_be_in_the_context(client: EnvelopeClient) -> None:
    with pytest.raises(errors.EncryptionContextError, match="tenant"):
        await client.encrypt(b"x", required_encryption_context_keys={"tenant"})


async def test_non_ascii_context_round_trips(client: EnvelopeClient) -> None:
    context = {"租户": "𐀂値", "ключ": "é"}
    message = await client.encrypt(b"x", encryption_context=context)
    assert (
        dict(
            (
                await client.decrypt_with_header(message, encryption_context=context)
            ).header.encryption_context
        )
        == context
    )


# -- limits and arguments ----------------------------------------------------------------


async def test_decrypt_refuses_more_edks_than_configured() -> None:
    keys = [RawAesKeyring("ns", f"k{i}", os.urandom(32)) for i in range(3)]
    multi = MultiKeyring(generator=keys[0], children=keys[1:])
    async with EnvelopeClient(multi) as writer:
        message = await writer.encrypt(b"x")
    async with EnvelopeClient(keys[0], max_encrypted_data_keys=2) as reader:
        with pytest.raises(errors.MessageLimitError, match="at most 2"):
            await reader.decrypt(message)
    async with EnvelopeClient(multi, max_encrypted_data_keys=2) as writer:
        with pytest.raises(errors.MessageLimitError, match="max_encrypted_data_keys=2"):
            await writer.encrypt(b"x")


@pytest.mark.parametrize("frame_length", [0, -1, 2**31, 1.5, True])
def test_bad_frame_length_is_a_configuration_error(
    aes_keyring: RawAesKeyring, frame_length: object
) -> None:
    with pytest.raises(errors.ConfigurationError, match="frame_length"):
        EnvelopeClient(aes_keyring, frame_length=frame_length)  # type: ignore[arg-type]


async def test_frame_length_extremes_work(client: EnvelopeClient) -> None:
    for frame_length in (1, 2**31 - 1):
        message = await client.encrypt(b"abc", frame_length=frame_length)
        assert await client.decrypt(message) == b"abc"


async def test_non_bytes_plaintext_is_refused(client: EnvelopeClient) -> None:
    with pytest.raises(errors.ConfigurationError, match="bytes-like"):
        await client.encrypt("text")  # type: ignore[arg-type]


async def test_bytearray_and_memoryview_inputs_work(client: EnvelopeClient) -> None:
    message = await client.encrypt(bytearray(b"abc"))
    assert await client.decrypt(memoryview(message)) == b"abc"


async def test_large_message_round_trips_through_a_worker_thread(client: EnvelopeClient) -> None:
    data = os.urandom(3 << 20)
    assert await client.decrypt(await client.encrypt(data, frame_length=65536)) == data


# -- keyrings ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 24, 32])
async def test_raw_aes_keyring_accepts_aes_128_192_256(size: int) -> None:
    async with EnvelopeClient(RawAesKeyring("ns", "k", os.urandom(size))) as client:
        assert await client.decrypt(await client.encrypt(b"x")) == b"x"


@pytest.mark.parametrize(
    ("ns", "key"), [("aws-kms", b"\0" * 32), ("ns", b"\0" * 20), ("", b"\0" * 16)]
)
def test_raw_aes_keyring_refuses_bad_configuration(ns: str, key: bytes) -> None:
    with pytest.raises(errors.ConfigurationError):
        RawAesKeyring(ns, "k", key)


@pytest.mark.parametrize(
    "pad",
    [
        padding.PKCS1v15(),
        padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None),
        padding.OAEP(padding.MGF1(hashes.SHA384()), hashes.SHA384(), None),
        padding.OAEP(padding.MGF1(hashes.SHA512()), hashes.SHA512(), None),
    ],
    ids=["pkcs1", "oaep-sha1", "oaep-sha384", "oaep-sha512"],
)
async def test_raw_rsa_keyring_paddings_round_trip(
    rsa_private_key: rsa.RSAPrivateKey, pad: padding.AsymmetricPadding
) -> None:
    keyring = RawRsaKeyring("ns", "rsa", private_key=rsa_private_key, padding=pad)
    async with EnvelopeClient(keyring) as client:
        assert await client.decrypt(await client.encrypt(b"x")) == b"x"


def test_raw_rsa_keyring_refuses_mismatched_oaep_hashes(rsa_private_key: rsa.RSAPrivateKey) -> None:
    bad = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA256(), None)
    with pytest.raises(errors.ConfigurationError, match="OAEP"):
        RawRsaKeyring("ns", "rsa", private_key=rsa_private_key, padding=bad)


async def test_public_only_rsa_keyring_encrypts_but_cannot_decrypt(
    rsa_private_key: rsa.RSAPrivateKey,
) -> None:
    public = RawRsaKeyring("ns", "rsa", public_key=rsa_private_key.public_key())
    private = RawRsaKeyring("ns", "rsa", private_key=rsa_private_key)
    async with EnvelopeClient(public) as writer, EnvelopeClient(private) as reader:
        message = await writer.encrypt(b"for the key holder")
        assert await reader.decrypt(message) == b"for the key holder"
        with pytest.raises(errors.NoUsableKeyError, match="no private key"):
            await writer.decrypt(message)


async def test_multi_keyring_message_opens_with_any_one_member(
    rsa_private_key: rsa.RSAPrivateKey,
) -> None:
    aes = RawAesKeyring("ns", "aes", os.urandom(32))
    rsa_ring = RawRsaKeyring("ns", "rsa", private_key=rsa_private_key)
    async with EnvelopeClient(MultiKeyring(generator=aes, children=[rsa_ring])) as writer:
        message = await writer.encrypt(b"shared")
        header = (await writer.decrypt_with_header(message)).header
    assert [edk.provider_info[:3] for edk in header.encrypted_data_keys] == [b"aes", b"rsa"]
    for alone in (aes, rsa_ring):
        async with EnvelopeClient(alone) as reader:
            assert await reader.decrypt(message) == b"shared"


async def test_multi_keyring_without_generator_explains_itself() -> None:
    keyring = MultiKeyring(children=[RawAesKeyring("ns", "k", os.urandom(32))])
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.KeyringError, match="generator"):
            await client.encrypt(b"x")


async def test_multi_keyring_failure_names_every_member() -> None:
    members = [RawAesKeyring("ns", f"k{i}", os.urandom(32)) for i in range(2)]
    async with EnvelopeClient(RawAesKeyring("ns", "other", os.urandom(32))) as writer:
        message = await writer.encrypt(b"x")
    async with EnvelopeClient(MultiKeyring(children=members)) as reader:
        with pytest.raises(errors.NoUsableKeyError, match=r"k0.*k1"):
            await reader.decrypt(message)


async def test_a_user_written_keyring_works() -> None:
    """The interface is small enough to implement: a toy keyring that XORs (tests only)."""

    class XorKeyring(Keyring):
        async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
            materials = materials.generate_data_key()
            assert materials.plaintext_data_key is not None
            wrapped = bytes(b ^ 0x5A for b in materials.plaintext_data_key)
            return materials.with_encrypted_data_key(EncryptedDataKey("xor", b"", wrapped))

        async def on_decrypt(self, materials, encrypted_data_keys):  # type: ignore[no-untyped-def]
            for edk in encrypted_data_keys:
                if edk.provider_id == "xor":
                    return materials.with_data_key(bytes(b ^ 0x5A for b in edk.ciphertext))
            raise errors.NoUsableKeyError("no xor key")

    async with EnvelopeClient(XorKeyring()) as client:
        assert await client.decrypt(await client.encrypt(b"mine")) == b"mine"


# -- secrets stay secret -----------------------------------------------------------------


def shown_forms(secret: bytes) -> tuple[str, ...]:
    """The ways key bytes would show in a text: hex, and as a ``bytes`` repr shows them."""
    return (secret.hex(), repr(secret)[2:-1])


def leaked(secrets: list[bytes], text: str) -> bool:
    return any(form in text for secret in secrets for form in shown_forms(secret))


def message_data_key(wrapping_key: bytes, message: bytes) -> bytes:
    """The data key ``message`` was written under, unwrapped from its one EDK with the
    raw AES wrapping key (the ESDK's layout: the IV is the provider info's last 12
    bytes, the encryption context, empty here, is the AAD)."""
    (edk,) = aioenvelope.inspect(message).encrypted_data_keys
    assert aioenvelope.inspect(message).encryption_context == {}
    return AESGCM(wrapping_key).decrypt(edk.provider_info[-12:], edk.ciphertext, b"")


async def test_no_key_material_in_reprs_or_error_messages(
    rsa_private_key: rsa.RSAPrivateKey,
) -> None:
    """Scanned for: the wrapping key, the data key of the very message whose reprs and
    errors are scanned (recovered from the message, so the scan cannot look for some
    other key by mistake), and the data key of the materials whose repr is scanned
    (encryption materials a keyring made, and the decryption materials it returned for
    the message)."""
    wrapping_key = bytes(range(32))
    keyring = RawAesKeyring("ns", "k", wrapping_key)
    texts = [repr(keyring), repr(RawRsaKeyring("ns", "r", private_key=rsa_private_key))]
    async with EnvelopeClient(keyring) as client:
        texts.append(repr(client))
        message = await client.encrypt(b"plaintext-marker")
        result = await client.decrypt_with_header(message)
        texts += [repr(result), repr(result.header)]
        refusals = [
            (message[:-1], errors.TruncatedMessageError, "ends inside frame 1"),
            (message[:40], errors.TruncatedMessageError, "ends inside the message header"),
            (message + b"!", errors.MalformedMessageError, "unexpected bytes after the end"),
            (b"\x01" + message[1:], errors.MalformedMessageError, "unknown message type 0x04"),
        ]
        for bad, error, says in refusals:
            with pytest.raises(error, match=says) as info:
                await client.decrypt(bad)
            texts.append(str(info.value))
    materials = await keyring.on_encrypt(
        EncryptionMaterials(algorithm_suite=COMMIT, encryption_context={})
    )
    texts.append(repr(materials))
    assert materials.plaintext_data_key is not None
    data_key = message_data_key(wrapping_key, message)
    # The decrypt side: the materials the keyring returns with this message's data key.
    unwrapped = await keyring.on_decrypt(
        DecryptionMaterials(algorithm_suite=COMMIT, encryption_context={}),
        aioenvelope.inspect(message).encrypted_data_keys,
    )
    assert unwrapped.plaintext_data_key == data_key
    texts.append(repr(unwrapped))
    secrets = [wrapping_key, data_key, materials.plaintext_data_key]
    assert len(set(secrets)) == 3
    # The scan finds each key in every form it looks for: it cannot pass by not looking.
    for secret in secrets:
        for form in shown_forms(secret):
            assert leaked(secrets, f"{texts[0]} {form} {texts[-1]}")
    assert [text for text in texts if leaked(secrets, text)] == []
    assert [text for text in texts if "plaintext-marker" in text] == []
