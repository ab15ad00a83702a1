"""KMS keyrings through the public API, against a real moto KMS server (``moto_kms``).

Strict keyrings (every way of naming a key, additional keys), discovery keyrings and
their filters, start-up key checks, failures (each a clear library error, never
plaintext), client lifetime, the encryption context reaching KMS, multi-Region keys,
and credentials never leaking into error messages. What every keyring must do (round
trips, several keys, a wrong context, outages and the breaker, call counts, no key bytes
in reprs and errors) is checked for KMS by the conformance suite, test_keyring_conformance.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import anyio
import pytest
from botocore.exceptions import ClientError
from keyring_harness import exception_chain
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_discovery_keyring, moto_kms_keyring, shared_session
from tracking_session import TrackingSession

from aioenvelope import (
    AlgorithmSuite,
    DiscoveryFilter,
    EnvelopeClient,
    Keyring,
    KmsKeyring,
    MultiKeyring,
    RawAesKeyring,
)
from aioenvelope.errors import (
    EnvelopeError,
    KeyringError,
    KMSError,
    KMSKeyCheckError,
    NoUsableKeyError,
)

OTHER_REGION = "eu-west-1"
CONTEXT = {"tenant": "t1", "purpose": "kms-keyring-tests"}
PLAINTEXT = b"attack at dawn " * 7
OTHER_ACCOUNT = "111122223333"


# -- helpers -----------------------------------------------------------------------------


async def encrypt_with(
    keyring: Keyring, plaintext: bytes = PLAINTEXT, context: dict[str, str] = CONTEXT
) -> bytes:
    async with EnvelopeClient(keyring) as client:
        return await client.encrypt(plaintext, encryption_context=context)


async def decrypt_with(
    keyring: Keyring, blob: bytes, context: dict[str, str] | None = CONTEXT
) -> bytes:
    async with EnvelopeClient(keyring) as client:
        return await client.decrypt(blob, encryption_context=context)


async def edks_of(blob: bytes, keyring: Keyring) -> list[Any]:
    """The message's EDKs, read through ``decrypt_with_header`` with a keyring that can."""
    async with EnvelopeClient(keyring) as client:
        result = await client.decrypt_with_header(blob)
    assert result.plaintext == PLAINTEXT
    return list(result.header.encrypted_data_keys)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_region_key(moto_kms: MotoKms) -> KmsKey:
    return moto_kms.create_key(region=OTHER_REGION)


@pytest.fixture(scope="module")
def mrk(moto_kms: MotoKms) -> tuple[str, str]:
    """A multi-Region key in us-west-2 and its replica in eu-west-1: (primary, replica) ARNs."""
    primary = moto_kms.create_key(MultiRegion=True)
    replica = moto_kms.admin.replicate_key(KeyId=primary.key_id, ReplicaRegion=OTHER_REGION)
    replica_arn = str(replica["ReplicaKeyMetadata"]["Arn"])
    assert primary.key_id.startswith("mrk-")
    assert replica_arn == primary.arn.replace(moto_kms.region, OTHER_REGION)
    return primary.arn, replica_arn


@pytest.fixture
def moto_mrk_ciphertexts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Works around a moto bug so that multi-Region keys can decrypt at all.

    moto 5.2.5 (``moto/kms/utils.py``) writes the key ID into its ciphertext blobs as a
    fixed 36-byte field (``KEY_ID_LEN = 36``, ``CIPHERTEXT_HEADER_FORMAT``). A multi-Region
    key ID is ``mrk-`` + a 36-character UUID, 40 characters, so it is truncated and every
    Decrypt of a blob made under a multi-Region key fails with AccessDeniedException,
    in any region. The server runs in this process (``ThreadedMotoServer``), so for the
    duration of one test the blob (de)serializers are replaced by ones that keep 40-byte
    ``mrk-`` key IDs whole; other blobs keep moto's format. Nothing else changes.
    """
    import moto.kms.utils as moto_kms_utils

    original_serialize = moto_kms_utils._serialize_ciphertext_blob
    original_deserialize = moto_kms_utils._deserialize_ciphertext_blob
    mrk_header = f">40s{moto_kms_utils.IV_LEN}s{moto_kms_utils.TAG_LEN}s"
    mrk_header_len = struct.calcsize(mrk_header)

    def serialize(ciphertext: Any) -> bytes:
        if not ciphertext.key_id.startswith("mrk-"):
            return bytes(original_serialize(ciphertext))
        key_id = ciphertext.key_id.encode("utf-8")
        assert len(key_id) == 40
        return struct.pack(mrk_header, key_id, ciphertext.iv, ciphertext.tag) + bytes(
            ciphertext.ciphertext
        )

    def deserialize(ciphertext_blob: bytes) -> Any:
        if not ciphertext_blob.startswith(b"mrk-"):
            return original_deserialize(ciphertext_blob)
        key_id, iv, tag = struct.unpack(mrk_header, ciphertext_blob[:mrk_header_len])
        return moto_kms_utils.Ciphertext(
            key_id=key_id.decode("utf-8"),
            iv=iv,
            ciphertext=ciphertext_blob[mrk_header_len:],
            tag=tag,
        )

    monkeypatch.setattr(moto_kms_utils, "_serialize_ciphertext_blob", serialize)
    monkeypatch.setattr(moto_kms_utils, "_deserialize_ciphertext_blob", deserialize)


@pytest.fixture
async def caller_client(moto_kms: MotoKms) -> AsyncIterator[Any]:
    """An aiobotocore KMS client the test (not the library) owns."""
    async with shared_session().client(
        "kms", endpoint_url=moto_kms.endpoint_url, region_name=moto_kms.region
    ) as kms_client:
        yield kms_client


# -- round trips -------------------------------------------------------------------------

KEY_NAMINGS = ["key_id", "arn", "alias_name", "alias_arn"]


@pytest.mark.parametrize("naming", KEY_NAMINGS)
async def test_round_trip_with_generator_named_any_way(
    moto_kms: MotoKms, kms_key: KmsKey, naming: str
) -> None:
    """Users name keys by ID, ARN, alias or alias ARN; all must work, and the EDK must
    record the key's full ARN (as the ESDK does) so that any reader can find the key."""
    identifier = getattr(kms_key, naming)
    keyring = moto_kms_keyring(moto_kms, identifier, session=None)  # the library makes its own
    async with EnvelopeClient(keyring) as client:
        blob = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        result = await client.decrypt_with_header(blob, encryption_context=CONTEXT)
    assert result.plaintext == PLAINTEXT
    (edk,) = result.header.encrypted_data_keys
    assert edk.provider_id == "aws-kms"
    assert edk.provider_info == kms_key.arn.encode()
    assert keyring.kms_calls == {"DescribeKey": 1, "GenerateDataKey": 1, "Decrypt": 1}


@pytest.mark.parametrize("naming", KEY_NAMINGS)
async def test_message_decrypts_with_keyring_naming_same_key_differently(
    moto_kms: MotoKms, kms_key: KmsKey, naming: str
) -> None:
    """Writer and reader may name the key differently (alias vs ARN...); the reader's
    start-up check resolves its name to the ARN that the EDK records."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.alias_arn))
    reader = moto_kms_keyring(moto_kms, getattr(kms_key, naming))
    assert await decrypt_with(reader, blob) == PLAINTEXT
    assert reader.kms_calls["Decrypt"] == 1


@pytest.mark.parametrize("naming", KEY_NAMINGS)
async def test_unchecked_keyring_round_trips_without_describe_key(
    moto_kms: MotoKms, kms_key: KmsKey, naming: str
) -> None:
    """check_keys=False skips DescribeKey; an unresolved key ID must still match its EDK
    (by key ID) and an alias must still work (KMS decides, and its answer is checked)."""
    keyring = moto_kms_keyring(moto_kms, getattr(kms_key, naming), check_keys=False)
    blob = await encrypt_with(keyring)
    assert await decrypt_with(keyring, blob) == PLAINTEXT
    assert "DescribeKey" not in keyring.kms_calls
    assert keyring.kms_calls == {"GenerateDataKey": 1, "Decrypt": 1}


# -- additional keys ---------------------------------------------------------------------


async def test_additional_key_wraps_data_key_with_one_encrypt_call(
    moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """One GenerateDataKey under the generator and one Encrypt per additional key; the
    message carries one EDK per key, in order, each naming its key's ARN."""
    keyring = moto_kms_keyring(
        moto_kms, kms_key.alias_name, additional_key_ids=[kms_key_2.alias_name]
    )
    async with EnvelopeClient(keyring) as client:
        blob = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert keyring.kms_calls == {"DescribeKey": 2, "GenerateDataKey": 1, "Encrypt": 1}
        result = await client.decrypt_with_header(blob)
    infos = [edk.provider_info for edk in result.header.encrypted_data_keys]
    assert infos == [kms_key.arn.encode(), kms_key_2.arn.encode()]
    assert all(edk.provider_id == "aws-kms" for edk in result.header.encrypted_data_keys)


async def test_kms_keyring_as_multikeyring_child_wraps_existing_data_key(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """As a MultiKeyring child the KMS keyring is handed a data key and wraps it with
    Encrypt (no GenerateDataKey); either keyring alone then reads the message."""
    aes = RawAesKeyring("ns", "k", os.urandom(32))
    kms = moto_kms_keyring(moto_kms, kms_key.arn)
    blob = await encrypt_with(MultiKeyring(generator=aes, children=[kms]))
    assert kms.kms_calls == {"DescribeKey": 1, "Encrypt": 1}
    assert await decrypt_with(moto_kms_keyring(moto_kms, kms_key.arn), blob) == PLAINTEXT
    assert await decrypt_with(aes, blob) == PLAINTEXT


# -- discovery ---------------------------------------------------------------------------


async def test_discovery_keyring_decrypts_message_under_any_key(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """A discovery keyring names no key: it asks KMS to decrypt under the key the EDK
    names, with no DescribeKey, one Decrypt."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    keyring = moto_kms_discovery_keyring(moto_kms)
    assert await decrypt_with(keyring, blob) == PLAINTEXT
    assert keyring.kms_calls == {"Decrypt": 1}


async def test_discovery_filter_with_keys_account_decrypts(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """A filter listing the key's account (among others) lets the EDK through."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    keyring = moto_kms_discovery_keyring(
        moto_kms, discovery_filter=DiscoveryFilter([OTHER_ACCOUNT, kms_key.account])
    )
    assert await decrypt_with(keyring, blob) == PLAINTEXT
    assert keyring.kms_calls == {"Decrypt": 1}


@pytest.mark.parametrize(
    ("accounts", "partition"),
    [([OTHER_ACCOUNT], "aws"), (None, "aws-cn")],
    ids=["other-account", "other-partition"],
)
async def test_discovery_filter_rejecting_key_makes_no_kms_call(
    moto_kms: MotoKms, kms_key: KmsKey, accounts: list[str] | None, partition: str
) -> None:
    """The filter is a security boundary: a key outside it must never be sent to KMS,
    and the caller gets NoUsableKeyError, not plaintext."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    keyring = moto_kms_discovery_keyring(
        moto_kms,
        discovery_filter=DiscoveryFilter(accounts or [kms_key.account], partition=partition),
    )
    with pytest.raises(NoUsableKeyError):
        await decrypt_with(keyring, blob)
    assert keyring.kms_calls.get("Decrypt", 0) == 0


async def test_discovery_keyring_cannot_encrypt(moto_kms: MotoKms) -> None:
    """Discovery names no key to encrypt under: encrypting must fail clearly, not quietly
    produce a message nobody can read."""
    keyring = moto_kms_discovery_keyring(moto_kms)
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(KeyringError, match="only decrypts"):
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert keyring.kms_calls == {}


# -- failures: every one a library error, never plaintext ---------------------------------


@pytest.mark.parametrize(
    "reader_context", [{**CONTEXT, "tenant": "t2"}, {}], ids=["wrong", "missing"]
)
async def test_wrong_required_context_is_refused_by_kms(
    moto_kms: MotoKms, kms_key: KmsKey, reader_context: dict[str, str]
) -> None:
    """A required (unstored) context pair is only checked by KMS: a reader supplying a
    wrong one, or none, must be refused (InvalidCiphertextException), not decrypted."""
    writer = moto_kms_keyring(moto_kms, kms_key.arn)
    async with EnvelopeClient(writer) as client:
        blob = await client.encrypt(
            PLAINTEXT, encryption_context=CONTEXT, required_encryption_context_keys={"tenant"}
        )
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
    reader = moto_kms_keyring(moto_kms, kms_key.arn)
    with pytest.raises(NoUsableKeyError, match="InvalidCiphertextException"):
        await decrypt_with(reader, blob, reader_context)
    assert reader.kms_calls["Decrypt"] == 1


async def test_unknown_key_fails_start_up_check_naming_it(moto_kms: MotoKms) -> None:
    """A typo in a key ID must fail when the client starts, with the key named, not at
    the first encrypt in production."""
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(KMSKeyCheckError, match=missing) as info:
        async with EnvelopeClient(moto_kms_keyring(moto_kms, missing)):
            pass
    assert "does not exist" in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, KMSError)
    assert (cause.operation, cause.key_id, cause.error_code) == (
        "DescribeKey",
        missing,
        "NotFoundException",
    )


async def test_key_pending_deletion_fails_start_up_check(moto_kms: MotoKms) -> None:
    """A key scheduled for deletion will stop working: refuse it at start-up."""
    key = moto_kms.create_key()
    moto_kms.admin.schedule_key_deletion(KeyId=key.key_id, PendingWindowInDays=7)
    with pytest.raises(KMSKeyCheckError, match="PendingDeletion") as info:
        async with EnvelopeClient(moto_kms_keyring(moto_kms, key.arn)):
            pass
    assert key.arn in str(info.value)


async def test_disabled_key_fails_start_up_check(moto_kms: MotoKms) -> None:
    """A disabled key cannot encrypt or decrypt: refuse it at start-up, saying why."""
    key = moto_kms.create_key()
    moto_kms.admin.disable_key(KeyId=key.key_id)
    with pytest.raises(KMSKeyCheckError, match="Disabled") as info:
        async with EnvelopeClient(moto_kms_keyring(moto_kms, key.alias_name)):
            pass
    assert key.alias_name in str(info.value)


async def test_disabled_additional_key_fails_start_up_check(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """Every configured key is checked, not just the generator."""
    key = moto_kms.create_key()
    moto_kms.admin.disable_key(KeyId=key.key_id)
    with pytest.raises(KMSKeyCheckError, match="Disabled") as info:
        async with EnvelopeClient(
            moto_kms_keyring(moto_kms, kms_key.arn, additional_key_ids=[key.key_id])
        ):
            pass
    assert key.key_id in str(info.value)


@pytest.mark.parametrize(
    ("spec", "usage", "expected"),
    [
        ("RSA_2048", "ENCRYPT_DECRYPT", "RSA_2048"),
        ("ECC_NIST_P256", "SIGN_VERIFY", "SIGN_VERIFY"),
    ],
)
async def test_asymmetric_key_fails_start_up_check(
    moto_kms: MotoKms, spec: str, usage: str, expected: str
) -> None:
    """Envelope encryption needs a symmetric encryption key: an RSA or signing key is a
    configuration mistake, reported at start-up with what is wrong with it."""
    key = moto_kms.create_key(KeySpec=spec, KeyUsage=usage)
    with pytest.raises(KMSKeyCheckError, match=expected) as info:
        async with EnvelopeClient(moto_kms_keyring(moto_kms, key.arn)):
            pass
    assert key.arn in str(info.value)


async def test_failed_start_up_check_leaves_no_client_open(moto_kms: MotoKms) -> None:
    """When entering the EnvelopeClient fails, the KMS clients opened for the check must
    be closed (there is no __aexit__ to do it later)."""
    tracking = TrackingSession()
    keyring = moto_kms_keyring(moto_kms, "alias/does-not-exist", session=tracking.session)
    with pytest.raises(KMSKeyCheckError):
        async with EnvelopeClient(keyring):
            pass
    assert tracking.created == [moto_kms.region]
    assert tracking.open_clients == 0
    assert tracking.events == [("open", moto_kms.region), ("close", moto_kms.region)]


async def test_unchecked_unknown_generator_fails_on_generate_data_key(moto_kms: MotoKms) -> None:
    """With check_keys=False a bad key surfaces on the first call, as a KMSError saying
    which operation, which key and AWS's error code."""
    missing = "00000000-0000-4000-8000-000000000001"
    keyring = moto_kms_keyring(moto_kms, missing, check_keys=False)
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(KMSError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    exc = info.value
    assert (exc.operation, exc.key_id, exc.error_code, exc.transient) == (
        "GenerateDataKey",
        missing,
        "NotFoundException",
        False,
    )
    for part in ("GenerateDataKey", missing, "NotFoundException"):
        assert part in str(exc)
    assert isinstance(exc.__cause__, ClientError)


async def test_unchecked_unknown_additional_key_fails_on_encrypt(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """A bad additional key fails the Encrypt call as a KMSError (the same error type as
    a bad generator), so one ``except KMSError`` handles both."""
    keyring = moto_kms_keyring(
        moto_kms, kms_key.arn, additional_key_ids=["alias/does-not-exist"], check_keys=False
    )
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(KMSError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    exc = info.value
    assert (exc.operation, exc.key_id, exc.error_code) == (
        "Encrypt",
        "alias/does-not-exist",
        "NotFoundException",
    )
    assert "Encrypt" in str(exc)
    assert "alias/does-not-exist" in str(exc)


async def test_failing_kms_child_of_multikeyring_raises_kms_error(
    moto_kms: MotoKms,
) -> None:
    """A KMS child that cannot wrap the data key fails the encrypt with its KMSError, as
    it would alone, not with an error of some other type."""
    aes = RawAesKeyring("ns", "k", os.urandom(32))
    kms = moto_kms_keyring(moto_kms, "alias/does-not-exist", check_keys=False)
    async with EnvelopeClient(MultiKeyring(generator=aes, children=[kms])) as client:
        with pytest.raises(KMSError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert (info.value.operation, info.value.error_code) == ("Encrypt", "NotFoundException")
    assert kms.kms_calls == {"Encrypt": 1}


async def test_unchecked_unknown_alias_fails_decrypt_with_kms_error_code(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """An alias cannot be matched to an EDK without KMS, so KMS is asked; its refusal
    must come back as NoUsableKeyError naming operation, key and AWS error code."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    keyring = moto_kms_keyring(moto_kms, "alias/does-not-exist", check_keys=False)
    with pytest.raises(NoUsableKeyError) as info:
        await decrypt_with(keyring, blob)
    for part in ("Decrypt", "alias/does-not-exist", "NotFoundException"):
        assert part in str(info.value)
    assert keyring.kms_calls == {"Decrypt": 1}


@pytest.mark.parametrize("check_keys", [True, False])
async def test_keyring_naming_another_key_makes_no_decrypt_call(
    moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey, check_keys: bool
) -> None:
    """No EDK names the reader's key, so there is nothing to ask KMS: NoUsableKeyError
    at once, zero Decrypt calls (whether the key ID was resolved by DescribeKey or not)."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    keyring = moto_kms_keyring(moto_kms, kms_key_2.key_id, check_keys=check_keys)
    with pytest.raises(NoUsableKeyError, match="0 tried"):
        await decrypt_with(keyring, blob)
    assert keyring.kms_calls.get("Decrypt", 0) == 0


async def test_unchecked_alias_of_another_key_is_refused_by_kms(
    moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """An unresolved alias of another key is sent to KMS with the EDK, and KMS refuses
    (AWS: IncorrectKeyException, moto: AccessDeniedException): no plaintext."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    keyring = moto_kms_keyring(moto_kms, kms_key_2.alias_name, check_keys=False)
    with pytest.raises(NoUsableKeyError) as info:
        await decrypt_with(keyring, blob)
    message = str(info.value)
    assert "Decrypt" in message
    assert kms_key_2.alias_name in message
    assert "IncorrectKeyException" in message or "AccessDeniedException" in message
    assert keyring.kms_calls == {"Decrypt": 1}


async def test_an_edk_naming_another_key_than_kms_answered_for_is_refused_by_the_keyring(
    moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """An unresolved alias is matched to an EDK by KMS's answer: the key ARN KMS
    answered for must be the one the EDK names. An EDK made under key A (the alias's)
    but relabelled as key B is refused by the keyring with the two ARNs, before the
    header's tag (which would refuse the relabelled header too) is checked."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    assert blob.count(kms_key.arn.encode()) == 1
    relabelled = blob.replace(kms_key.arn.encode(), kms_key_2.arn.encode())
    keyring = moto_kms_keyring(moto_kms, kms_key.alias_name, check_keys=False)
    with pytest.raises(NoUsableKeyError) as info:
        await decrypt_with(keyring, relabelled)
    assert str(info.value) == (
        f"the KMS keyring with key {kms_key.alias_name} could not decrypt any of the "
        "message's 1 encrypted data keys (1 tried): "
        f"KMS Decrypt with key {kms_key.alias_name} answered for {kms_key.arn}, "
        f"not {kms_key_2.arn}. The message carries encrypted data keys for: "
        f"AWS KMS key {kms_key_2.arn}"
    )
    assert keyring.kms_calls == {"Decrypt": 1}
    assert await decrypt_with(keyring, blob) == PLAINTEXT


@pytest.mark.parametrize("corruption", ["bit-flip", "random"])
async def test_corrupted_edk_is_refused_by_kms(
    moto_kms: MotoKms, kms_key: KmsKey, corruption: str
) -> None:
    """An EDK whose ciphertext was altered must be refused by KMS and reported as
    NoUsableKeyError with KMS's reason; the header tag is never reached."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    (edk,) = await edks_of(blob, moto_kms_keyring(moto_kms, kms_key.arn))
    original = bytes(edk.ciphertext)
    if corruption == "bit-flip":
        bad = original[:-1] + bytes([original[-1] ^ 0x01])
    else:
        bad = os.urandom(len(original))
    assert blob.count(original) == 1
    tampered = blob.replace(original, bad)
    keyring = moto_kms_keyring(moto_kms, kms_key.arn)
    with pytest.raises(NoUsableKeyError) as info:
        await decrypt_with(keyring, tampered)
    message = str(info.value)
    assert "Decrypt" in message
    assert kms_key.arn in message
    if corruption == "bit-flip":
        assert "InvalidCiphertextException" in message
    else:  # moto reads a garbage key ID from the blob; AWS says InvalidCiphertext
        assert "InvalidCiphertextException" in message or "AccessDeniedException" in message
    assert keyring.kms_calls["Decrypt"] == 1


async def test_message_without_kms_edk_makes_no_kms_call(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """EDKs of other providers are skipped, not sent to KMS."""
    aes = RawAesKeyring("ns", "k", os.urandom(32))
    blob = await encrypt_with(aes)
    for keyring in (moto_kms_keyring(moto_kms, kms_key.arn), moto_kms_discovery_keyring(moto_kms)):
        with pytest.raises(NoUsableKeyError):
            await decrypt_with(keyring, blob)
        assert keyring.kms_calls.get("Decrypt", 0) == 0


# -- the encryption context reaches KMS --------------------------------------------------


async def test_full_encryption_context_is_bound_to_edk_by_kms(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """KMS must authenticate the message's whole context (including the signing suite's
    public key): the EDK decrypts under exactly that context and under no other."""
    keyring = moto_kms_keyring(moto_kms, kms_key.arn)
    async with EnvelopeClient(keyring) as client:
        blob = await client.encrypt(
            PLAINTEXT,
            encryption_context=CONTEXT,
            algorithm_suite=AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
        )
        result = await client.decrypt_with_header(blob)
    full = dict(result.header.encryption_context)
    assert set(full) == {*CONTEXT, "aws-crypto-public-key"}
    (edk,) = result.header.encrypted_data_keys
    ok = moto_kms.admin.decrypt(
        CiphertextBlob=edk.ciphertext, EncryptionContext=full, KeyId=kms_key.arn
    )
    assert ok["KeyId"] == kms_key.arn
    assert len(ok["Plaintext"]) == 32
    for wrong in (dict(CONTEXT), {**full, "tenant": "t2"}, {}):
        with pytest.raises(ClientError) as info:
            moto_kms.admin.decrypt(
                CiphertextBlob=edk.ciphertext, EncryptionContext=wrong, KeyId=kms_key.arn
            )
        assert info.value.response["Error"]["Code"] == "InvalidCiphertextException"


# -- client lifetime ---------------------------------------------------------------------


async def test_one_client_per_region_reused_and_closed_on_exit(
    moto_kms: MotoKms, kms_key: KmsKey, other_region_key: KmsKey
) -> None:
    """A client per call would cost a TLS handshake each time: exactly one client per
    region must be created, even under concurrent first use, reused for every call, and
    closed when the EnvelopeClient exits."""
    tracking = TrackingSession()
    keyring = moto_kms_keyring(
        moto_kms,
        kms_key.key_id,
        additional_key_ids=[other_region_key.arn],
        session=tracking.session,
        check_keys=False,
    )
    n = 12
    blobs: list[bytes] = [b""] * n
    # No cache: every message must make its own calls, all through the same clients.
    async with EnvelopeClient(keyring, cache=None) as client:

        async def round_trip(i: int) -> None:
            blobs[i] = await client.encrypt(PLAINTEXT + bytes([i]), encryption_context=CONTEXT)
            got = await client.decrypt(blobs[i], encryption_context=CONTEXT)
            assert got == PLAINTEXT + bytes([i])

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(round_trip, i)
        assert keyring.kms_calls == {"GenerateDataKey": n, "Encrypt": n, "Decrypt": n}
        assert sorted(tracking.created) == sorted([moto_kms.region, OTHER_REGION])
        assert tracking.open_clients == 2
    assert tracking.open_clients == 0
    assert sorted(kind for kind, _ in tracking.events) == ["close", "close", "open", "open"]
    # The other region's client really was used: its EDK names the eu-west-1 key.
    reader = moto_kms_keyring(moto_kms, other_region_key.arn)
    assert await decrypt_with(reader, blobs[0]) == PLAINTEXT + b"\x00"


async def test_caller_supplied_client_is_used_and_left_open(
    moto_kms: MotoKms, kms_key: KmsKey, caller_client: Any
) -> None:
    """A client the caller passes in is theirs: every call must go through it (no client
    of our own for its region), and it must still work after the EnvelopeClient exits."""
    seen: list[str] = []

    def count(event_name: str, **_: Any) -> None:
        seen.append(event_name.rsplit(".", 1)[-1])

    caller_client.meta.events.register("before-call.kms", count)
    tracking = TrackingSession()
    keyring = KmsKeyring(kms_key.key_id, client=caller_client, session=tracking.session)
    async with EnvelopeClient(keyring) as client:
        blob = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
    assert sorted(seen) == ["Decrypt", "DescribeKey", "GenerateDataKey"]
    assert tracking.created == []
    response = await caller_client.describe_key(KeyId=kms_key.key_id)
    assert response["KeyMetadata"]["Arn"] == kms_key.arn


# -- multi-Region keys -------------------------------------------------------------------


@pytest.mark.usefixtures("moto_mrk_ciphertexts")
async def test_mrk_aware_keyring_decrypts_with_replica_in_its_region(
    moto_kms: MotoKms, mrk: tuple[str, str]
) -> None:
    """With mrk_aware=True a reader in eu-west-1, configured with the replica, reads a
    message made under the us-west-2 primary, calling KMS only in its own region."""
    primary, replica = mrk
    writer = moto_kms_keyring(moto_kms, primary)
    blob = await encrypt_with(writer)
    (edk,) = await edks_of(blob, writer)
    assert edk.provider_info == primary.encode()
    tracking = TrackingSession()
    reader = moto_kms_keyring(moto_kms, replica, mrk_aware=True, session=tracking.session)
    assert await decrypt_with(reader, blob) == PLAINTEXT
    assert tracking.created == [OTHER_REGION]
    assert reader.kms_calls == {"DescribeKey": 1, "Decrypt": 1}


async def test_mrk_unaware_keyring_refuses_replica_arn(
    moto_kms: MotoKms, mrk: tuple[str, str]
) -> None:
    """Without mrk_aware a replica ARN is a different key: the EDK (naming the primary)
    does not match, so NoUsableKeyError and no Decrypt call."""
    primary, replica = mrk
    blob = await encrypt_with(moto_kms_keyring(moto_kms, primary))
    reader = moto_kms_keyring(moto_kms, replica, region_name=OTHER_REGION)
    with pytest.raises(NoUsableKeyError):
        await decrypt_with(reader, blob)
    assert reader.kms_calls.get("Decrypt", 0) == 0


@pytest.mark.usefixtures("moto_mrk_ciphertexts")
async def test_mrk_aware_discovery_decrypts_with_replica_in_home_region(
    moto_kms: MotoKms, mrk: tuple[str, str]
) -> None:
    """An MRK-aware discovery keyring in eu-west-1 decrypts a us-west-2 MRK message
    through the eu-west-1 replica, never calling the primary's region."""
    primary, _ = mrk
    blob = await encrypt_with(moto_kms_keyring(moto_kms, primary))
    tracking = TrackingSession()
    reader = moto_kms_discovery_keyring(
        moto_kms, region_name=OTHER_REGION, mrk_aware=True, session=tracking.session
    )
    assert await decrypt_with(reader, blob) == PLAINTEXT
    assert tracking.created == [OTHER_REGION]
    assert reader.kms_calls == {"Decrypt": 1}


async def test_mrk_aware_discovery_skips_single_region_key_of_other_region(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """An MRK-aware discovery keyring stays in its region: an ordinary key from another
    region is skipped, not called cross-region."""
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    reader = moto_kms_discovery_keyring(moto_kms, region_name=OTHER_REGION, mrk_aware=True)
    with pytest.raises(NoUsableKeyError):
        await decrypt_with(reader, blob)
    assert reader.kms_calls.get("Decrypt", 0) == 0


# -- credentials never leak --------------------------------------------------------------

ACCESS_KEY = "AKIDEXAMPLEDISTINCT"
SECRET_KEY = "SECRETDISTINCTVALUE"  # a dummy for moto, searched for in errors


@pytest.mark.parametrize("failure", ["start-up", "generate", "decrypt"])
async def test_kms_errors_never_contain_credentials(
    moto_kms: MotoKms, kms_key: KmsKey, failure: str
) -> None:
    """Errors end up in logs and bug reports: no part of any error (nor anything chained
    to it) may carry the caller's access key or secret."""
    session = aioboto3.Session(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=moto_kms.region,
    )
    missing = "alias/does-not-exist"
    blob = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn))
    try:
        if failure == "start-up":
            await encrypt_with(moto_kms_keyring(moto_kms, missing, session=session))
        elif failure == "generate":
            await encrypt_with(
                moto_kms_keyring(moto_kms, missing, session=session, check_keys=False)
            )
        else:
            await decrypt_with(
                moto_kms_keyring(moto_kms, missing, session=session, check_keys=False), blob
            )
    except BaseException as exc:  # whatever the type: this test is about the text
        caught: BaseException = exc
    else:
        pytest.fail("the keyring with a missing key did not fail")
    chain = list(exception_chain(caught))
    # It failed where intended: a library error naming the key, with KMS's error code.
    assert any(isinstance(e, EnvelopeError) and missing in str(e) for e in chain)
    assert any("NotFoundException" in str(e) for e in chain)
    for err in chain:
        for text in (str(err), repr(err), str(err.args)):
            assert ACCESS_KEY not in text
            assert SECRET_KEY not in text
