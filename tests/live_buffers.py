"""Where a memory dump would look: the live ``bytearray``s that hold a secret.

Caches keep keys in ``bytearray``s and zero them when they leave (README, "On wiping").
No public seam shows a cache's storage, so tests scan every live ``bytearray`` the
garbage collector can reach (bytearrays are not gc-tracked themselves, so the scan walks
the referents of every tracked object, a cache entry included). A test takes the one
buffer holding a key before an event and keeps it alive; after the event that very
buffer must be all zeros (an entry merely dropped would be freed with its bytes intact,
which a scan of live objects alone cannot tell from a wipe).
"""

from __future__ import annotations

import gc

__all__ = ["bytearrays_holding", "the_one_holding", "zeroed"]


def bytearrays_holding(secret: bytes) -> list[bytearray]:
    """Every distinct live bytearray that contains ``secret``."""
    gc.collect()
    seen: set[int] = set()
    holding = []
    for obj in gc.get_objects():
        for ref in gc.get_referents(obj):
            if type(ref) is bytearray and id(ref) not in seen:
                seen.add(id(ref))
                if secret in ref:
                    holding.append(ref)
    return holding


def the_one_holding(secret: bytes) -> bytearray:
    """The single bytearray (the cache entry's) that holds ``secret``. The test keeps it
    alive, so that after the entry left the cache it can see whether it was zeroed or
    merely dropped (freed memory keeps its bytes)."""
    (held,) = bytearrays_holding(secret)
    return held


def zeroed(buffer: bytearray) -> bool:
    return len(buffer) == 32 and buffer == bytes(32)
