"""Body framing: frame IVs, the body AAD, and frame layouts (ESDK format section 2)."""

from __future__ import annotations

import struct

__all__ = [
    "AAD_TAIL_STRUCT",
    "FINAL_FRAME_AAD",
    "FRAME_AAD",
    "IV_STRUCT",
    "LARGE_FRAME",
    "SEQUENCE_NUMBER_END",
    "SINGLE_BLOCK_AAD",
    "body_aad",
    "frame_iv",
]

FRAME_AAD = b"AWSKMSEncryptionClient Frame"
FINAL_FRAME_AAD = b"AWSKMSEncryptionClient Final Frame"
SINGLE_BLOCK_AAD = b"AWSKMSEncryptionClient Single Block"
SEQUENCE_NUMBER_END = 0xFFFFFFFF
MAX_FRAMES = 0xFFFFFFFF
MAX_NON_FRAMED_LENGTH = 2**36 - 32
# From this size on a frame's body is sealed/opened into its own bytearray and handed
# out apart from its prefix: cryptography would allocate and zero it holding the GIL.
LARGE_FRAME = 256 << 10

IV_STRUCT = struct.Struct(">8xI")  # the hot loops pack with these directly
AAD_TAIL_STRUCT = struct.Struct(">IQ")


def frame_iv(sequence_number: int) -> bytes:
    """Eight zero bytes then the big-endian sequence number."""
    return IV_STRUCT.pack(sequence_number)


def body_aad(message_id: bytes, content: bytes, sequence_number: int, length: int) -> bytes:
    return message_id + content + AAD_TAIL_STRUCT.pack(sequence_number, length)
