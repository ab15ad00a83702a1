"""Interop with the AWS Encryption SDK (``aws-encryption-sdk``), in both directions.

aioenvelope's promise is byte compatibility with the ESDK message format, so every
case here has one library write and the other read, with the ESDK's raw master keys
(:mod:`esdk_peer`) playing the part of our raw keyrings: same provider ID (our key
namespace), same key ID (our key name), same key bytes. Besides the plaintext, each
direction checks that both parsers agree on the header the writer produced: suite,
message ID, frame length, encryption context and every encrypted data key.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aws_encryption_sdk.exceptions import SerializationError
from cryptography.hazmat.primitives.asymmetric import rsa
from esdk_peer import (
    KEY_KINDS,
    assert_headers_agree,
    esdk_decrypt,
    esdk_encrypt,
    peer_keys,
    raw_aes_key,
    shared_key,
)
from suites import COMMITTING_SUITES, LEGACY_SUITES

from aioenvelope import (
    AlgorithmSuite,
    CommitmentPolicy,
    EnvelopeClient,
    Keyring,
    MultiKeyring,
    RawAesKeyring,
    errors,
)

SMALL_FRAME = 128
DEFAULT_FRAME = 65536
NAMESPACE = "aioenvelope-interop"
KEY_NAME = "key-1"
ASCII_CONTEXT = {"purpose": "interop", "tenant": "t-42"}


# ---------------------------------------------------------------------------------------
# The two directions
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One interop exchange. ``ours`` and ``peer`` hold the same keys."""

    ours: Keyring
    peer: Any  # esdk_peer.PeerKeys
    plaintext: bytes
    suite: AlgorithmSuite
    frame_length: int = SMALL_FRAME
    encryption_context: Mapping[str, str] = field(default_factory=dict)


def aes_case(
    plaintext: bytes,
    suite: AlgorithmSuite,
    frame_length: int = SMALL_FRAME,
    context: Mapping[str, str] = ASCII_CONTEXT,
) -> Case:
    """A case under one fresh AES-256 key held by both libraries."""
    key = shared_key("aes-256", namespace=NAMESPACE, name=KEY_NAME)
    return Case(
        key.ours,
        peer_keys(key.peer),
        plaintext,
        suite,
        frame_length,
        context,
    )


async def aioenvelope_encrypts_esdk_decrypts(case: Case) -> None:
    async with EnvelopeClient(case.ours) as client:
        blob = await client.encrypt(
            case.plaintext,
            encryption_context=case.encryption_context,
            algorithm_suite=case.suite,
            frame_length=case.frame_length,
        )
        ours = await client.decrypt_with_header(blob)
    plaintext, peer_header = esdk_decrypt(case.peer, blob)
    assert plaintext == case.plaintext
    # The ESDK does not compare contexts on decrypt; that is the caller's job.
    assert peer_header.user_context == dict(case.encryption_context)
    assert peer_header.suite_id == case.suite.suite_id
    assert peer_header.frame_length == case.frame_length
    assert_headers_agree(ours.header, peer_header)


async def esdk_encrypts_aioenvelope_decrypts(case: Case) -> None:
    blob, peer_header = esdk_encrypt(
        case.peer,
        case.plaintext,
        suite_id=case.suite.suite_id,
        encryption_context=case.encryption_context,
        frame_length=case.frame_length,
    )
    async with EnvelopeClient(case.ours) as client:
        result = await client.decrypt_with_header(blob, encryption_context=case.encryption_context)
    assert result.plaintext == case.plaintext
    assert result.header.algorithm_suite is case.suite
    assert_headers_agree(result.header, peer_header)


Direction = Callable[[Case], Awaitable[None]]
DIRECTIONS = [
    pytest.param(aioenvelope_encrypts_esdk_decrypts, id="ours-to-esdk"),
    pytest.param(esdk_encrypts_aioenvelope_decrypts, id="esdk-to-ours"),
]


# ---------------------------------------------------------------------------------------
# Committing suites, both directions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
@pytest.mark.parametrize("kind", KEY_KINDS)
async def test_raw_keyring_edks_are_interchangeable_with_esdk_raw_master_keys(
    direction: Direction, suite: AlgorithmSuite, kind: str, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    """Each raw wrapping (AES-128/192/256-GCM, RSA PKCS1v15 and OAEP-SHA1..512) must
    produce EDKs the other library unwraps: provider info layout, IV and tag placement,
    RSA padding and the context-as-AAD of AES wrapping all have to match byte for byte."""
    key = shared_key(kind, rsa_private_key, namespace=NAMESPACE, name=KEY_NAME)
    plaintext = os.urandom(2 * SMALL_FRAME + 44)
    await direction(
        Case(key.ours, peer_keys(key.peer), plaintext, suite, SMALL_FRAME, ASCII_CONTEXT)
    )


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
@pytest.mark.parametrize(
    "size",
    [
        pytest.param(0, id="empty"),
        pytest.param(1, id="one-byte"),
        pytest.param(SMALL_FRAME - 1, id="frame-minus-1"),
        pytest.param(SMALL_FRAME, id="one-frame"),
        pytest.param(SMALL_FRAME + 1, id="frame-plus-1"),
        pytest.param(4 * SMALL_FRAME, id="four-frames-exact"),
        pytest.param(5 * SMALL_FRAME + 7, id="five-frames-and-a-bit"),
    ],
)
async def test_frame_boundaries_match_esdk(
    direction: Direction, suite: AlgorithmSuite, size: int
) -> None:
    """Framing is where off-by-one bugs live: the empty final frame, a final frame that is
    exactly full (the ESDK writes an extra empty one, a writer may not), and a final frame
    of one byte must all be read the way the other side wrote them."""
    case = aes_case(os.urandom(size), suite, SMALL_FRAME, ASCII_CONTEXT)
    await direction(case)


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_default_frame_length_multi_frame_message_matches_esdk(
    direction: Direction,
) -> None:
    """Our default frame length (65536) with several full frames and a partial last one:
    the one case that uses realistic frame sizes rather than tiny test frames."""
    case = aes_case(
        os.urandom(3 * DEFAULT_FRAME + 1000),
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
        DEFAULT_FRAME,
        ASCII_CONTEXT,
    )
    await direction(case)


async def test_client_default_frame_length_is_what_esdk_reads() -> None:
    """Encrypting without a frame_length uses the client default, and the ESDK must parse
    that frame length (65536) from the header we wrote."""
    key = shared_key("aes-256", namespace=NAMESPACE, name=KEY_NAME)
    plaintext = os.urandom(DEFAULT_FRAME + 1)
    async with EnvelopeClient(key.ours) as client:
        blob = await client.encrypt(plaintext)
    decrypted, header = esdk_decrypt(peer_keys(key.peer), blob)
    assert decrypted == plaintext
    assert header.frame_length == DEFAULT_FRAME
    assert header.framed


# The ESDK-Python writer only takes multiples of 128 up to 2^31 - 1; the format allows any
# length from 1, and the ESDK reader accepts any.
LARGEST_ESDK_FRAME = 2**31 - 128
LARGEST_FRAME = 2**31 - 1


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_largest_frame_length_both_write_interoperates(direction: Direction) -> None:
    """A frame length near 2^31 in the header with a short plaintext: the reader must take
    the single short final frame without sizing anything by the declared frame length."""
    case = aes_case(
        os.urandom(300),
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        LARGEST_ESDK_FRAME,
        ASCII_CONTEXT,
    )
    await direction(case)


@pytest.mark.parametrize(
    "frame_length",
    [
        pytest.param(1, id="one-byte-frames"),
        pytest.param(100, id="not-a-multiple-of-128"),
        pytest.param(LARGEST_FRAME, id="2^31-1"),
    ],
)
async def test_esdk_reads_our_frame_lengths_that_it_would_not_write(frame_length: int) -> None:
    """We accept any frame length from 1 to 2^31 - 1; the ESDK writer is stricter, so pin
    that its reader still takes every length we may write."""
    case = aes_case(
        os.urandom(250),
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
        frame_length,
        ASCII_CONTEXT,
    )
    await aioenvelope_encrypts_esdk_decrypts(case)


CONTEXTS = [
    pytest.param({}, id="empty"),
    pytest.param(ASCII_CONTEXT, id="ascii"),
    pytest.param(
        {
            "鍵": "値",
            "ключ": "значение",
            "𐀂": "astral 𐀂 and 𝄞",
            "emoji🔑": "🙂",
            "e\u0301": "combining, not NFC-normalised",
        },
        id="non-ascii",
    ),
    pytest.param(
        # UTF-8 byte order: U+E000 < U+FFFF < U+10002; UTF-16 code-unit order puts U+10002
        # (a surrogate pair, 0xD800...) first. The ESDK sorts by UTF-8 bytes.
        {"\ue000": "private use", "\uffff": "last BMP", "𐀂": "astral"},
        id="utf8-vs-utf16-sort-order",
    ),
    pytest.param({"note": "", "x": "y" * 1000}, id="empty-and-long-values"),
]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
@pytest.mark.parametrize("context", CONTEXTS)
async def test_encryption_context_serialization_matches_esdk(
    direction: Direction, suite: AlgorithmSuite, context: dict[str, str]
) -> None:
    """The context is serialized into the header AAD and is the AAD of AES key wrapping, so
    its byte form (UTF-8 lengths, sort by UTF-8 bytes, empty context = no bytes at all) must
    be identical in both libraries or the header tag and the EDK unwrap both fail."""
    case = aes_case(os.urandom(SMALL_FRAME + 3), suite, SMALL_FRAME, context)
    await direction(case)


MAX_SERIALIZED_CONTEXT = 0xFFFF
# key length (2) + "aws-crypto-public-key" (21) + value length (2) + base64 of a compressed
# P-384 point (68): the entry the default CMM adds to the context of 0x0578 messages.
_PUBLIC_KEY_ENTRY = 2 + 21 + 2 + 68


def context_of_serialized_size(size: int, suite: AlgorithmSuite) -> dict[str, str]:
    """A one-entry context {"k": "v" * n} whose serialization, including the public-key
    entry the default CMM adds for signing suites, is exactly ``size`` bytes."""
    overhead = 2 + 2 + 1 + 2 + (_PUBLIC_KEY_ENTRY if suite.signing else 0)
    return {"k": "v" * (size - overhead)}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
async def test_context_of_exactly_65535_serialized_bytes_matches_esdk(
    direction: Direction, suite: AlgorithmSuite
) -> None:
    """The header's AAD length is a UInt16, so 65535 serialized bytes is the largest
    context; for signing suites that budget includes the public key the CMM adds."""
    case = aes_case(
        b"at the limit",
        suite,
        SMALL_FRAME,
        context_of_serialized_size(MAX_SERIALIZED_CONTEXT, suite),
    )
    await direction(case)


@pytest.mark.parametrize("suite", COMMITTING_SUITES)
async def test_context_one_byte_over_the_limit_is_refused_like_the_esdk_refuses_it(
    suite: AlgorithmSuite,
) -> None:
    """Both writers must draw the line at the same byte: the ESDK refuses a 65536-byte
    context, and we must too (with EncryptionContextError) rather than write a header
    whose AAD length field has wrapped around."""
    key = shared_key("aes-256", namespace=NAMESPACE, name=KEY_NAME)
    context = context_of_serialized_size(MAX_SERIALIZED_CONTEXT + 1, suite)
    with pytest.raises(SerializationError):
        esdk_encrypt(
            peer_keys(key.peer),
            b"over",
            suite_id=suite.suite_id,
            encryption_context=context,
            frame_length=SMALL_FRAME,
        )
    async with EnvelopeClient(key.ours) as client:
        with pytest.raises(errors.EncryptionContextError):
            await client.encrypt(b"over", encryption_context=context, algorithm_suite=suite)


NON_ASCII_NAMES = [
    pytest.param("名前空間", "鍵-1", id="cjk"),
    pytest.param("ns-𐀂", "key-𐀂-🔑", id="astral"),
    pytest.param("espace-clé", "clé", id="latin1-range"),
]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("kind", ["aes-128", "aes-256", "rsa-oaep-sha256", "rsa-pkcs1"])
@pytest.mark.parametrize(("namespace", "name"), NON_ASCII_NAMES)
async def test_non_ascii_key_namespace_and_name_match_esdk(
    direction: Direction,
    kind: str,
    namespace: str,
    name: str,
    rsa_private_key: rsa.RSAPrivateKey,
) -> None:
    """Provider ID and key name are UTF-8 in the EDK with byte-count lengths (ESDK-Python
    before 4.0.1 wrote character counts); the AES provider info embeds the name, so a
    miscounted length shifts the tag-length, IV-length and IV fields after it."""
    key = shared_key(kind, rsa_private_key, namespace=namespace, name=name)
    case = Case(
        key.ours,
        peer_keys(key.peer),
        os.urandom(SMALL_FRAME * 2),
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        SMALL_FRAME,
        {"名前": "値 𐀂"},
    )
    await direction(case)


@pytest.mark.parametrize("suite", COMMITTING_SUITES)
async def test_we_read_esdk_non_framed_committing_messages(suite: AlgorithmSuite) -> None:
    """The ESDK still writes non-framed (content type 1) v2 messages when frame_length=0;
    nothing in the decrypt spec forbids them, so data written that way must stay readable."""
    key = shared_key("aes-256", namespace=NAMESPACE, name=KEY_NAME)
    plaintext = os.urandom(300)
    blob, peer_header = esdk_encrypt(
        peer_keys(key.peer),
        plaintext,
        suite_id=suite.suite_id,
        encryption_context=ASCII_CONTEXT,
        frame_length=0,
    )
    assert not peer_header.framed
    async with EnvelopeClient(key.ours) as client:
        result = await client.decrypt_with_header(blob, encryption_context=ASCII_CONTEXT)
    assert result.plaintext == plaintext
    assert_headers_agree(result.header, peer_header)


# ---------------------------------------------------------------------------------------
# Legacy (non-committing) suites: ESDK writes, we read under the right policy only
# ---------------------------------------------------------------------------------------

FRAMINGS = [pytest.param(SMALL_FRAME, id="framed"), pytest.param(0, id="non-framed")]
LEGACY_READING_POLICIES = [
    pytest.param(
        CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT, id="require-encrypt-allow-decrypt"
    ),
    pytest.param(CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT, id="forbid-encrypt-allow-decrypt"),
]


@pytest.mark.parametrize("policy", LEGACY_READING_POLICIES)
@pytest.mark.parametrize("frame_length", FRAMINGS)
@pytest.mark.parametrize("kind", ["aes-256", "rsa-oaep-sha256"])
@pytest.mark.parametrize("suite", LEGACY_SUITES)
async def test_we_read_legacy_esdk_messages_when_policy_allows_decrypt(
    suite: AlgorithmSuite,
    kind: str,
    frame_length: int,
    policy: CommitmentPolicy,
    rsa_private_key: rsa.RSAPrivateKey,
) -> None:
    """Data written by older ESDK clients (v1 headers, 16-byte message IDs, 128/192-bit
    data keys, no-KDF and HKDF-SHA256/384 suites, non-framed bodies) must decrypt once the
    caller opts in with a policy that allows non-committing decryption."""
    key = shared_key(kind, rsa_private_key, namespace=NAMESPACE, name=KEY_NAME)
    plaintext = os.urandom(2 * SMALL_FRAME + 44)
    context = {"legacy": "yes", "鍵": "𐀂"}
    blob, peer_header = esdk_encrypt(
        peer_keys(key.peer),
        plaintext,
        suite_id=suite.suite_id,
        encryption_context=context,
        frame_length=frame_length,
    )
    assert peer_header.suite_id == suite.suite_id
    async with EnvelopeClient(key.ours, commitment_policy=policy) as client:
        result = await client.decrypt_with_header(blob, encryption_context=context)
    assert result.plaintext == plaintext
    assert result.header.algorithm_suite is suite
    assert result.header.version == 1
    assert_headers_agree(result.header, peer_header)


@pytest.mark.parametrize("frame_length", FRAMINGS)
@pytest.mark.parametrize(
    "size", [pytest.param(0, id="empty"), pytest.param(1, id="one-byte"), SMALL_FRAME]
)
async def test_we_read_legacy_esdk_messages_of_edge_sizes(frame_length: int, size: int) -> None:
    """Empty and tiny legacy messages, framed and non-framed: the non-framed body has its
    own length field (UInt64) and single-block AAD that the framed tests never touch."""
    key = shared_key("aes-256", namespace=NAMESPACE, name=KEY_NAME)
    plaintext = os.urandom(size)
    blob, _ = esdk_encrypt(
        peer_keys(key.peer),
        plaintext,
        suite_id=AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA256.suite_id,
        encryption_context={},
        frame_length=frame_length,
    )
    async with EnvelopeClient(
        key.ours,
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT,
    ) as client:
        assert await client.decrypt(blob) == plaintext


@pytest.mark.parametrize("frame_length", FRAMINGS)
@pytest.mark.parametrize("suite", LEGACY_SUITES)
async def test_default_policy_refuses_legacy_esdk_messages(
    suite: AlgorithmSuite, frame_length: int
) -> None:
    """The default policy (REQUIRE_ENCRYPT_REQUIRE_DECRYPT) must refuse every
    non-committing suite, with the dedicated error, even though the key would unwrap."""
    key = shared_key("aes-256", namespace=NAMESPACE, name=KEY_NAME)
    blob, _ = esdk_encrypt(
        peer_keys(key.peer),
        b"legacy secret",
        suite_id=suite.suite_id,
        encryption_context=ASCII_CONTEXT,
        frame_length=frame_length,
    )
    async with EnvelopeClient(key.ours) as client:
        with pytest.raises(errors.CommitmentPolicyError):
            await client.decrypt(blob)


# ---------------------------------------------------------------------------------------
# Several keys
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("known", ["aes", "rsa", "multi-keyring-child"])
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
async def test_we_decrypt_esdk_multi_key_message_knowing_one_key(
    known: str, suite: AlgorithmSuite, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    """The ESDK wraps one data key under every master key (an AES generator and an
    encrypt-only RSA key here); a keyring that knows either one must skip the other's EDK
    and recover the data key from its own, also when it is a MultiKeyring child behind a
    generator whose same-named AES key does not unwrap anything."""
    aes = shared_key("aes-256", rsa_private_key, namespace="ns-aes", name="aes-key")
    rsa_writer = shared_key(
        "rsa-oaep-sha256", rsa_private_key, namespace="ns-rsa", name="rsa-key", public_only=True
    )
    rsa_reader = shared_key("rsa-oaep-sha256", rsa_private_key, namespace="ns-rsa", name="rsa-key")
    plaintext = os.urandom(3 * SMALL_FRAME)
    blob, peer_header = esdk_encrypt(
        peer_keys(aes.peer, rsa_writer.peer),
        plaintext,
        suite_id=suite.suite_id,
        encryption_context=ASCII_CONTEXT,
        frame_length=SMALL_FRAME,
    )
    assert {edk[0] for edk in peer_header.encrypted_data_keys} == {"ns-aes", "ns-rsa"}
    reader = {
        "aes": aes.ours,
        "rsa": rsa_reader.ours,
        "multi-keyring-child": MultiKeyring(
            RawAesKeyring("ns-aes", "aes-key", os.urandom(32)), [rsa_reader.ours]
        ),
    }[known]
    async with EnvelopeClient(reader) as client:
        result = await client.decrypt_with_header(blob, encryption_context=ASCII_CONTEXT)
    assert result.plaintext == plaintext
    assert_headers_agree(result.header, peer_header)


@pytest.mark.parametrize("known", ["generator", "child"])
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
async def test_esdk_decrypts_our_multi_keyring_message_knowing_one_key(
    known: str, suite: AlgorithmSuite, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    """Our MultiKeyring(generator, children) writes one EDK per keyring for the same data
    key; the ESDK holding only the generator's key, or only the (encrypt-only) child's,
    must decrypt it."""
    aes = shared_key("aes-256", rsa_private_key, namespace="ns-aes", name="aes-key")
    rsa_writer = shared_key(
        "rsa-oaep-sha512", rsa_private_key, namespace="ns-rsa", name="rsa-key", public_only=True
    )
    rsa_reader = shared_key("rsa-oaep-sha512", rsa_private_key, namespace="ns-rsa", name="rsa-key")
    plaintext = os.urandom(3 * SMALL_FRAME - 1)
    async with EnvelopeClient(MultiKeyring(aes.ours, [rsa_writer.ours])) as client:
        blob = await client.encrypt(
            plaintext,
            encryption_context=ASCII_CONTEXT,
            algorithm_suite=suite,
            frame_length=SMALL_FRAME,
        )
    reader = aes.peer if known == "generator" else rsa_reader.peer
    decrypted, peer_header = esdk_decrypt(peer_keys(reader), blob)
    assert decrypted == plaintext
    assert peer_header.user_context == ASCII_CONTEXT
    assert {edk[0] for edk in peer_header.encrypted_data_keys} == {"ns-aes", "ns-rsa"}


async def test_esdk_message_under_keys_we_do_not_hold_is_refused_with_no_usable_key() -> None:
    """A keyring with the right namespace and name but a different key must fail with
    NoUsableKeyError, not return garbage or an unrelated error."""
    blob, _ = esdk_encrypt(
        peer_keys(raw_aes_key(NAMESPACE, KEY_NAME, os.urandom(32))),
        b"secret",
        suite_id=AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY.suite_id,
        encryption_context=ASCII_CONTEXT,
        frame_length=SMALL_FRAME,
    )
    async with EnvelopeClient(RawAesKeyring(NAMESPACE, KEY_NAME, os.urandom(32))) as client:
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(blob)


async def test_esdk_message_with_a_different_reproduced_context_is_refused() -> None:
    """The context the reader supplies must match the one the ESDK stored; a mismatched
    value must raise EncryptionContextMismatchError before any plaintext is released."""
    key = shared_key("aes-256", namespace=NAMESPACE, name=KEY_NAME)
    blob, _ = esdk_encrypt(
        peer_keys(key.peer),
        b"secret",
        suite_id=AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384.suite_id,
        encryption_context={"tenant": "t-42"},
        frame_length=SMALL_FRAME,
    )
    async with EnvelopeClient(key.ours) as client:
        with pytest.raises(errors.EncryptionContextMismatchError):
            await client.decrypt(blob, encryption_context={"tenant": "t-43"})
