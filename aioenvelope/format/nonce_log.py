"""The seam that proves the one rule of AES-GCM here: a (key, IV) pair seals once, ever.

Every place in the format layer (and the raw AES keyring) that seals with AES-GCM reports
the pair through :func:`sealing` just before it does. Tests register an observer with
:func:`observe_seals` and assert that no pair repeats across whatever they drive through
the public API: one-shot and streamed encryption, large frames, data-key reuse,
re-encryption. Observers get a SHA-256 fingerprint of the key, never the key itself.

With no observer registered (always, outside tests) the cost is one truth test of a list
per seal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["SealObserver", "fingerprint", "observe_seals", "observers", "report", "sealing"]

SealObserver = Callable[[bytes, bytes], None]
"""Called with (SHA-256 of the key, IV) for every AES-GCM seal."""

observers: list[SealObserver] = []
"""The registered observers; hot loops test this list's truth before calling
:func:`sealing`."""


def fingerprint(key: bytes | bytearray) -> bytes:
    """What observers see of a key: its SHA-256."""
    return hashlib.sha256(key).digest()


def sealing(key: bytes | bytearray, iv: bytes) -> None:
    """Report that ``key`` is about to seal with ``iv`` (a no-op with no observer)."""
    if observers:
        report(fingerprint(key), iv)


def report(key_fingerprint: bytes, iv: bytes) -> None:
    """:func:`sealing`, for a holder that keeps only the key's :func:`fingerprint`."""
    for observer in tuple(observers):
        observer(key_fingerprint, bytes(iv))


@contextmanager
def observe_seals(observer: SealObserver) -> Iterator[None]:
    """Call ``observer`` for every seal made inside the ``with`` block (for tests)."""
    observers.append(observer)
    try:
        yield
    finally:
        observers.remove(observer)
