"""``client.reencrypt`` of whole messages under raw keys: AES to AES at every frame
length and size, to RSA and to multi-keyrings, legacy ESDK messages upgraded to the
committing suites, required and wrong encryption contexts, and tampered headers
(refused before the target keyring is even opened).

Rotation is re-encryption: the old message is decrypted and verified to its end with
the client's keyring, then sealed again as a new message (new message ID, a data key
from ``to_keyring``, new frames). Each case checks the result opens under the new keys
only, and the ESDK reads it too.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from aws_encryption_sdk.exceptions import DecryptKeyError
from cryptography.hazmat.primitives.asymmetric import rsa
from esdk_peer import RsaWrapping, esdk_decrypt, esdk_encrypt, peer_keys, raw_rsa_key
from kms_server import KmsKey
from moto_keyrings import KmsKeyringFactory
from rotation import (
    CONTEXT,
    NAMED_BUT_WRONG,
    NAMESPACE,
    NOT_NAMED,
    PLAINTEXT,
    AesKey,
    XorKeyring,
    assert_no_usable_key,
    body,
    decrypt_with,
    drain_into,
    encrypt_with,
    flip,
    parsed,
)
from suites import COMMIT, COMMIT_SIGN

import aioenvelope
from aioenvelope import (
    AlgorithmSuite,
    CommitmentPolicy,
    EnvelopeClient,
    MultiKeyring,
    RawRsaKeyring,
    errors,
)
from aioenvelope.client import DEFAULT_FRAME_LENGTH

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
    await assert_no_usable_key(key_a.keyring(), new, match=NOT_NAMED)
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
    await assert_no_usable_key(key_a.keyring(), new, match=NOT_NAMED)
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
    await assert_no_usable_key(key_a.keyring(), new, match=NOT_NAMED)


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
            await drain_into(client.reencrypt_stream(old, to_keyring=target), produced)
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


async def test_required_context_must_be_given_to_reencrypt_and_stays_required() -> None:
    key_a, key_b = AesKey("a"), AesKey("b")
    full = {**CONTEXT, "secret": "s3"}
    old = await encrypt_with(
        key_a.keyring(), context=full, required_encryption_context_keys={"secret"}
    )
    assert "secret" not in aioenvelope.inspect(old).encryption_context
    async with EnvelopeClient(key_a.keyring()) as client:
        # The stored data key was wrapped with the whole context as AAD: without the
        # required pair (or with a wrong value) it does not unwrap.
        with pytest.raises(errors.NoUsableKeyError, match=NAMED_BUT_WRONG):
            await client.reencrypt(old, to_keyring=key_b.keyring())
        with pytest.raises(errors.NoUsableKeyError, match=NAMED_BUT_WRONG):
            await client.reencrypt(
                old, to_keyring=key_b.keyring(), encryption_context={"secret": "wrong"}
            )
        new = await client.reencrypt(
            old, to_keyring=key_b.keyring(), encryption_context={"secret": "s3"}
        )
    assert "secret" not in aioenvelope.inspect(new).encryption_context
    assert body(new) != body(old)
    assert await decrypt_with(key_b.keyring(), new, {"secret": "s3"}) == PLAINTEXT
    await assert_no_usable_key(key_b.keyring(), new, match=NAMED_BUT_WRONG)
    await assert_no_usable_key(key_b.keyring(), new, {"secret": "wrong"}, match=NAMED_BUT_WRONG)


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
    await assert_no_usable_key(key_b.keyring(), new, match=NAMED_BUT_WRONG)


async def test_reencrypt_under_a_wrong_encryption_context_is_a_mismatch_and_wraps_nothing(
    client: EnvelopeClient,
) -> None:
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

HEADER_FORGED = "^header authentication failed: the header was changed"
COMMITMENT_WRONG = "^key commitment does not match: the data key is not the one"
# How a flipped byte in each header field is refused: our EDK or the context (the AAD
# of its wrapping) changed, it no longer unwraps; the message ID changes the derived
# key, so the commitment fails; anything else only the header tag catches.
TAMPER_REFUSALS: dict[str, tuple[type[errors.EnvelopeError], str]] = {
    "message-id": (errors.AuthenticationError, COMMITMENT_WRONG),
    "context": (errors.NoUsableKeyError, NAMED_BUT_WRONG),
    "own-edk": (errors.NoUsableKeyError, NAMED_BUT_WRONG),
    "other-edk": (errors.AuthenticationError, HEADER_FORGED),
    "frame-length": (errors.AuthenticationError, HEADER_FORGED),
    "commitment": (errors.AuthenticationError, COMMITMENT_WRONG),
    "tag": (errors.AuthenticationError, HEADER_FORGED),
}
TAMPERED_FIELDS = list(TAMPER_REFUSALS)


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
        error, match = TAMPER_REFUSALS[field]
        with pytest.raises(error, match=match) as info:
            await drain_into(client.reencrypt_stream(tampered, to_keyring=target), produced)
        assert produced == []
        with pytest.raises(error, match=match):
            await client.reencrypt(tampered, to_keyring=target)
        with pytest.raises(error, match=match):
            await client.reencrypt_file(tmp_path / "c", tmp_path / "r", to_keyring=target)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert (target.attached, target.opened, target.wrapped) == (0, 0, 0)
    if field in ("other-edk", "message-id", "frame-length", "commitment", "tag"):
        # The keyring unwraps fine; only the header check can catch these.
        assert isinstance(info.value, errors.AuthenticationError)


@pytest.mark.parametrize("field", ["other-edk", "tag"])
async def test_tampered_header_with_kms_makes_no_call_under_key_b(
    make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey, field: str
) -> None:
    key_a, key_b = make_kms_keyring(kms_key), make_kms_keyring(kms_key_2)
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
