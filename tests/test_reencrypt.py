"""Key rotation through the public API: ``reencrypt``, ``reencrypt_stream`` and
``reencrypt_file`` (and the operator's scan with ``inspect``).

Rotation is re-encryption: the old message is decrypted and verified to its end
(every frame, the signature) with the client's keyring, then sealed again as a new
message with a new message ID, a data key from ``to_keyring`` (through that target's
own data-key cache) and new frames. (Header-only rewrap, which re-tagged a new header
under the old key and the fixed zero IV, is gone: see test_nonce_reuse_attack.py.)
Each case checks the result opens under the new keys only, and the ESDK reads it too.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aioboto3
import anyio
import anyio.lowlevel
import aws_encryption_sdk
import pytest
from aws_encryption_sdk.exceptions import DecryptKeyError
from cryptography.hazmat.primitives.asymmetric import rsa
from esdk_peer import (
    RsaWrapping,
    esdk_decrypt,
    esdk_encrypt,
    peer_keys,
    raw_aes_key,
    raw_rsa_key,
)
from kms_server import KmsKey, MotoKms
from tracking_session import TrackingSession

import aioenvelope
from aioenvelope import (
    AlgorithmSuite,
    CommitmentPolicy,
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    Keyring,
    KmsKeyring,
    MessageHeader,
    MultiKeyring,
    RawAesKeyring,
    RawRsaKeyring,
    ReencryptingStream,
    errors,
    run_batch,
)
from aioenvelope.client import DEFAULT_FRAME_LENGTH
from aioenvelope.format import ParsedHeader, parse_header
from aioenvelope.runtime import Runtime

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
COMMIT_SIGN = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
CONTEXT = {"tenant": "t-42", "purpose": "rotation", "schlüssel": "wert ✓"}
NAMESPACE = "aioenvelope-reencrypt"
PLAINTEXT = bytes(range(256)) * 5 + b"tail"  # several 64-byte frames, the last partial
KMS_PROVIDER_ID = "aws-kms"
LEGACY_UNSIGNED = [
    pytest.param(suite, id=f"0x{suite.suite_id:04x}")
    for suite in AlgorithmSuite
    if not suite.committing and not suite.signing
]
LEGACY_SIGNED = [
    pytest.param(suite, id=f"0x{suite.suite_id:04x}")
    for suite in AlgorithmSuite
    if not suite.committing and suite.signing
]


# -- helpers -----------------------------------------------------------------------------


def parsed(message: bytes) -> ParsedHeader:
    return parse_header(message, max_encrypted_data_keys=0xFFFF)


def body(message: bytes) -> bytes:
    """Everything after the header."""
    return message[parsed(message).length :]


def edk_arns(header: MessageHeader) -> set[str]:
    assert {edk.provider_id for edk in header.encrypted_data_keys} == {KMS_PROVIDER_ID}
    return {edk.provider_info.decode() for edk in header.encrypted_data_keys}


def flip(message: bytes, offset: int) -> bytes:
    mutated = bytearray(message)
    mutated[offset] ^= 0x01
    return bytes(mutated)


class AesKey:
    """A raw AES wrapping key as our keyring and as the ESDK's master key."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = os.urandom(32)

    def keyring(self) -> RawAesKeyring:
        return RawAesKeyring(NAMESPACE, self.name, self.key)

    def peer(self) -> Any:
        return peer_keys(raw_aes_key(NAMESPACE, self.name, self.key))


class XorKeyring(Keyring):
    """A test keyring: the EDK is the data key XOR a pad made from the keyring's name.
    Counts its lifecycle calls and every wrap (``on_encrypt``) and unwrap."""

    PROVIDER_ID = "test-xor"

    def __init__(self, name: str, *, open_delay: float = 0.0) -> None:
        self.name = name
        self._pad = hashlib.sha512(name.encode()).digest()
        self._open_delay = open_delay
        self.attached = 0
        self.opened = 0
        self.closed = 0
        self.wrapped = 0
        self.unwrapped = 0

    def __repr__(self) -> str:
        return f"XorKeyring({self.name!r})"

    def _xor(self, key: bytes) -> bytes:
        return bytes(a ^ b for a, b in zip(key, self._pad[: len(key)], strict=True))

    def attach(self, runtime: Runtime) -> None:
        self.attached += 1

    async def open(self) -> None:
        self.opened += 1
        await anyio.sleep(self._open_delay)

    async def close(self) -> None:
        self.closed += 1

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        self.wrapped += 1
        if materials.plaintext_data_key is None:
            materials = materials.generate_data_key()
        assert materials.plaintext_data_key is not None
        edk = EncryptedDataKey(
            self.PROVIDER_ID, self.name.encode(), self._xor(materials.plaintext_data_key)
        )
        return materials.with_encrypted_data_key(edk)

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        for edk in encrypted_data_keys:
            if edk.provider_id == self.PROVIDER_ID and edk.provider_info == self.name.encode():
                self.unwrapped += 1
                return materials.with_data_key(self._xor(edk.ciphertext))
        raise errors.NoUsableKeyError(f"{self!r} found no EDK of its own")


async def drain(stream: ReencryptingStream, into: list[bytes]) -> None:
    """Read ``stream`` to the end (closing it), collecting what it yields."""
    async with stream:
        async for chunk in stream:
            into.append(chunk)


async def encrypt_with(
    keyring: Keyring,
    plaintext: bytes = PLAINTEXT,
    *,
    context: Mapping[str, str] = CONTEXT,
    **kwargs: Any,
) -> bytes:
    async with EnvelopeClient(keyring, frame_length=64) as client:
        return await client.encrypt(plaintext, encryption_context=context, **kwargs)


async def decrypt_with(
    keyring: Keyring, message: bytes, context: Mapping[str, str] | None = None
) -> bytes:
    async with EnvelopeClient(keyring) as client:
        return await client.decrypt(message, encryption_context=context)


async def assert_refused_by(
    keyring: Keyring, message: bytes, context: Mapping[str, str] | None = None
) -> None:
    with pytest.raises(errors.EnvelopeError):
        await decrypt_with(keyring, message, context)


def esdk_decrypt_allowing_legacy(keys: Any, message: bytes) -> bytes:
    """The ESDK with the policy that reads non-committing (v1) messages."""
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=aws_encryption_sdk.CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
    )
    plaintext, _ = client.decrypt(source=message, key_provider=keys)
    return bytes(plaintext)


# -- KMS fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(moto_kms: MotoKms) -> Any:
    """One aioboto3 session for the module's KMS keyrings (a fresh one per keyring
    reloads botocore's models); made under moto_kms's dummy credentials."""
    return aioboto3.Session()


@pytest.fixture
def kms(moto_kms: MotoKms, session: Any) -> Any:
    """``kms(key, ...)``: a KmsKeyring on ``key`` talking to the moto server."""

    def make(key: KmsKey, **kwargs: Any) -> KmsKeyring:
        kwargs.setdefault("session", session)
        return KmsKeyring(
            key.arn, endpoint_url=moto_kms.endpoint_url, region_name=moto_kms.region, **kwargs
        )

    return make


@pytest.fixture
def esdk_kms(moto_kms: MotoKms, monkeypatch: pytest.MonkeyPatch) -> MotoKms:
    """Point the ESDK's own boto3 KMS clients at moto (see test_kms_interop.py)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_kms.endpoint_url)
    return moto_kms


# ---------------------------------------------------------------------------------------
# 1. Acceptance: KMS key A to KMS key B, on moto
# ---------------------------------------------------------------------------------------


async def test_kms_reencrypt_moves_a_message_from_key_a_to_key_b(
    kms: Any, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    key_a, key_b = kms(kms_key), kms(kms_key_2)
    async with EnvelopeClient(key_a, frame_length=64) as client:
        old = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        calls_before = dict(key_a.kms_calls)
        new = await client.reencrypt(old, to_keyring=key_b, encryption_context=CONTEXT)

        # One Decrypt under A, one GenerateDataKey under B, nothing else (B's
        # DescribeKey is its start-up check when it is opened on first use).
        assert key_a.kms_calls == {**calls_before, "Decrypt": 1}
        assert "Encrypt" not in key_a.kms_calls
        assert key_b.kms_calls == {"DescribeKey": 1, "GenerateDataKey": 1}
        # to_keyring reports to this client's counters too.
        assert client.stats.kms_calls["GenerateDataKey"] == 2  # A's for old, B's for new
        assert client.stats.kms_calls["Decrypt"] == 1

        # A second re-encryption of the same message: the old data key comes from the
        # decrypt cache, the new one from B's data-key cache (same context, same target):
        # no KMS call at all, yet a new message (new message ID, new frames).
        hits = client.stats.decrypt_cache_hits
        encrypt_hits = client.stats.encrypt_cache_hits
        again = await client.reencrypt(old, to_keyring=key_b)
        assert key_a.kms_calls == {**calls_before, "Decrypt": 1}
        assert key_b.kms_calls == {"DescribeKey": 1, "GenerateDataKey": 1}
        assert client.stats.decrypt_cache_hits == hits + 1
        assert client.stats.encrypt_cache_hits == encrypt_hits + 1

    old_header, new_header = aioenvelope.inspect(old), aioenvelope.inspect(new)
    again_header = aioenvelope.inspect(again)
    assert len({old_header.message_id, new_header.message_id, again_header.message_id}) == 3
    assert len(new_header.message_id) == 32
    assert body(new) != body(old)
    assert body(again) != body(new)
    assert new_header.algorithm_suite is old_header.algorithm_suite is COMMIT
    assert dict(new_header.encryption_context) == CONTEXT
    assert new_header.frame_length == 64
    assert edk_arns(old_header) == {kms_key.arn}
    assert edk_arns(new_header) == {kms_key_2.arn}
    # Both rotations of the message share B's cached data key; never A's.
    assert again_header.encrypted_data_keys == new_header.encrypted_data_keys
    assert set(new_header.encrypted_data_keys).isdisjoint(old_header.encrypted_data_keys)

    # The new message opens with B only, the old one (untouched) with A only.
    reader_b, reader_a = kms(kms_key_2), kms(kms_key)
    assert await decrypt_with(reader_b, new, CONTEXT) == PLAINTEXT
    assert await decrypt_with(kms(kms_key_2), again, CONTEXT) == PLAINTEXT
    with pytest.raises(errors.NoUsableKeyError):
        await decrypt_with(reader_a, new, CONTEXT)
    assert reader_a.kms_calls.get("Decrypt", 0) == 0  # no EDK names A: not even tried
    assert await decrypt_with(kms(kms_key), old, CONTEXT) == PLAINTEXT
    with pytest.raises(errors.NoUsableKeyError):
        await decrypt_with(kms(kms_key_2), old, CONTEXT)


ROWS = 50


async def rotate_rows(
    kms: Any, kms_key: KmsKey, kms_key_2: KmsKey, cache: aioenvelope.CacheConfig | None
) -> tuple[dict[str, int], dict[str, int], list[bytes]]:
    """Write ROWS rows with one context under A (default cache: one reused data key),
    then rotate them all to B, concurrently, with a client configured with ``cache``.
    Returns A's and B's KMS calls during the rotation, and the rotated rows."""
    async with EnvelopeClient(kms(kms_key), frame_length=64) as writer:
        rows = [
            await writer.encrypt(b"row %d" % i, encryption_context=CONTEXT) for i in range(ROWS)
        ]
        assert writer.stats.kms_calls["GenerateDataKey"] == 1
    key_a, key_b = kms(kms_key), kms(kms_key_2)
    async with EnvelopeClient(key_a, frame_length=64, cache=cache) as client:
        before = dict(key_a.kms_calls)
        results = await run_batch(
            rows, lambda m: client.reencrypt(m, to_keyring=key_b), concurrency=8
        )
        assert all(r.ok for r in results)
        rotated = [r.value for r in results if r.value is not None]
        calls_a = {
            k: v - before.get(k, 0) for k, v in key_a.kms_calls.items() if v != before.get(k)
        }
        calls_b = dict(key_b.kms_calls)
    assert len(rotated) == ROWS
    assert len({aioenvelope.inspect(m).message_id for m in rotated}) == ROWS
    for old, new in zip(rows, rotated, strict=True):
        assert aioenvelope.inspect(new).message_id != aioenvelope.inspect(old).message_id
        assert edk_arns(aioenvelope.inspect(new)) == {kms_key_2.arn}
    return calls_a, calls_b, rotated


async def test_rotating_fifty_rows_that_share_a_data_key_costs_one_decrypt_and_one_generate(
    kms: Any, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """A table written with a reused data key rotates with one Decrypt under A (the old
    data key is cached, concurrent misses coalesced) and one GenerateDataKey under B
    (B's data key is cached and shared by every new message), with re-encryptions
    running concurrently; the new messages share EDKs, so reading them back under B is
    one Decrypt too."""
    calls_a, calls_b, rotated = await rotate_rows(
        kms, kms_key, kms_key_2, aioenvelope.CacheConfig()
    )
    assert calls_a == {"Decrypt": 1}
    assert calls_b == {"DescribeKey": 1, "GenerateDataKey": 1}
    assert len({aioenvelope.inspect(m).encrypted_data_keys for m in rotated}) == 1
    reader = kms(kms_key_2)
    async with EnvelopeClient(reader) as client_b:
        for i, message in enumerate(rotated):
            assert await client_b.decrypt(message, encryption_context=CONTEXT) == b"row %d" % i
    assert reader.kms_calls.get("Decrypt", 0) == 1


async def test_without_data_key_reuse_every_reencryption_generates_its_own_data_key(
    kms: Any, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """``reuse_data_keys=False`` asks for a KMS call per written message (a per-object
    audit trail): re-encryption honours it (one GenerateDataKey under B per message),
    while the old data key is still read once (decryption stays cached)."""
    config = aioenvelope.CacheConfig(reuse_data_keys=False)
    calls_a, calls_b, rotated = await rotate_rows(kms, kms_key, kms_key_2, config)
    assert calls_a == {"Decrypt": 1}
    assert calls_b == {"DescribeKey": 1, "GenerateDataKey": ROWS}
    assert len({aioenvelope.inspect(m).encrypted_data_keys for m in rotated}) == ROWS


async def test_without_a_cache_every_reencryption_costs_a_decrypt_and_a_generate(
    kms: Any, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    calls_a, calls_b, rotated = await rotate_rows(kms, kms_key, kms_key_2, None)
    assert calls_a == {"Decrypt": ROWS}
    assert calls_b == {"DescribeKey": 1, "GenerateDataKey": ROWS}
    assert len({aioenvelope.inspect(m).encrypted_data_keys for m in rotated}) == ROWS


async def test_data_keys_are_not_shared_between_target_keyrings(
    kms: Any, kms_key: KmsKey, kms_key_2: KmsKey, moto_kms: MotoKms
) -> None:
    """Two targets with the same key name but different key material: each has a
    data-key cache of its own (keyed by the target keyring object, never its name)."""
    target_1 = RawAesKeyring(NAMESPACE, "same-name", os.urandom(32))
    target_2 = RawAesKeyring(NAMESPACE, "same-name", os.urandom(32))
    async with EnvelopeClient(kms(kms_key), frame_length=64) as client:
        old = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        one = await client.reencrypt(old, to_keyring=target_1)
        two = await client.reencrypt(old, to_keyring=target_2)
    assert set(aioenvelope.inspect(one).encrypted_data_keys).isdisjoint(
        aioenvelope.inspect(two).encrypted_data_keys
    )
    async with EnvelopeClient(target_2) as reader:
        assert await reader.decrypt(two) == PLAINTEXT
        with pytest.raises(errors.NoUsableKeyError):
            await reader.decrypt(one)


async def test_esdk_decrypts_a_kms_reencrypted_message_under_key_b_only(
    esdk_kms: MotoKms, kms: Any, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    async with EnvelopeClient(kms(kms_key), frame_length=64) as client:
        old = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        new = await client.reencrypt(old, to_keyring=kms(kms_key_2))
    provider_b = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[kms_key_2.arn])
    plaintext, peer_header = esdk_decrypt(provider_b, new)
    assert plaintext == PLAINTEXT
    assert peer_header.message_id == aioenvelope.inspect(new).message_id
    assert peer_header.message_id != aioenvelope.inspect(old).message_id
    assert peer_header.encryption_context == CONTEXT
    provider_a = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[kms_key.arn])
    with pytest.raises(DecryptKeyError):
        esdk_decrypt(provider_a, new)


async def test_kms_signed_message_reencrypts_to_a_signed_committing_message(
    esdk_kms: MotoKms, kms: Any, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """Signed messages are no longer refused: the old signature is verified, the new
    message is signed with a fresh key, and the ESDK reads it under B."""
    key_a, key_b = kms(kms_key), kms(kms_key_2)
    async with EnvelopeClient(key_a) as client:
        signed = await client.encrypt(
            PLAINTEXT, algorithm_suite=COMMIT_SIGN, encryption_context=CONTEXT
        )
        new = await client.reencrypt(signed, to_keyring=key_b)
        assert key_a.kms_calls["Decrypt"] == 1
        assert key_b.kms_calls == {"DescribeKey": 1, "GenerateDataKey": 1}
    header = aioenvelope.inspect(new)
    assert header.algorithm_suite is COMMIT_SIGN
    assert edk_arns(header) == {kms_key_2.arn}
    public_key = "aws-crypto-public-key"
    assert (
        header.encryption_context[public_key]
        != (aioenvelope.inspect(signed).encryption_context[public_key])
    )
    assert await decrypt_with(kms(kms_key_2), new, CONTEXT) == PLAINTEXT
    provider_b = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[kms_key_2.arn])
    assert esdk_decrypt(provider_b, new)[0] == PLAINTEXT


# ---------------------------------------------------------------------------------------
# 2. Raw keys: AES, RSA, multi-keyrings, legacy ESDK messages, frame lengths and sizes
# ---------------------------------------------------------------------------------------

SIZES = [pytest.param(0, id="empty"), pytest.param(1, id="one-byte"), "frames"]


@pytest.mark.parametrize("frame_length", [1, 64, 4096])
@pytest.mark.parametrize("size", SIZES)
async def test_aes_to_aes_reencrypt_at_frame_lengths_and_sizes(
    frame_length: int, size: int | str
) -> None:
    n = 3 * frame_length + 7 if size == "frames" else int(size)
    plaintext = os.urandom(n)
    key_a, key_b = AesKey("a"), AesKey("b")
    async with EnvelopeClient(key_a.keyring(), frame_length=frame_length) as client:
        old = await client.encrypt(plaintext, encryption_context=CONTEXT)
        new = await client.reencrypt(old, to_keyring=key_b.keyring())
    assert body(new) != body(old)
    assert aioenvelope.inspect(new).message_id != aioenvelope.inspect(old).message_id
    assert aioenvelope.inspect(new).frame_length == frame_length
    assert await decrypt_with(key_b.keyring(), new, CONTEXT) == plaintext
    await assert_refused_by(key_a.keyring(), new)
    assert await decrypt_with(key_a.keyring(), old, CONTEXT) == plaintext
    got, peer_header = esdk_decrypt(key_b.peer(), new)
    assert got == plaintext
    assert peer_header.encryption_context == CONTEXT


async def test_reencrypt_takes_the_frame_length_asked_for_not_the_old_ones() -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    old = await encrypt_with(key_a.keyring())  # 64-byte frames
    async with EnvelopeClient(key_a.keyring(), frame_length=4096) as client:
        default = await client.reencrypt(old, to_keyring=key_b.keyring())
        chosen = await client.reencrypt(old, to_keyring=key_b.keyring(), frame_length=100)
        with pytest.raises(errors.ConfigurationError, match="frame_length"):
            await client.reencrypt(old, to_keyring=key_b.keyring(), frame_length=0)
    assert aioenvelope.inspect(default).frame_length == 4096
    assert aioenvelope.inspect(chosen).frame_length == 100
    for new in (default, chosen):
        assert await decrypt_with(key_b.keyring(), new, CONTEXT) == PLAINTEXT


async def test_aes_to_rsa_reencrypt(rsa_private_key: rsa.RSAPrivateKey) -> None:
    wrapping = RsaWrapping.OAEP_SHA256
    rsa_keyring = RawRsaKeyring(
        NAMESPACE, "rsa", private_key=rsa_private_key, padding=wrapping.padding()
    )
    key_a = AesKey("a")
    old = await encrypt_with(key_a.keyring())
    async with EnvelopeClient(key_a.keyring()) as client:
        # Wrapping (and generating the new data key) needs only the public half.
        public_only = RawRsaKeyring(
            NAMESPACE, "rsa", public_key=rsa_private_key.public_key(), padding=wrapping.padding()
        )
        new = await client.reencrypt(old, to_keyring=public_only)
    assert body(new) != body(old)
    (edk,) = aioenvelope.inspect(new).encrypted_data_keys
    assert edk.provider_id == NAMESPACE
    assert await decrypt_with(rsa_keyring, new, CONTEXT) == PLAINTEXT
    await assert_refused_by(key_a.keyring(), new)
    peer = peer_keys(raw_rsa_key(NAMESPACE, "rsa", wrapping, private_key=rsa_private_key))
    assert esdk_decrypt(peer, new)[0] == PLAINTEXT


async def test_aes_to_multi_keyring_reencrypt_opens_with_each_member(
    rsa_private_key: rsa.RSAPrivateKey,
) -> None:
    """The target's generator makes the new data key, every member wraps it; each
    alone can decrypt."""
    key_a, key_b = AesKey("a"), AesKey("b")
    padding = RsaWrapping.OAEP_SHA1.padding()
    rsa_keyring = RawRsaKeyring(NAMESPACE, "rsa", private_key=rsa_private_key, padding=padding)
    target = MultiKeyring(key_b.keyring(), [rsa_keyring])
    old = await encrypt_with(key_a.keyring())
    async with EnvelopeClient(key_a.keyring()) as client:
        new = await client.reencrypt(old, to_keyring=target)
    header = aioenvelope.inspect(new)
    assert [edk.provider_id for edk in header.encrypted_data_keys] == [NAMESPACE, NAMESPACE]
    assert body(new) != body(old)
    assert await decrypt_with(key_b.keyring(), new, CONTEXT) == PLAINTEXT
    assert await decrypt_with(rsa_keyring, new, CONTEXT) == PLAINTEXT
    await assert_refused_by(key_a.keyring(), new)


async def test_reencrypt_to_a_multi_keyring_without_a_generator_is_refused(
    rsa_private_key: rsa.RSAPrivateKey, tmp_path: Any
) -> None:
    """Re-encryption needs a new data key, so the target must be able to make one:
    a children-only multi-keyring is refused (it could wrap the old data key, but
    rotation never reuses it), and nothing is written."""
    key_a, key_b = AesKey("a"), AesKey("b")
    padding = RsaWrapping.OAEP_SHA1.padding()
    rsa_keyring = RawRsaKeyring(NAMESPACE, "rsa", private_key=rsa_private_key, padding=padding)
    target = MultiKeyring(children=[key_b.keyring(), rsa_keyring])
    old = await encrypt_with(key_a.keyring())
    (tmp_path / "c").write_bytes(old)
    async with EnvelopeClient(key_a.keyring()) as client:
        with pytest.raises(errors.KeyringError, match="generator"):
            await client.reencrypt(old, to_keyring=target)
        produced: list[bytes] = []
        with pytest.raises(errors.KeyringError, match="generator"):
            await drain(client.reencrypt_stream(old, to_keyring=target), produced)
        assert produced == []
        with pytest.raises(errors.KeyringError, match="generator"):
            await client.reencrypt_file(tmp_path / "c", tmp_path / "r", to_keyring=target)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


async def test_reencrypt_to_a_keyring_making_too_many_edks_is_refused() -> None:
    key_a = AesKey("a")
    target = MultiKeyring(AesKey("w").keyring(), [AesKey(name).keyring() for name in "xyz"])
    old = await encrypt_with(key_a.keyring())
    async with EnvelopeClient(key_a.keyring(), max_encrypted_data_keys=2) as client:
        with pytest.raises(errors.MessageLimitError):
            await client.reencrypt(old, to_keyring=target)


async def test_a_message_with_more_edks_than_the_client_accepts_is_refused() -> None:
    keys = [AesKey(name) for name in "abc"]
    old = await encrypt_with(MultiKeyring(keys[0].keyring(), [k.keyring() for k in keys[1:]]))
    target = XorKeyring("t")
    async with EnvelopeClient(keys[0].keyring(), max_encrypted_data_keys=2) as client:
        with pytest.raises(errors.MessageLimitError):
            await client.reencrypt(old, to_keyring=target)
    assert (target.opened, target.wrapped) == (0, 0)


async def test_reencrypt_to_the_clients_own_keyring_keeps_the_message_readable() -> None:
    key_a = AesKey("a")
    own = key_a.keyring()
    old = await encrypt_with(own)
    async with EnvelopeClient(own) as client:
        new = await client.reencrypt(old, to_keyring=own)
        assert await client.decrypt(new) == PLAINTEXT
    assert body(new) != body(old)
    assert aioenvelope.inspect(new).message_id != aioenvelope.inspect(old).message_id
    assert set(aioenvelope.inspect(new).encrypted_data_keys).isdisjoint(
        aioenvelope.inspect(old).encrypted_data_keys
    )


@pytest.mark.parametrize("frame_length", [pytest.param(128, id="framed"), 0])
@pytest.mark.parametrize("suite", LEGACY_UNSIGNED)
async def test_legacy_esdk_messages_reencrypt_to_the_committing_suite_and_the_esdk_reads_them(
    suite: AlgorithmSuite, frame_length: int
) -> None:
    """v1 messages of every non-signing legacy suite (16-byte message IDs, header IV,
    identity and HKDF-SHA256 KDFs, non-framed bodies) written by the ESDK re-encrypt,
    under a client that allows legacy decryption, into committing v2 messages, which the
    ESDK (with its default, committing policy) reads with B only."""
    key_a, key_b = AesKey("a"), AesKey("b")
    plaintext = os.urandom(2 * 128 + 44)
    old, _ = esdk_encrypt(
        key_a.peer(),
        plaintext,
        suite_id=suite.suite_id,
        encryption_context=CONTEXT,
        frame_length=frame_length,
    )
    async with EnvelopeClient(
        key_a.keyring(), commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
    ) as client:
        new = await client.reencrypt(old, to_keyring=key_b.keyring(), encryption_context=CONTEXT)
    old_header, new_header = aioenvelope.inspect(old), aioenvelope.inspect(new)
    assert old_header.version == 1
    assert new_header.version == 2
    assert new_header.algorithm_suite is COMMIT
    assert len(new_header.message_id) == 32
    assert new_header.frame_length == DEFAULT_FRAME_LENGTH  # framed, whatever the old was
    assert dict(new_header.encryption_context) == CONTEXT
    assert esdk_decrypt(key_b.peer(), new)[0] == plaintext
    with pytest.raises(DecryptKeyError):
        esdk_decrypt(key_a.peer(), new)
    async with EnvelopeClient(key_b.keyring()) as reader:  # the default, committing policy
        assert await reader.decrypt(new, encryption_context=CONTEXT) == plaintext


@pytest.mark.parametrize("suite", LEGACY_SIGNED)
async def test_legacy_signed_messages_reencrypt_to_the_signed_committing_suite(
    suite: AlgorithmSuite,
) -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    old, _ = esdk_encrypt(
        key_a.peer(), b"signed", suite_id=suite.suite_id, encryption_context={}, frame_length=128
    )
    async with EnvelopeClient(
        key_a.keyring(), commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
    ) as client:
        new = await client.reencrypt(old, to_keyring=key_b.keyring())
    header = aioenvelope.inspect(new)
    assert (header.version, header.algorithm_suite) == (2, COMMIT_SIGN)
    assert esdk_decrypt(key_b.peer(), new)[0] == b"signed"
    assert await decrypt_with(key_b.keyring(), new) == b"signed"


async def test_default_policy_refuses_to_reencrypt_legacy_messages() -> None:
    key_a = AesKey("a")
    target = XorKeyring("b")
    old, _ = esdk_encrypt(
        key_a.peer(),
        b"legacy",
        suite_id=AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA256.suite_id,
        encryption_context={},
        frame_length=128,
    )
    async with EnvelopeClient(key_a.keyring()) as client:
        with pytest.raises(errors.CommitmentPolicyError):
            await client.reencrypt(old, to_keyring=target)
    assert target.wrapped == 0


async def test_legacy_client_fixture_reencrypts_its_own_v2_messages(
    legacy_client: EnvelopeClient,
) -> None:
    """The legacy-reading client still writes committing v2 messages and rotates them."""
    key_b = AesKey("b")
    old = await legacy_client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    new = await legacy_client.reencrypt(old, to_keyring=key_b.keyring())
    assert aioenvelope.inspect(new).version == 2
    assert aioenvelope.inspect(new).algorithm_suite is COMMIT
    assert esdk_decrypt(key_b.peer(), new)[0] == PLAINTEXT


# ---------------------------------------------------------------------------------------
# 3. Rotation as an operator runs it
# ---------------------------------------------------------------------------------------


async def test_operator_scan_finds_exactly_the_messages_still_under_key_a(
    kms: Any, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """Rotation as an operator runs it: re-encrypt part of a table, then scan every object's
    header (no key, no KMS call) for those still wrapped under the old key."""
    key_a, key_b = kms(kms_key), kms(kms_key_2)
    rotated = {1, 4, 5, 9, 13, 18}
    async with EnvelopeClient(key_a, frame_length=64) as client:
        table = [
            await client.encrypt(b"row %d" % i, encryption_context={"row": str(i)})
            for i in range(20)
        ]

        async def rotate(i: int) -> bytes:
            return await client.reencrypt(table[i], to_keyring=key_b)

        results = await run_batch(sorted(rotated), rotate, concurrency=4)
        assert all(r.ok for r in results)
        for result in results:
            assert result.value is not None
            table[result.item] = result.value

        calls_a, calls_b = dict(key_a.kms_calls), dict(key_b.kms_calls)
        still_under_a = {
            i
            for i, blob in enumerate(table)
            if kms_key.arn.encode()
            in {edk.provider_info for edk in aioenvelope.inspect(blob).encrypted_data_keys}
        }
        assert (key_a.kms_calls, key_b.kms_calls) == (calls_a, calls_b)
    assert still_under_a == set(range(20)) - rotated
    for i in rotated:
        assert await decrypt_with(kms(kms_key_2), table[i]) == b"row %d" % i


# ---------------------------------------------------------------------------------------
# 4. reencrypt_stream and reencrypt_file
# ---------------------------------------------------------------------------------------


def chunked(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    chunks, i = [], 0
    while i < len(data):
        n = rng.randint(1, largest)
        chunks.append(data[i : i + n])
        i += n
    return chunks


async def agen(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await anyio.lowlevel.checkpoint()
        yield chunk


class AsyncReader:
    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    async def read(self, n: int = -1) -> bytes:
        await anyio.lowlevel.checkpoint()
        return self._data.read(min(n, 7) if n > 0 else n)


async def test_reencrypt_stream_at_random_chunkings_gives_a_new_message_under_b() -> None:
    """Any way of feeding the old message gives a complete new message under B: new
    message ID each time, the header the stream reports, the same plaintext."""
    source, target = XorKeyring("a"), XorKeyring("b")
    plaintext = os.urandom(5_000)
    old = await encrypt_with(source, plaintext)
    rng = random.Random(1234)
    message_ids = {aioenvelope.inspect(old).message_id}
    async with EnvelopeClient(source, frame_length=300) as client:
        sources: list[Any] = [old, bytearray(old), memoryview(old), io.BytesIO(old)]
        sources.append(AsyncReader(old))
        for largest in (1, 3, 17, 100, 1000, len(old)):
            sources.append(chunked(old, rng, largest))
            sources.append(agen(chunked(old, rng, largest)))
            sources.append(iter(chunked(old, rng, largest)))
        for src in sources:
            stream = client.reencrypt_stream(src, to_keyring=target)
            assert stream.header is None
            async with stream:
                new = await stream.read_all()
            header = aioenvelope.inspect(new)
            assert stream.header == header
            assert header.frame_length == 300
            message_ids.add(header.message_id)
            assert await decrypt_with(XorKeyring("b"), new, CONTEXT) == plaintext
            await assert_refused_by(XorKeyring("a"), new)
    assert len(message_ids) == len(sources) + 1


async def test_reencrypt_stream_of_a_non_bytes_source_gets_a_fresh_data_key_each_time() -> None:
    """Without a known length, a stream may not take a cached data key (it could outgrow
    the key's byte limit): one wrap per stream. A bytes source may: one for all."""
    source, target = XorKeyring("a"), XorKeyring("b")
    old = await encrypt_with(source)
    async with EnvelopeClient(source) as client:
        chunked_runs = [
            await client.reencrypt_stream(iter([old]), to_keyring=target).read_all()
            for _ in range(3)
        ]
        assert target.wrapped == 3
        bytes_runs = [
            await client.reencrypt_stream(old, to_keyring=target).read_all() for _ in range(3)
        ]
        assert target.wrapped == 4
    assert len({aioenvelope.inspect(m).encrypted_data_keys for m in chunked_runs}) == 3
    assert len({aioenvelope.inspect(m).encrypted_data_keys for m in bytes_runs}) == 1


async def test_reencrypt_stream_reads_its_source_lazily() -> None:
    """The source is read only as fast as the output is consumed (constant memory):
    the first output chunk comes after the first source piece, not the whole message."""
    source, target = XorKeyring("a"), XorKeyring("b")
    plaintext = os.urandom(200_000)
    old = await encrypt_with(source, plaintext)
    pieces = chunked(old, random.Random(7), 4096)
    pulled = 0

    async def counting() -> AsyncIterator[bytes]:
        nonlocal pulled
        for piece in pieces:
            pulled += 1
            yield piece

    async with EnvelopeClient(source, frame_length=4096) as client:
        stream = client.reencrypt_stream(counting(), to_keyring=target)
        async with stream:
            iterator = aiter(stream)
            first = await anext(iterator)
            # The new header comes first and alone, once the old header is authenticated
            # (the first piece holds it), before any frame of the old body was read.
            assert parsed(first).length == len(first)
            assert pulled <= 2
            rest = [chunk async for chunk in iterator]
    assert pulled == len(pieces)
    new = first + b"".join(rest)
    assert await decrypt_with(XorKeyring("b"), new) == plaintext


class ClosableChunks:
    """An async iterator of chunks that records when it is closed."""

    def __init__(self, data: bytes) -> None:
        self._chunks = iter([data[i : i + 100] for i in range(0, len(data), 100)])
        self.closed = False

    def __aiter__(self) -> ClosableChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.closed = True


async def test_reencrypt_stream_closed_early_closes_its_source() -> None:
    source = XorKeyring("a")
    old = await encrypt_with(source)
    unread, partly = ClosableChunks(old), ClosableChunks(old)
    async with EnvelopeClient(source) as client:
        async with client.reencrypt_stream(unread, to_keyring=XorKeyring("b")):
            pass
        async with client.reencrypt_stream(partly, to_keyring=XorKeyring("b")) as stream:
            await anext(aiter(stream))
    assert unread.closed
    assert partly.closed


async def test_reencrypt_of_a_truncated_header_raises_truncated() -> None:
    source, target = XorKeyring("a"), XorKeyring("b")
    old = await encrypt_with(source)
    length = parsed(old).length
    async with EnvelopeClient(source) as client:
        for cut in [*range(0, length, 13), length - 1]:
            for src in (old[:cut], chunked(old[:cut], random.Random(cut), 5)):
                produced: list[bytes] = []
                with pytest.raises(errors.TruncatedMessageError):
                    await drain(client.reencrypt_stream(src, to_keyring=target), produced)
                assert produced == []
            with pytest.raises(errors.TruncatedMessageError):
                await client.reencrypt(old[:cut], to_keyring=target)
    assert source.unwrapped == 0  # nothing was unwrapped for a header that never ended
    assert (target.opened, target.wrapped) == (0, 0)


def footer_length(signed: bytes) -> int:
    """The length of a signed message's footer: a 2-byte length and a DER signature."""
    (length,) = [n for n in range(64, 110) if int.from_bytes(signed[-n - 2 : -n], "big") == n]
    return length + 2


def body_damage(old: bytes, damage: str) -> bytes:
    """The signed message ``old`` (64-byte frames) cut or changed after its header:
    mid-body, just before the signature, inside the signature; one byte flipped in a
    middle frame, in the final frame, in the signature; a byte after the message."""
    header_length, footer = parsed(old).length, footer_length(old)
    return {
        "cut-mid-body": lambda: old[: header_length + 400],
        "cut-before-signature": lambda: old[:-footer],
        "cut-in-signature": lambda: old[:-10],
        "flip-middle-frame": lambda: flip(old, header_length + 3 * 96 + 16 + 10),
        "flip-final-frame": lambda: flip(old, len(old) - footer - 20),
        "flip-signature": lambda: flip(old, len(old) - 5),
        "trailing-byte": lambda: old + b"\x00",
    }[damage]()


BODY_DAMAGE = [
    "cut-mid-body",
    "cut-before-signature",
    "cut-in-signature",
    "flip-middle-frame",
    "flip-final-frame",
    "flip-signature",
    "trailing-byte",
]


async def signed_old(source: Keyring) -> bytes:
    """A signed message of 2,000 bytes in 64-byte frames."""
    return await encrypt_with(source, os.urandom(2_000), algorithm_suite=COMMIT_SIGN)


@pytest.mark.parametrize("damage", BODY_DAMAGE)
async def test_reencrypt_of_a_damaged_body_raises_and_produces_nothing(
    damage: str, tmp_path: Any
) -> None:
    """The old message is verified to its end before the new one is complete: a cut or
    changed body (or signature, or bytes after the message) makes ``reencrypt`` raise,
    and ``reencrypt_file`` leave no output."""
    source, target = XorKeyring("a"), XorKeyring("b")
    damaged = body_damage(await signed_old(source), damage)
    (tmp_path / "c").write_bytes(damaged)
    async with EnvelopeClient(source, frame_length=64) as client:
        with pytest.raises(errors.EnvelopeError) as raised:
            await client.reencrypt(damaged, to_keyring=target)
        with pytest.raises(type(raised.value)):
            await client.reencrypt_file(tmp_path / "c", tmp_path / "r", to_keyring=target)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no destination, no temporary
    if damage.startswith("cut"):
        assert isinstance(raised.value, errors.TruncatedMessageError)
    elif damage.startswith("flip"):
        assert isinstance(raised.value, errors.AuthenticationError)


@pytest.mark.parametrize("damage", BODY_DAMAGE)
async def test_reencrypt_stream_of_a_damaged_body_never_yields_the_final_frame(
    damage: str,
) -> None:
    """``reencrypt_stream`` releases new frames before the old message is verified to
    its end (that is what streaming is for), but never the new message's final frame:
    whatever it yielded before it raised is a message every reader refuses as
    truncated. Fed in 200-byte chunks, so frames do come out before the damage."""
    source, target = XorKeyring("a"), XorKeyring("b")
    damaged = body_damage(await signed_old(source), damage)
    async with EnvelopeClient(source, frame_length=64) as client:
        for feed in (damaged, chunked(damaged, random.Random(5), 200)):
            produced: list[bytes] = []
            with pytest.raises(errors.EnvelopeError):
                await drain(client.reencrypt_stream(feed, to_keyring=target), produced)
            partial = b"".join(produced)
            if isinstance(feed, list):
                # New frames did come out (4 + 12 + 64 + 16 bytes each) ...
                assert len(partial) >= parsed(partial).length + 96
            if not partial:
                continue
            # ... but no reader takes them for a whole message.
            with pytest.raises(errors.TruncatedMessageError):
                await decrypt_with(XorKeyring("b"), partial)
            async with EnvelopeClient(XorKeyring("b")) as reader:
                with pytest.raises(errors.TruncatedMessageError):
                    await reader.decrypt_stream(partial).read_all()


async def test_reencrypt_file_round_trip(tmp_path: Any) -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    plain, sealed, rotated, opened = (tmp_path / n for n in ("p", "c", "r", "o"))
    plain.write_bytes(os.urandom(70_000))
    async with EnvelopeClient(key_a.keyring(), frame_length=4096) as client:
        await client.encrypt_file(plain, sealed, encryption_context=CONTEXT)
        header = await client.reencrypt_file(sealed, rotated, to_keyring=key_b.keyring())
    assert header == aioenvelope.inspect(rotated.read_bytes())
    assert header.message_id != aioenvelope.inspect(sealed.read_bytes()).message_id
    assert header.frame_length == 4096
    assert dict(header.encryption_context) == CONTEXT
    assert body(rotated.read_bytes()) != body(sealed.read_bytes())
    assert rotated.stat().st_mode & 0o777 == 0o600
    async with EnvelopeClient(key_b.keyring()) as reader:
        await reader.decrypt_file(rotated, opened, encryption_context=CONTEXT)
    assert opened.read_bytes() == plain.read_bytes()
    await assert_refused_by(key_a.keyring(), rotated.read_bytes())
    assert esdk_decrypt(key_b.peer(), rotated.read_bytes())[0] == plain.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "o", "p", "r"]


async def test_reencrypt_file_keeps_an_existing_destination_unless_overwrite(
    tmp_path: Any,
) -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    sealed, dest = tmp_path / "c", tmp_path / "r"
    sealed.write_bytes(await encrypt_with(key_a.keyring()))
    dest.write_bytes(b"precious")
    async with EnvelopeClient(key_a.keyring()) as client:
        with pytest.raises(errors.ConfigurationError, match="already exists"):
            await client.reencrypt_file(sealed, dest, to_keyring=key_b.keyring())
        assert dest.read_bytes() == b"precious"
        await client.reencrypt_file(sealed, dest, to_keyring=key_b.keyring(), overwrite=True)
    assert await decrypt_with(key_b.keyring(), dest.read_bytes()) == PLAINTEXT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "r"]


async def test_reencrypt_file_of_a_tampered_header_leaves_no_output(tmp_path: Any) -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    old = await encrypt_with(MultiKeyring(key_a.keyring(), [key_b.keyring()]))
    other_edk = aioenvelope.inspect(old).encrypted_data_keys[1].ciphertext
    sealed, dest = tmp_path / "c", tmp_path / "r"
    sealed.write_bytes(flip(old, old.index(other_edk) + 5))
    target = XorKeyring("c")
    async with EnvelopeClient(key_a.keyring()) as client:
        with pytest.raises(errors.AuthenticationError):
            await client.reencrypt_file(sealed, dest, to_keyring=target)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no destination, no .partial
    assert (target.opened, target.wrapped) == (0, 0)


# ---------------------------------------------------------------------------------------
# 5. Signed messages, reencrypt_stream, required encryption context
# ---------------------------------------------------------------------------------------


async def test_signed_messages_reencrypt_to_a_signed_committing_suite_through_every_api(
    tmp_path: Any,
) -> None:
    """Signed messages are no longer refused: the old signature is verified, and the new
    message is signed under a fresh key by ``reencrypt``, ``reencrypt_stream`` and
    ``reencrypt_file`` alike."""
    key_a, key_b = AesKey("a"), AesKey("b")
    signed = await encrypt_with(key_a.keyring(), algorithm_suite=COMMIT_SIGN)
    (tmp_path / "c").write_bytes(signed)
    async with EnvelopeClient(key_a.keyring()) as client:
        whole = await client.reencrypt(signed, to_keyring=key_b.keyring())
        streamed = await client.reencrypt_stream(
            chunked(signed, random.Random(2), 50), to_keyring=key_b.keyring()
        ).read_all()
        await client.reencrypt_file(tmp_path / "c", tmp_path / "r", to_keyring=key_b.keyring())
    public_key = "aws-crypto-public-key"
    old_key = aioenvelope.inspect(signed).encryption_context[public_key]
    new_keys = set()
    for new in (whole, streamed, (tmp_path / "r").read_bytes()):
        header = aioenvelope.inspect(new)
        assert header.algorithm_suite is COMMIT_SIGN
        new_keys.add(header.encryption_context[public_key])
        assert await decrypt_with(key_b.keyring(), new, CONTEXT) == PLAINTEXT
        await assert_refused_by(key_a.keyring(), new)
        assert esdk_decrypt(key_b.peer(), new)[0] == PLAINTEXT
    assert len(new_keys) == 3
    assert old_key not in new_keys


@pytest.mark.parametrize("suite", [COMMIT_SIGN, COMMIT], ids=["signed", "unsigned"])
async def test_reencrypt_stream_moves_a_message_to_the_new_keyring(
    suite: AlgorithmSuite,
) -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    old = await encrypt_with(key_a.keyring(), algorithm_suite=suite)
    async with EnvelopeClient(key_a.keyring(), frame_length=100) as client:
        stream = client.reencrypt_stream(old, to_keyring=key_b.keyring())
        async with stream:
            new = await stream.read_all()
    old_header, new_header = aioenvelope.inspect(old), aioenvelope.inspect(new)
    assert stream.header == new_header
    assert new_header.algorithm_suite is suite
    assert new_header.message_id != old_header.message_id  # a new data key and message ID
    assert new_header.frame_length == 100
    public_key = "aws-crypto-public-key"
    user = {k: v for k, v in new_header.encryption_context.items() if k != public_key}
    assert user == CONTEXT
    if suite.signing:
        # A fresh signing key: the old public key is not carried over.
        assert (
            new_header.encryption_context[public_key] != (old_header.encryption_context[public_key])
        )
    else:
        assert public_key not in new_header.encryption_context
    assert await decrypt_with(key_b.keyring(), new, CONTEXT) == PLAINTEXT
    await assert_refused_by(key_a.keyring(), new)
    assert esdk_decrypt(key_b.peer(), new)[0] == PLAINTEXT


async def test_reencrypt_stream_to_an_unsigned_suite_can_then_be_reencrypted() -> None:
    key_a, key_b, key_c = AesKey("a"), AesKey("b"), AesKey("c")
    signed = await encrypt_with(key_a.keyring(), algorithm_suite=COMMIT_SIGN)
    async with EnvelopeClient(key_a.keyring()) as client:
        unsigned = await client.reencrypt_stream(
            chunked(signed, random.Random(3), 50),
            to_keyring=key_b.keyring(),
            algorithm_suite=COMMIT,
        ).read_all()
    header = aioenvelope.inspect(unsigned)
    assert header.algorithm_suite is COMMIT
    assert dict(header.encryption_context) == CONTEXT
    async with EnvelopeClient(key_b.keyring()) as client:
        again = await client.reencrypt(unsigned, to_keyring=key_c.keyring())
    assert aioenvelope.inspect(again).algorithm_suite is COMMIT
    assert await decrypt_with(key_c.keyring(), again, CONTEXT) == PLAINTEXT


async def test_reencrypt_stream_moves_a_legacy_message_to_a_committing_suite() -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    suite = AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384
    old, _ = esdk_encrypt(
        key_a.peer(),
        PLAINTEXT,
        suite_id=suite.suite_id,
        encryption_context=CONTEXT,
        frame_length=128,
    )
    async with EnvelopeClient(
        key_a.keyring(), commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
    ) as client:
        # No suite named: the signed legacy suite becomes the signed committing one.
        upgraded = await client.reencrypt_stream(old, to_keyring=key_b.keyring()).read_all()
        chosen = await client.reencrypt_stream(
            old, to_keyring=key_b.keyring(), algorithm_suite=COMMIT
        ).read_all()
    assert aioenvelope.inspect(upgraded).algorithm_suite is COMMIT_SIGN
    assert aioenvelope.inspect(chosen).algorithm_suite is COMMIT
    for new in (upgraded, chosen):
        assert aioenvelope.inspect(new).version == 2
        assert esdk_decrypt(key_b.peer(), new)[0] == PLAINTEXT


async def test_reencrypt_stream_refuses_a_non_keyring_at_call_time(
    client: EnvelopeClient,
) -> None:
    """A wrong ``to_keyring`` is the caller's mistake, reported as a
    ConfigurationError when the stream is made (not an AttributeError mid-iteration)."""
    message = await client.encrypt(PLAINTEXT)
    with pytest.raises(errors.ConfigurationError, match="Keyring"):
        client.reencrypt_stream(message, to_keyring="not a keyring")  # type: ignore[arg-type]


async def test_required_context_must_be_given_to_reencrypt_and_stays_required() -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    full = {**CONTEXT, "secret": "s3"}
    old = await encrypt_with(
        key_a.keyring(), context=full, required_encryption_context_keys={"secret"}
    )
    assert "secret" not in aioenvelope.inspect(old).encryption_context
    async with EnvelopeClient(key_a.keyring()) as client:
        with pytest.raises(errors.EnvelopeError):
            await client.reencrypt(old, to_keyring=key_b.keyring())
        with pytest.raises(errors.EnvelopeError):
            await client.reencrypt(
                old, to_keyring=key_b.keyring(), encryption_context={"secret": "wrong"}
            )
        new = await client.reencrypt(
            old, to_keyring=key_b.keyring(), encryption_context={"secret": "s3"}
        )
    assert "secret" not in aioenvelope.inspect(new).encryption_context
    assert body(new) != body(old)
    assert await decrypt_with(key_b.keyring(), new, {"secret": "s3"}) == PLAINTEXT
    await assert_refused_by(key_b.keyring(), new)
    await assert_refused_by(key_b.keyring(), new, {"secret": "wrong"})


async def test_required_context_stays_required_through_reencrypt_stream() -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    full = {**CONTEXT, "secret": "s3"}
    old = await encrypt_with(
        key_a.keyring(),
        context=full,
        required_encryption_context_keys={"secret"},
        algorithm_suite=COMMIT_SIGN,
    )
    async with EnvelopeClient(key_a.keyring()) as client:
        new = await client.reencrypt_stream(
            old, to_keyring=key_b.keyring(), encryption_context={"secret": "s3"}
        ).read_all()
    header = aioenvelope.inspect(new)
    assert "secret" not in header.encryption_context
    assert {k: header.encryption_context[k] for k in CONTEXT} == CONTEXT
    assert await decrypt_with(key_b.keyring(), new, {"secret": "s3"}) == PLAINTEXT
    await assert_refused_by(key_b.keyring(), new)


async def test_wrong_encryption_context_is_a_mismatch(client: EnvelopeClient) -> None:
    message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    target = XorKeyring("b")
    with pytest.raises(errors.EncryptionContextMismatchError):
        await client.reencrypt(message, to_keyring=target, encryption_context={"tenant": "other"})
    with pytest.raises(errors.EncryptionContextMismatchError):
        await client.reencrypt_stream(
            message, to_keyring=target, encryption_context={"tenant": "other"}
        ).read_all()
    assert target.wrapped == 0
    # A subset of the stored pairs is fine.
    new = await client.reencrypt(message, to_keyring=target, encryption_context={"tenant": "t-42"})
    assert await decrypt_with(XorKeyring("b"), new, CONTEXT) == PLAINTEXT


# ---------------------------------------------------------------------------------------
# 6. Tampered headers
# ---------------------------------------------------------------------------------------

TAMPERED_FIELDS = [
    "message-id",
    "context",
    "own-edk",
    "other-edk",
    "frame-length",
    "commitment",
    "tag",
]


def tamper_offset(message: bytes, field: str) -> int:
    """One byte inside ``field`` of a v2 message with two EDKs."""
    header_parsed = parsed(message)
    header, header_body = header_parsed.header, header_parsed.body_bytes
    own, other = header.encrypted_data_keys
    suite_data = len(header.suite_data)
    return {
        "message-id": 3 + 7,
        "context": header_body.index("wert ✓".encode()),
        "own-edk": header_body.index(own.ciphertext) + 9,
        "other-edk": header_body.index(other.ciphertext) + 9,
        "frame-length": len(header_body) - suite_data - 1,
        "commitment": len(header_body) - 1,
        "tag": header_parsed.length - 1,
    }[field]


@pytest.mark.parametrize("field", TAMPERED_FIELDS)
async def test_tampered_header_is_refused_and_nothing_is_produced(
    field: str, tmp_path: Any
) -> None:
    """The old header is authenticated first, so a forged header produces nothing and
    costs no wrap under the new key (for KMS, a GenerateDataKey call and a CloudTrail
    entry for a message that is then refused): the target is not even opened."""
    key_a, key_b = AesKey("a"), AesKey("b")
    old = await encrypt_with(MultiKeyring(key_a.keyring(), [key_b.keyring()]))
    tampered = flip(old, tamper_offset(old, field))
    (tmp_path / "c").write_bytes(tampered)
    target = XorKeyring("c")
    async with EnvelopeClient(key_a.keyring()) as client:
        produced: list[bytes] = []
        with pytest.raises(errors.EnvelopeError) as info:
            await drain(client.reencrypt_stream(tampered, to_keyring=target), produced)
        assert produced == []
        with pytest.raises(type(info.value)):
            await client.reencrypt(tampered, to_keyring=target)
        with pytest.raises(type(info.value)):
            await client.reencrypt_file(tmp_path / "c", tmp_path / "r", to_keyring=target)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert (target.attached, target.opened, target.wrapped) == (0, 0, 0)
    if field in ("other-edk", "message-id", "frame-length", "commitment", "tag"):
        # The keyring unwraps fine; only the header check can catch these.
        assert isinstance(info.value, errors.AuthenticationError)


@pytest.mark.parametrize("field", ["other-edk", "tag"])
async def test_tampered_header_with_kms_makes_no_call_under_key_b(
    kms: Any, kms_key: KmsKey, kms_key_2: KmsKey, field: str
) -> None:
    key_a, key_b = kms(kms_key), kms(kms_key_2)
    extra = AesKey("x")
    old = await encrypt_with(MultiKeyring(key_a, [extra.keyring()]))
    tampered = flip(old, tamper_offset(old, field))
    async with EnvelopeClient(key_a) as client:
        with pytest.raises(errors.AuthenticationError):
            await client.reencrypt(tampered, to_keyring=key_b)
        with pytest.raises(errors.AuthenticationError):
            await client.reencrypt_stream(tampered, to_keyring=key_b).read_all()
        assert key_a.kms_calls["Decrypt"] == 1  # the old data key was read (and cached)
    assert key_b.kms_calls == {}  # not opened: no DescribeKey, GenerateDataKey or Encrypt


# ---------------------------------------------------------------------------------------
# 8. The target keyring's lifetime belongs to the client
# ---------------------------------------------------------------------------------------


async def test_to_keyring_is_opened_once_across_many_reencryptions_and_closed_on_exit() -> None:
    source = XorKeyring("a")
    target = XorKeyring("b", open_delay=0.01)  # concurrent first uses overlap its open()
    messages = [await encrypt_with(source, b"m%d" % i) for i in range(12)]
    source.closed = 0
    async with EnvelopeClient(source) as client:
        results: list[bytes] = [b""] * len(messages)

        async def one(i: int) -> None:
            results[i] = await client.reencrypt(messages[i], to_keyring=target)

        async with anyio.create_task_group() as tg:
            for i in range(len(messages)):
                tg.start_soon(one, i)
        for message in messages:
            await client.reencrypt(message, to_keyring=target)
        await client.reencrypt_stream(messages[0], to_keyring=target).read_all()
        assert (target.attached, target.opened, target.closed) == (1, 1, 0)
        # One context, so one data key of the target, made once (concurrent misses
        # coalesced) and reused by the other 24 messages; each old message had its own
        # data key: 12 unwraps, the second round from the decrypt cache.
        assert target.wrapped == 1
        assert source.unwrapped == len(messages)
    assert (target.attached, target.opened, target.closed) == (1, 1, 1)
    assert source.closed == 1
    for i, result in enumerate(results):
        assert await decrypt_with(XorKeyring("b"), result) == b"m%d" % i


async def test_own_keyring_as_target_is_neither_reopened_nor_closed_twice() -> None:
    own = XorKeyring("a")
    message = await encrypt_with(own)
    own.opened = own.closed = 0
    async with EnvelopeClient(own) as client:
        await client.reencrypt(message, to_keyring=own)
    assert (own.opened, own.closed) == (1, 1)


async def test_kms_to_keyring_client_is_opened_once_and_closed_when_the_client_exits(
    moto_kms: MotoKms, kms: Any, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    tracking = TrackingSession()
    key_a = kms(kms_key)
    key_b = kms(kms_key_2, session=tracking.session)
    async with EnvelopeClient(key_a, frame_length=64) as client:
        messages = [await client.encrypt(b"m%d" % i, encryption_context=CONTEXT) for i in range(5)]
        assert tracking.events == []  # not opened until first used
        for message in messages:
            await client.reencrypt(message, to_keyring=key_b)
        assert [kind for kind, _ in tracking.events] == ["open"]
        assert key_b.kms_calls == {"DescribeKey": 1, "GenerateDataKey": 1}  # one data key
    assert [kind for kind, _ in tracking.events] == ["open", "close"]
    assert tracking.open_clients == 0


async def test_reencrypt_needs_an_open_client_and_a_keyring(tmp_path: Any) -> None:
    key_a = AesKey("a")
    message = await encrypt_with(key_a.keyring())
    client = EnvelopeClient(key_a.keyring())
    with pytest.raises(errors.ConfigurationError, match="not open"):
        await client.reencrypt(message, to_keyring=AesKey("b").keyring())
    async with client:
        with pytest.raises(errors.ConfigurationError, match="to_keyring"):
            await client.reencrypt(message, to_keyring=object())  # type: ignore[arg-type]
        with pytest.raises(errors.ConfigurationError, match="bytes-like"):
            await client.reencrypt("text", to_keyring=AesKey("b").keyring())  # type: ignore[arg-type]
    target = XorKeyring("b")
    with pytest.raises(errors.ConfigurationError, match="closed"):
        await client.reencrypt(message, to_keyring=target)
    with pytest.raises(errors.ConfigurationError, match="closed"):
        client.reencrypt_stream(message, to_keyring=target)
    (tmp_path / "c").write_bytes(message)
    with pytest.raises(errors.ConfigurationError, match="closed"):
        await client.reencrypt_file(tmp_path / "c", tmp_path / "r", to_keyring=target)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert (target.attached, target.opened, target.wrapped) == (0, 0, 0)


async def test_a_stream_read_after_the_client_exits_leaves_no_keyring_open() -> None:
    """``to_keyring`` is closed when the client exits. A stream made while the client
    was open but read after it exited must not open the keyring then (it would never
    be closed): it should fail, or at least every open must be matched by a close."""
    source = XorKeyring("a")
    message = await encrypt_with(source)
    target = XorKeyring("b")
    async with EnvelopeClient(source) as client:
        stream = client.reencrypt_stream(message, to_keyring=target)
    try:
        async with stream:
            await stream.read_all()
    except errors.EnvelopeError:
        pass
    assert target.opened == target.closed


async def test_a_kms_to_keyring_first_used_after_the_client_exits_is_not_left_open(
    kms: Any, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """The same with KMS: reading after exit fails (the client's own KMS keyring is
    closed), but must not open B's aiobotocore client on the way and leave it open."""
    tracking = TrackingSession()
    key_b = kms(kms_key_2, session=tracking.session)
    async with EnvelopeClient(kms(kms_key)) as client:
        message = await client.encrypt(PLAINTEXT)
        stream = client.reencrypt_stream(message, to_keyring=key_b)
    try:
        with pytest.raises(errors.EnvelopeError):
            await stream.read_all()
        assert tracking.open_clients == 0
    finally:
        await key_b.close()  # do not leak the client into other tests either way


async def test_a_target_opened_while_the_client_exits_is_closed_and_the_call_refused() -> None:
    """A re-encryption whose target was still opening when the client exited: the
    target is closed (nothing else would close it) and the call fails, instead of a
    target left open and a data key cached after the client's caches were wiped."""
    source = XorKeyring("a")
    message = await encrypt_with(source)
    target = XorKeyring("b", open_delay=0.2)
    outcome: list[object] = []

    async def rotate(client: EnvelopeClient) -> None:
        try:
            outcome.append(await client.reencrypt(message, to_keyring=target))
        except errors.ConfigurationError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg, EnvelopeClient(source) as client:
        tg.start_soon(rotate, client)
        await anyio.sleep(0.05)  # the target's open() has started
    assert (target.opened, target.closed) == (1, 1)
    assert len(outcome) == 1
    assert isinstance(outcome[0], errors.ConfigurationError)
    assert "closed" in str(outcome[0])


class FailingToClose(XorKeyring):
    async def close(self) -> None:
        await super().close()
        raise errors.KeyringError("the key service did not answer the close")


async def test_a_target_that_fails_to_close_does_not_keep_the_others_open() -> None:
    source, broken, other = XorKeyring("a"), FailingToClose("b"), XorKeyring("c")
    message = await encrypt_with(source)

    async def rotate_to_both() -> None:
        async with EnvelopeClient(source) as client:
            await client.reencrypt(message, to_keyring=broken)
            await client.reencrypt(message, to_keyring=other)

    with pytest.raises(errors.KeyringError, match="did not answer the close"):
        await rotate_to_both()
    # source: once more by encrypt_with's own client
    assert [(k.opened, k.closed) for k in (source, broken, other)] == [(2, 2), (1, 1), (1, 1)]
