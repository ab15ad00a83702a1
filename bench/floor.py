"""The cryptographic calls one 0x0478 message needs, with no format code around them.

A lower bound for any Python implementation on this machine: it tells whether a target
(say 10x the ESDK) is reachable at all, and how much of our time is format and framework
overhead rather than cryptography. It writes no message: it only makes the same calls
on inputs of the same sizes (data key, message ID, wrap, HKDF, header tag, one frame).
"""

from __future__ import annotations

import hmac
import os
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from .common import check

__all__ = ["CryptoFloor"]

_SUITE_ID = (0x0478).to_bytes(2, "big")
_DERIVE_INFO = _SUITE_ID + b"DERIVEKEY"
_COMMIT_INFO = b"COMMITKEY"
_ZERO_IV = bytes(12)
_FRAME_IV = (1).to_bytes(12, "big")
_FINAL_FRAME = b"AWSKMSEncryptionClient Final Frame" + (1).to_bytes(4, "big")
# The serialized context {"purpose": "bench"}: the wrapping AAD.
_CONTEXT_AAD = b"\x00\x01\x00\x07purpose\x00\x05bench"


def _derive(data_key: bytes, message_id: bytes) -> tuple[bytes, bytes]:
    """HKDF-SHA512 extract once, expand twice (32-byte outputs need one block each).

    ``hmac.digest`` is the cheapest HMAC the standard library offers; ``check_hkdf``
    proves it computes what ``cryptography``'s HKDF does.
    """
    prk = hmac.digest(message_id, data_key, "sha512")
    key = hmac.digest(prk, _DERIVE_INFO + b"\x01", "sha512")[:32]
    commitment = hmac.digest(prk, _COMMIT_INFO + b"\x01", "sha512")[:32]
    return key, commitment


def check_hkdf() -> None:
    data_key, message_id = os.urandom(32), os.urandom(32)
    prk = HKDF.extract(hashes.SHA512(), message_id, data_key)
    expected = (
        HKDFExpand(hashes.SHA512(), 32, _DERIVE_INFO).derive(prk),
        HKDFExpand(hashes.SHA512(), 32, _COMMIT_INFO).derive(prk),
    )
    check(_derive(data_key, message_id) == expected, "the floor's HKDF is not HKDF-SHA512")


class _Sealed(NamedTuple):
    wrap_iv: bytes
    wrapped: bytes
    message_id: bytes
    commitment: bytes
    header_tag: bytes
    frame: bytes


class CryptoFloor:
    """Encrypt/decrypt-shaped sequences of the raw calls, for 1-frame messages."""

    def __init__(self, wrapping_key: bytes, header_body_length: int) -> None:
        check_hkdf()
        self._wrapping = AESGCM(wrapping_key)
        self._header_body = os.urandom(header_body_length)

    def _frame_aad(self, message_id: bytes, length: int) -> bytes:
        """Message ID, content string, sequence number 1, length: as the format has it."""
        return message_id + _FINAL_FRAME + length.to_bytes(8, "big")

    def encrypt(self, data: bytes) -> _Sealed:
        data_key, message_id, wrap_iv = os.urandom(32), os.urandom(32), os.urandom(12)
        wrapped = self._wrapping.encrypt(wrap_iv, data_key, _CONTEXT_AAD)
        key, commitment = _derive(data_key, message_id)
        aead = AESGCM(key)
        header_tag = aead.encrypt(_ZERO_IV, b"", self._header_body)
        frame = aead.encrypt(_FRAME_IV, data, self._frame_aad(message_id, len(data)))
        return _Sealed(wrap_iv, wrapped, message_id, commitment, header_tag, frame)

    def encrypt_warm(self, data_key: bytes, data: bytes) -> _Sealed:
        """:meth:`encrypt` with the data key already known (a warm cache): no key
        generation and no wrap, the rest the same."""
        message_id = os.urandom(32)
        key, commitment = _derive(data_key, message_id)
        aead = AESGCM(key)
        header_tag = aead.encrypt(_ZERO_IV, b"", self._header_body)
        frame = aead.encrypt(_FRAME_IV, data, self._frame_aad(message_id, len(data)))
        return _Sealed(b"", b"", message_id, commitment, header_tag, frame)

    def decrypt_warm(self, data_key: bytes, sealed: _Sealed) -> bytes:
        """:meth:`decrypt` with the data key already known (a warm cache): no unwrap."""
        key, commitment = _derive(data_key, sealed.message_id)
        check(hmac.compare_digest(commitment, sealed.commitment), "floor: commitment differs")
        aead = AESGCM(key)
        aead.decrypt(_ZERO_IV, sealed.header_tag, self._header_body)
        length = len(sealed.frame) - 16
        return aead.decrypt(_FRAME_IV, sealed.frame, self._frame_aad(sealed.message_id, length))

    def decrypt(self, sealed: _Sealed) -> bytes:
        data_key = self._wrapping.decrypt(sealed.wrap_iv, sealed.wrapped, _CONTEXT_AAD)
        key, commitment = _derive(data_key, sealed.message_id)
        check(hmac.compare_digest(commitment, sealed.commitment), "floor: commitment differs")
        aead = AESGCM(key)
        aead.decrypt(_ZERO_IV, sealed.header_tag, self._header_body)
        length = len(sealed.frame) - 16
        return aead.decrypt(_FRAME_IV, sealed.frame, self._frame_aad(sealed.message_id, length))
