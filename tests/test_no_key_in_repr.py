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


class Shows:
    """An object whose repr is ``text``: the scan's control."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Shows({self.text})"


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
        # The walk reached the caches: the data key's own bytes are among what it found.
        assert [o for o in everything if isinstance(o, (bytes, bytearray)) and o == data_key]

        def leaks(candidates: list[object]) -> list[str]:
            return [type(o).__qualname__ for o in candidates if any(s in repr(o) for s in shown)]

        # The control: an object that did show the key, in any of the three forms, would be
        # named (so the scan looks for the key this message used, as a repr shows it).
        controls = [Shows(form) for form in shown] + [Shows(repr(bytearray(data_key)))]
        assert leaks([*objects, *controls]) == ["Shows"] * 4
        assert leaks(objects) == []
