"""Every bytes-like shape is read as its bytes: 2-D views, views of another format and
strided (non-contiguous) views, as plaintext, ciphertext and stream sources. A 2-D view
used to raise NotImplementedError (not a library error) from decrypt and decrypt_stream."""

from __future__ import annotations

import array
import os
from collections.abc import Callable

import pytest

from aioenvelope import EnvelopeClient, RawAesKeyring


def two_d(data: bytes) -> memoryview:
    return memoryview(data).cast("B", shape=[1, len(data)])


def signed_chars(data: bytes) -> memoryview:
    return memoryview(array.array("b", data))


def strided(data: bytes) -> memoryview:
    doubled = bytearray(2 * len(data))
    doubled[::2] = data
    return memoryview(bytes(doubled))[::2]


SHAPES: list[Callable[[bytes], memoryview]] = [two_d, signed_chars, strided]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda f: f.__name__)
async def test_a_view_of_any_shape_is_encrypted_and_decrypted_as_its_bytes(
    shape: Callable[[bytes], memoryview],
) -> None:
    data = os.urandom(4099)
    assert shape(data).tobytes() == data
    keyring = RawAesKeyring("shapes", "k", os.urandom(32))
    async with EnvelopeClient(keyring, frame_length=1000) as client:
        message = await client.encrypt(shape(data))
        assert await client.decrypt(shape(message)) == data
        streamed = await client.encrypt_stream(shape(data)).read_all()
        assert await client.decrypt_stream(shape(streamed)).read_all() == data
        rotated = await client.reencrypt(shape(message), to_keyring=keyring)
        assert await client.decrypt(rotated) == data
        again = await client.reencrypt_stream(shape(message), to_keyring=keyring).read_all()
        assert await client.decrypt(again) == data
