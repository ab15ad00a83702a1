"""No object reachable from a working client shows a data key in its ``repr``.

Error trackers (Sentry) and debuggers print the locals of every frame, recursively; a
cache entry whose ``repr`` includes its key bytes would put data keys into them. This
walks everything the client holds after encrypting and decrypting with caching on and
checks each object's ``repr`` for the data key, raw or hex.
"""

from __future__ import annotations

import gc
import mmap
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aioenvelope import EnvelopeClient, RawAesKeyring, inspect
from aioenvelope.format.encryption_context import serialize_encryption_context

OPAQUE = (bytes, bytearray, memoryview, mmap.mmap, str, int, float, type(None))


def reachable(root: object, limit: int = 200_000) -> list[object]:
    seen: dict[int, object] = {id(root): root}
    todo = [root]
    while todo and len(seen) < limit:
        for child in gc.get_referents(todo.pop()):
            if id(child) not in seen and not isinstance(child, type):
                seen[id(child)] = child
                todo.append(child)
    return list(seen.values())


async def test_no_object_reachable_from_a_client_shows_a_data_key_in_its_repr() -> None:
    wrapping_key = os.urandom(32)
    context = {"tenant": "t1"}
    async with EnvelopeClient(RawAesKeyring("ns", "k", wrapping_key)) as client:
        message = await client.encrypt(b"secret" * 10, encryption_context=context)
        await client.encrypt(b"again", encryption_context=context)  # a cache hit
        assert await client.decrypt(message, encryption_context=context) == b"secret" * 10
        (edk,) = inspect(message).encrypted_data_keys
        data_key = AESGCM(wrapping_key).decrypt(
            edk.provider_info[-12:], edk.ciphertext, serialize_encryption_context(context)
        )
        shown = (data_key.hex(), repr(data_key)[2:-1], repr(bytearray(data_key))[12:-2])
        everything = reachable(client)
        # An instance's attribute dict is how Python stores it, not something a tool
        # prints for a local: each object's own repr is what counts.
        attribute_dicts = {id(vars(o)) for o in everything if hasattr(o, "__dict__")}
        objects = [
            o for o in everything if not isinstance(o, OPAQUE) and id(o) not in attribute_dicts
        ]
        assert len(objects) > 50  # the walk reached the caches, not just the client
        leaks = [type(o).__qualname__ for o in objects if any(s in repr(o) for s in shown)]
        assert leaks == []
