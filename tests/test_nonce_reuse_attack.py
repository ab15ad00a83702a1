"""The attack that header-only rewrap enabled, rebuilt, and shown to have nothing to
work on once rotation is re-encryption.

Header-only rewrap tagged a new header (other EDKs) with the message key and the fixed
all-zero v2 header IV, the pair that had already tagged the original header. Two GCM
tags under one (key, IV) over empty plaintexts and AADs A1, A2 satisfy

    T1 xor T2 = GHASH_H(A1) xor GHASH_H(A2)

a polynomial equation in the GHASH key H alone, whose few roots an attacker finds with
standard root finding over GF(2^128). With H, each frame's tag mask
E_K(J0) = tag xor GHASH_H(aad, ciphertext) falls out, and any frame can be re-tagged
under new AAD: here frame 1 becomes the final frame, a truncation every ESDK accepts.

GHASH is written out below in a few lines of plain Python: test code that checks a
library, not a primitive the library uses. Root finding is left out: the tests check
that the true H satisfies the attacker's equation (so it is among the roots an attacker
would find) where the nonce was reused, and that nothing of the kind holds after
re-encryption.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aioenvelope import AlgorithmSuite, EnvelopeClient, RawAesKeyring, errors, inspect
from aioenvelope.format import MessageDecryptor, MessageEncryptor, nonce_log
from aioenvelope.format.body import FINAL_FRAME_AAD, FRAME_AAD, body_aad, frame_iv
from aioenvelope.format.derivation import derive_keys
from aioenvelope.format.encryption_context import serialize_encryption_context
from aioenvelope.format.header import EncryptedDataKey, parse_header, serialize_header_body

SUITE = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
F = 32  # frame length: three small frames are enough
_R = 0xE1 << 120


def gf_mult(x: int, y: int) -> int:
    """Multiplication in GCM's GF(2^128) (NIST SP 800-38D, algorithm 1)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _R if v & 1 else v >> 1
    return z


def ghash(h: int, aad: bytes, ciphertext: bytes) -> int:
    def blocks(data: bytes) -> list[int]:
        padded = data + bytes(-len(data) % 16)
        return [int.from_bytes(padded[i : i + 16], "big") for i in range(0, len(padded), 16)]

    lengths = struct.pack(">QQ", len(aad) * 8, len(ciphertext) * 8)
    y = 0
    for block in [*blocks(aad), *blocks(ciphertext), int.from_bytes(lengths, "big")]:
        y = gf_mult(y ^ block, h)
    return y


def aes_block(key: bytes, block: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def hash_key(key: bytes) -> int:
    return int.from_bytes(aes_block(key, bytes(16)), "big")


def tag_mask(key: bytes, iv: bytes) -> int:
    return int.from_bytes(aes_block(key, iv + b"\x00\x00\x00\x01"), "big")


def xor(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def test_the_gcm_model_here_matches_cryptography() -> None:
    """The test's GHASH, checked against real AES-GCM tags, so the attack below is the
    real one."""
    key, iv = os.urandom(32), os.urandom(12)
    for aad, plaintext in [(b"", b""), (b"header", b""), (b"a" * 37, b"p" * 45)]:
        sealed = AESGCM(key).encrypt(iv, plaintext, aad)
        ciphertext, tag = sealed[:-16], sealed[-16:]
        expected = ghash(hash_key(key), aad, ciphertext) ^ tag_mask(key, iv)
        assert int.from_bytes(tag, "big") == expected


def three_frame_message(data_key: bytes) -> tuple[bytes, bytes, MessageEncryptor]:
    encryptor = MessageEncryptor(
        algorithm_suite=SUITE,
        data_key=data_key,
        message_id=os.urandom(32),
        encrypted_data_keys=[EncryptedDataKey("test", b"old", b"wrapped-old")],
        encryption_context={"tenant": "t1"},
        frame_length=F,
    )
    plaintext = os.urandom(3 * F)
    return encryptor.encrypt_all(plaintext), plaintext, encryptor


def truncation_forgery(message: bytes, key: bytes, h: int) -> bytes:
    """Frame 1 of ``message`` re-tagged as the final frame, with the GHASH key ``h``."""
    parsed = parse_header(message, max_encrypted_data_keys=10)
    header = message[: parsed.length]
    mid = parsed.header.message_id
    frame = message[parsed.length : parsed.length + 16 + F + 16]
    ciphertext, tag = frame[16 : 16 + F], frame[16 + F :]
    mask = int.from_bytes(tag, "big") ^ ghash(h, body_aad(mid, FRAME_AAD, 1, F), ciphertext)
    forged_tag = ghash(h, body_aad(mid, FINAL_FRAME_AAD, 1, F), ciphertext) ^ mask
    final = struct.pack(">II12sI", 0xFFFFFFFF, 1, frame_iv(1), F)
    return header + final + ciphertext + forged_tag.to_bytes(16, "big")


def decrypt(message: bytes, data_key: bytes) -> bytes:
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(message)
    decryptor.receive_eof()
    decryptor.read_header()
    decryptor.begin_body(data_key)
    return decryptor.read_all()


def test_a_second_header_tag_under_the_same_key_and_iv_lets_anyone_truncate() -> None:
    """What header-only rewrap did, rebuilt: a new header tagged with the same message
    key and IV. The attacker's equation then holds for the true GHASH key, and the
    forgery it enables (frame 1 turned into the final frame) is accepted."""
    data_key = os.urandom(32)
    message, plaintext, _ = three_frame_message(data_key)
    parsed = parse_header(message, max_encrypted_data_keys=10)
    key, _ = derive_keys(SUITE, data_key, parsed.header.message_id)
    # The old rewrap: same key, IV zero, other EDKs.
    new = dataclasses.replace(
        parsed.header,
        encrypted_data_keys=(EncryptedDataKey("test", b"new", b"wrapped-new"),),
    )
    new_body = serialize_header_body(new)
    new_tag = AESGCM(key).encrypt(parsed.auth_iv, b"", new_body)
    h = hash_key(key)
    assert xor(parsed.auth_tag, new_tag) == ghash(h, parsed.body_bytes, b"") ^ ghash(
        h, new_body, b""
    )
    forged = truncation_forgery(message, key, h)
    assert decrypt(forged, data_key) == plaintext[:F]  # a third of the message, "whole"


async def test_reencryption_leaves_the_attack_nothing_to_work_on() -> None:
    """Rotation now: the new header is tagged under a new message key, so no two tags
    share a (key, IV); the attacker's equation does not hold for the old message's H,
    and the truncation built with it is refused."""
    old_key, new_key = os.urandom(32), os.urandom(32)
    old = RawAesKeyring("test", "old", old_key)
    new = RawAesKeyring("test", "new", new_key)
    header_seals: list[tuple[bytes, bytes]] = []

    def log(key: bytes, iv: bytes) -> None:
        if iv == bytes(12):
            header_seals.append((key, iv))

    async with EnvelopeClient(old, frame_length=F) as client:
        with nonce_log.observe_seals(log):
            message = await client.encrypt(os.urandom(3 * F), encryption_context={"t": "1"})
            rotated = await client.reencrypt(message, to_keyring=new)
    assert len(header_seals) == 2
    assert header_seals[0] != header_seals[1]  # two header tags, two different keys
    assert inspect(rotated).message_id != inspect(message).message_id

    # Take the old message's true H (as if the attacker had it) and evaluate the
    # attacker's equation on the two header tags: it fails; it held under reuse.
    data_key = AESGCM(old_key).decrypt(
        inspect(message).encrypted_data_keys[0].provider_info[-12:],
        inspect(message).encrypted_data_keys[0].ciphertext,
        serialize_encryption_context({"t": "1"}),
    )
    first = parse_header(message, max_encrypted_data_keys=10)
    second = parse_header(rotated, max_encrypted_data_keys=10)
    key, _ = derive_keys(SUITE, data_key, first.header.message_id)
    h = hash_key(key)
    assert xor(first.auth_tag, second.auth_tag) != ghash(h, first.body_bytes, b"") ^ ghash(
        h, second.body_bytes, b""
    )
    # A forgery needs H; with the new message's header under another key, the best an
    # attacker can do is guess it, and a guessed H's forgery is refused.
    async with EnvelopeClient(old, frame_length=F) as client:
        forged = truncation_forgery(message, key, int.from_bytes(os.urandom(16), "big"))
        with pytest.raises(errors.AuthenticationError, match=r"^frame 1 failed authentication"):
            await client.decrypt(forged, encryption_context={"t": "1"})
