"""``reencrypt_stream`` and ``reencrypt_file``: any chunking of the old message gives a
complete new message; the source is read lazily and closed early; a truncated header or
a damaged body produces nothing (file) or never the new final frame (stream); signed,
legacy and unsigned messages move through every API.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from chunkers import AsyncShortReader, ClosableChunks, agen, fixed_chunks, random_chunks, up_to
from esdk_peer import esdk_decrypt, esdk_encrypt
from frame_layout import header_length
from rotation import (
    CONTEXT,
    NOT_NAMED,
    PLAINTEXT,
    PUBLIC_KEY_FIELD,
    AesKey,
    XorKeyring,
    assert_no_usable_key,
    body,
    decrypt_with,
    drain_into,
    encrypt_with,
    flip,
)
from stream_outcome import assert_verified_prefix, drain
from suites import COMMIT, COMMIT_SIGN

import aioenvelope
from aioenvelope import (
    AlgorithmSuite,
    CommitmentPolicy,
    EnvelopeClient,
    Keyring,
    MultiKeyring,
    errors,
)

# ---------------------------------------------------------------------------------------
# 4. reencrypt_stream and reencrypt_file
# ---------------------------------------------------------------------------------------


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
        sources.append(AsyncShortReader(old, up_to(7)))
        for largest in (1, 3, 17, 100, 1000, len(old)):
            sources.append(random_chunks(old, rng, largest))
            sources.append(agen(random_chunks(old, rng, largest)))
            sources.append(iter(random_chunks(old, rng, largest)))
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
            await assert_no_usable_key(XorKeyring("a"), new, match="found no EDK of its own")
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
    pieces = random_chunks(old, random.Random(7), 4096)
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
            assert header_length(first) == len(first)
            assert pulled <= 2
            rest = [chunk async for chunk in iterator]
    assert pulled == len(pieces)
    new = first + b"".join(rest)
    assert await decrypt_with(XorKeyring("b"), new) == plaintext


async def test_reencrypt_stream_closed_early_closes_its_source() -> None:
    source = XorKeyring("a")
    old = await encrypt_with(source)
    unread, partly = ClosableChunks(fixed_chunks(old, 100)), ClosableChunks(fixed_chunks(old, 100))
    async with EnvelopeClient(source) as client:
        async with client.reencrypt_stream(unread, to_keyring=XorKeyring("b")):
            pass
        async with client.reencrypt_stream(partly, to_keyring=XorKeyring("b")) as stream:
            await anext(aiter(stream))
    assert unread.closed
    assert partly.closed


INSIDE_THE_HEADER = "^the message is truncated: it ends inside the message header"


async def test_reencrypt_of_a_truncated_header_raises_truncated() -> None:
    source, target = XorKeyring("a"), XorKeyring("b")
    old = await encrypt_with(source)
    length = header_length(old)
    async with EnvelopeClient(source) as client:
        for cut in [*range(0, length, 13), length - 1]:
            for src in (old[:cut], random_chunks(old[:cut], random.Random(cut), 5)):
                produced: list[bytes] = []
                with pytest.raises(errors.TruncatedMessageError, match=INSIDE_THE_HEADER):
                    await drain_into(client.reencrypt_stream(src, to_keyring=target), produced)
                assert produced == []
            with pytest.raises(errors.TruncatedMessageError, match=INSIDE_THE_HEADER):
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
    header, footer = header_length(old), footer_length(old)
    return {
        "cut-mid-body": lambda: old[: header + 400],
        "cut-before-signature": lambda: old[:-footer],
        "cut-in-signature": lambda: old[:-10],
        "flip-middle-frame": lambda: flip(old, header + 3 * 96 + 16 + 10),
        "flip-final-frame": lambda: flip(old, len(old) - footer - 20),
        "flip-signature": lambda: flip(old, len(old) - 5),
        "trailing-byte": lambda: old + b"\x00",
    }[damage]()


TRUNCATED = "^the message is truncated: it ends inside {}"
FORGED_FRAME = "^frame {} failed authentication: the message was changed or corrupted"
# How each damage to the 2,000-byte signed message (31 regular 64-byte frames and a
# final 32nd) is refused, by reencrypt, reencrypt_file and reencrypt_stream alike.
DAMAGE_REFUSALS: dict[str, tuple[type[errors.EnvelopeError], str]] = {
    "cut-mid-body": (errors.TruncatedMessageError, TRUNCATED.format("frame 5\\.")),
    "cut-before-signature": (errors.TruncatedMessageError, TRUNCATED.format("the signature")),
    "cut-in-signature": (errors.TruncatedMessageError, TRUNCATED.format("the signature")),
    "flip-middle-frame": (errors.AuthenticationError, FORGED_FRAME.format(4)),
    "flip-final-frame": (errors.AuthenticationError, FORGED_FRAME.format(32)),
    "flip-signature": (errors.AuthenticationError, "^message signature does not verify$"),
    "trailing-byte": (errors.MalformedMessageError, "^unexpected bytes after the end of the"),
}
BODY_DAMAGE = list(DAMAGE_REFUSALS)


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
        error, match = DAMAGE_REFUSALS[damage]
        with pytest.raises(error, match=match) as raised:
            await client.reencrypt(damaged, to_keyring=target)
        with pytest.raises(error, match=match):
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
    truncated, and the frames it holds are exactly the old plaintext's first frames.
    Fed in 200-byte chunks, so frames do come out before the damage."""
    source, target = XorKeyring("a"), XorKeyring("b")
    old = await signed_old(source)
    damaged = body_damage(old, damage)
    plaintext = await decrypt_with(source, old)
    async with EnvelopeClient(source, frame_length=64) as client:
        for feed in (damaged, random_chunks(damaged, random.Random(5), 200)):
            produced: list[bytes] = []
            error, match = DAMAGE_REFUSALS[damage]
            with pytest.raises(error, match=match):
                await drain_into(client.reencrypt_stream(feed, to_keyring=target), produced)
            partial = b"".join(produced)
            if isinstance(feed, list):
                # New frames did come out (4 + 12 + 64 + 16 bytes each) ...
                assert len(partial) >= header_length(partial) + 96
            if not partial:
                continue
            # ... but no reader takes them for a whole message.
            with pytest.raises(errors.TruncatedMessageError):
                await decrypt_with(XorKeyring("b"), partial)
            async with EnvelopeClient(XorKeyring("b")) as reader:
                with pytest.raises(errors.TruncatedMessageError):
                    await reader.decrypt_stream(partial).read_all()
                released = await drain(reader.decrypt_stream(partial))
            assert isinstance(released.error, errors.TruncatedMessageError)
            assert_verified_prefix(released.plaintext, plaintext, 64)


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
    await assert_no_usable_key(key_a.keyring(), rotated.read_bytes(), match=NOT_NAMED)
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
            random_chunks(signed, random.Random(2), 50), to_keyring=key_b.keyring()
        ).read_all()
        await client.reencrypt_file(tmp_path / "c", tmp_path / "r", to_keyring=key_b.keyring())
    public_key = PUBLIC_KEY_FIELD
    old_key = aioenvelope.inspect(signed).encryption_context[public_key]
    new_keys = set()
    for new in (whole, streamed, (tmp_path / "r").read_bytes()):
        header = aioenvelope.inspect(new)
        assert header.algorithm_suite is COMMIT_SIGN
        new_keys.add(header.encryption_context[public_key])
        assert await decrypt_with(key_b.keyring(), new, CONTEXT) == PLAINTEXT
        await assert_no_usable_key(key_a.keyring(), new, match=NOT_NAMED)
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
    public_key = PUBLIC_KEY_FIELD
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
    await assert_no_usable_key(key_a.keyring(), new, match=NOT_NAMED)
    assert esdk_decrypt(key_b.peer(), new)[0] == PLAINTEXT


async def test_reencrypt_stream_to_an_unsigned_suite_can_then_be_reencrypted() -> None:
    key_a, key_b, key_c = AesKey("a"), AesKey("b"), AesKey("c")
    signed = await encrypt_with(key_a.keyring(), algorithm_suite=COMMIT_SIGN)
    async with EnvelopeClient(key_a.keyring()) as client:
        unsigned = await client.reencrypt_stream(
            random_chunks(signed, random.Random(3), 50),
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
