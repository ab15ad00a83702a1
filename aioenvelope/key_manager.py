"""The key manager: as few KMS calls as is safe, and fail fast when KMS is down.

Wraps the default materials manager with data-key reuse for encryption, a TTL cache of
data keys for decryption, and coalescing of identical concurrent misses. (The circuit
breaker and the decrypt rate limit sit lower, on the KMS call path: see ``runtime.py``.)

On wiping: cached data keys are held in ``bytearray``s and zeroed when evicted, expired or
cleared. Python still makes transient ``bytes`` copies (each message's materials, the
KMS response) that it cannot zero; this narrows exposure, it does not guarantee erasure.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Hashable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache

from .coalesce import Coalescer
from .config import CacheConfig
from .format.encryption_context import PUBLIC_KEY_FIELD, validate_user_context
from .format.header import MessageHeader
from .format.signing import Verifier
from .format.suites import AlgorithmSuite
from .keyrings.base import DecryptionMaterials
from .materials import (
    DecryptionPlan,
    DefaultMaterialsManager,
    EncryptionPlan,
    decryption_context_bytes,
    decryption_plan_of,
    merge_reproduced_context,
    verifier_for,
)
from .stats import StatsRecorder
from .telemetry import Observer

__all__ = ["KeyManager"]

_U64 = struct.Struct(">Q")
_NO_KEYS: frozenset[str] = frozenset()


class _WipingTTLCache(TTLCache[Hashable, Any]):
    """A TTL cache that zeroes the key bytes of whatever leaves it."""

    def popitem(self) -> tuple[Hashable, Any]:
        key, value = super().popitem()
        value.wipe()
        return key, value

    def expire(self, time: float | None = None) -> Any:
        expired = super().expire(time)
        for _, value in expired:
            value.wipe()
        return expired

    def wipe_all(self) -> None:
        for value in self.values():
            value.wipe()
        self.clear()


class _DecryptEntry:
    """A cached data key (a ``bytearray``, zeroed when the entry leaves the cache) and
    the rest of its materials' fields; each use gets materials with its own ``bytes``
    copy of the key."""

    __slots__ = ("data_key", "fields", "kind")

    def __init__(self, materials: DecryptionMaterials) -> None:
        assert materials.plaintext_data_key is not None
        self.data_key = bytearray(materials.plaintext_data_key)
        self.fields = {**materials.__dict__, "plaintext_data_key": None}
        self.kind = type(materials)  # a keyring's own subclass stays one

    def use(self) -> DecryptionMaterials:
        # As _evolve(materials, plaintext_data_key=...) makes them, in one update.
        materials: DecryptionMaterials = object.__new__(self.kind)
        fields = materials.__dict__
        fields.update(self.fields)
        fields["plaintext_data_key"] = bytes(self.data_key)
        return materials

    def wipe(self) -> None:
        self.data_key[:] = bytes(len(self.data_key))


@dataclass
class _EncryptEntry:
    """A reusable data key and how much it has sealed. ``repr`` shows the counts only:
    tools that capture locals (Sentry, debuggers) must never print the key."""

    plan: EncryptionPlan = field(repr=False)
    data_key: bytearray = field(repr=False)
    created: float
    messages: int = 0
    bytes: int = 0

    def try_use(self, now: float, size: int, config: CacheConfig) -> bool:
        if (
            now - self.created >= config.max_age
            or self.messages + 1 > config.max_messages
            or self.bytes + size > config.max_bytes
        ):
            return False
        self.messages += 1
        self.bytes += size
        return True

    def plan_for_message(self) -> EncryptionPlan:
        plan = self.plan
        if plan.signer is None:
            return plan  # frozen, materials and all: every message may share it
        return EncryptionPlan(plan.materials, plan.signer.fork())

    def wipe(self) -> None:
        self.data_key[:] = bytes(len(self.data_key))


def _prefixed(part: bytes) -> bytes:
    return _U64.pack(len(part)) + part  # length-prefixed: no ambiguous joins


_SUITE_PARTS = {
    suite.suite_id: _prefixed(suite.suite_id.to_bytes(2, "big")) for suite in AlgorithmSuite
}
_CONTEXT_PART = _prefixed(b"context")
# Decrypt cache keys up to this size (EDKs and context) are the bytes themselves; a KMS
# EDK is about 200 bytes. See KeyManager._decrypt_key.
_PLAIN_KEY_MAX_BYTES = 2048
# ... and of at most this many EDKs: each is an object of its own (~40 bytes of overhead
# even when empty), and a header may hold hundreds of tiny ones.
_PLAIN_KEY_MAX_EDKS = 4


class KeyManager:
    """Caching, coalescing and rate limiting around :class:`DefaultMaterialsManager`."""

    def __init__(
        self,
        inner: DefaultMaterialsManager,
        *,
        cache: CacheConfig | None,
        coalescer: Coalescer,
        clock: Callable[[], float],
        stats: StatsRecorder,
        observer: Observer | None = None,
    ) -> None:
        self.inner = inner
        self._observer = observer  # None: telemetry off (one check per lookup)
        self._config = cache
        self._coalescer = coalescer
        self._clock = clock
        self._stats = stats
        partition = (cache.partition if cache else None) or os.urandom(16).hex()
        self._partition = partition.encode("utf-8")
        self._decrypt_key_head = _prefixed(self._partition) + _prefixed(b"decrypt")
        self._encrypt: _WipingTTLCache | None = None
        self._decrypt: _WipingTTLCache | None = None
        if cache is not None:
            if cache.reuse_data_keys:
                self._encrypt = _WipingTTLCache(cache.encrypt_entries, cache.max_age, timer=clock)
            self._decrypt = _WipingTTLCache(cache.decrypt_entries, cache.decrypt_ttl, timer=clock)

    def choose_suite(self, requested: AlgorithmSuite | None) -> AlgorithmSuite:
        return self.inner.choose_suite(requested)

    def close(self) -> None:
        for cache in (self._encrypt, self._decrypt):
            if cache is not None:
                cache.wipe_all()

    # -- encryption --------------------------------------------------------------------

    async def encryption_plan(
        self,
        *,
        encryption_context: Mapping[str, str],
        algorithm_suite: AlgorithmSuite | None,
        required_encryption_context_keys: Set[str],
        plaintext_length: int | None,
    ) -> EncryptionPlan:
        inner = self.inner
        cache, config = self._encrypt, self._config
        if cache is None or config is None:  # no reuse: straight to the keyring
            return await inner.encryption_plan(
                encryption_context=encryption_context,
                algorithm_suite=algorithm_suite,
                required_encryption_context_keys=required_encryption_context_keys,
            )

        def fresh() -> Any:
            return inner.encryption_plan(
                encryption_context=encryption_context,
                algorithm_suite=algorithm_suite,
                required_encryption_context_keys=required_encryption_context_keys,
            )

        suite = inner.choose_suite(algorithm_suite)
        if (
            plaintext_length is None
            or plaintext_length > config.max_bytes
            or suite.info.kdf_hash is None  # never reuse a key that is used directly
        ):
            return await fresh()  # type: ignore[no-any-return]
        validate_user_context(encryption_context)
        # The cache is this client's own, and callers choose their contexts, so a plain
        # hashable key will do here (the decrypt side's keys come from messages: see
        # _decrypt_key).
        # serialize_encryption_context still runs once per entry, when it is filled.
        try:
            key: Hashable = (
                suite.suite_id,  # not the member: Enum.__hash__ is Python code
                frozenset(encryption_context.items()),
                frozenset(required_encryption_context_keys)
                if required_encryption_context_keys
                else _NO_KEYS,
            )
        except Exception:  # a value that does not hash: let the inner manager explain it
            return await fresh()  # type: ignore[no-any-return]
        waited = False
        while True:
            try:
                # One lookup: ``get`` is ``in`` then ``[]``, each hashing the key and
                # reading the clock; an expired entry raises KeyError as a missing one.
                entry: _EncryptEntry | None = cache[key]
            except KeyError:
                entry = None
            if entry is not None and entry.try_use(self._clock(), plaintext_length, config):
                if not waited:
                    self._stats.encrypt_cache_hits += 1
                    if self._observer is not None:
                        self._observer.cache_lookup("encrypt", True)
                return entry.plan_for_message()
            if not waited:
                self._stats.encrypt_cache_misses += 1
                if self._observer is not None:
                    self._observer.cache_lookup("encrypt", False)

            async def refill(key: Hashable = key) -> None:
                plan = await fresh()
                assert plan.materials.plaintext_data_key is not None
                old = cache.pop(key, None)
                if old is not None:
                    old.wipe()
                cache[key] = _EncryptEntry(
                    plan, bytearray(plan.materials.plaintext_data_key), self._clock()
                )

            # Keyed by this manager too: the client's re-encryption targets have managers of
            # their own on the same coalescer, and the same context under another keyring
            # is another data key.
            await self._coalescer.run(("encrypt", id(self), key), refill)
            waited = True  # a refill happened (ours or one we joined): look again

    # -- decryption --------------------------------------------------------------------

    def _decrypt_key(
        self, suite: AlgorithmSuite, sorted_edks: list[bytes], serialized_context: bytes
    ) -> Hashable:
        """The decrypt cache key: what identifies the data key a message's header asks
        for (its suite, sorted serialized EDKs and serialized decryption context).

        Usually those bytes themselves, in a tuple: the cache is this manager's own, and
        a tuple of a few hundred bytes hashes in a tenth of the time SHA-384 takes (the
        bytes of the context are the header's, whose hash Python keeps). Each part is its
        own element, so no two inputs give one key. Past :data:`_PLAIN_KEY_MAX_BYTES` (or
        :data:`_PLAIN_KEY_MAX_EDKS` EDKs) they are digested instead (SHA-384
        over the length-prefixed parts, the partition and b"decrypt" first), so that an
        entry costs 48 bytes however large or many a message's EDKs are; a digest
        (``bytes``) never equals a tuple."""
        if len(sorted_edks) <= _PLAIN_KEY_MAX_EDKS:
            size = len(serialized_context)
            for edk in sorted_edks:
                size += len(edk)
            if size <= _PLAIN_KEY_MAX_BYTES:
                return (suite.suite_id, *sorted_edks, serialized_context)
        parts = [self._decrypt_key_head, _SUITE_PARTS[suite.suite_id]]
        for edk in sorted_edks:
            parts += (_U64.pack(len(edk)), edk)
        parts += (_CONTEXT_PART, _U64.pack(len(serialized_context)), serialized_context)
        return hashlib.sha384(b"".join(parts)).digest()

    async def decryption_plan(
        self, header: MessageHeader, reproduced_context: Mapping[str, str] | None
    ) -> DecryptionPlan:
        """The data key (cached, coalesced or from the keyring) and verifier for
        ``header``."""
        materials, verifier = await self.decryption_materials(header, reproduced_context)
        return decryption_plan_of(materials, verifier)

    async def decryption_materials(
        self,
        header: MessageHeader,
        reproduced_context: Mapping[str, str] | None,
        *,
        serialized_edks: tuple[bytes, int, int] | None = None,
    ) -> tuple[DecryptionMaterials, Verifier | None]:
        """:meth:`decryption_plan`'s materials and verifier, without the plan object
        (the one-frame path's, once per message). ``serialized_edks``: where the header's encrypted data keys are
        serialized in the message (buffer, start, end), when the caller has them in hand:
        with one EDK that is the decrypt cache key's input as it is, with no
        serialization and nothing to sort."""
        inner = self.inner
        suite = header.algorithm_suite
        if not suite.committing:  # committing suites pass every policy
            inner.check_policy(header)
        context, required = merge_reproduced_context(header, reproduced_context)
        verifier = (
            verifier_for(header, context)
            if suite.signing or PUBLIC_KEY_FIELD in context  # else it is None
            else None
        )
        cache = self._decrypt if suite.info.kdf_hash is not None else None
        if cache is None:
            # No cache, no sharing: every message makes its own call (the contract of
            # cache=None, e.g. for a per-message audit trail; never for identity KDFs).
            # The keyring asks for the serialized context only if it needs it.
            return await inner.decryption_materials(header, context, required), verifier
        # Made once, with the cache key, and passed on to the keyring (the raw AES
        # keyring's AAD).
        serialized_context = decryption_context_bytes(header, context, required)
        edks = header.encrypted_data_keys
        key: Hashable
        if serialized_edks is not None and len(edks) == 1:
            # One EDK in place in the message: nothing to serialize or sort, and a small
            # key is _decrypt_key's tuple, made here without the call.
            buf, start, end = serialized_edks
            if end - start + len(serialized_context) <= _PLAIN_KEY_MAX_BYTES:
                key = (suite.suite_id, buf[start:end], serialized_context)
            else:
                key = self._decrypt_key(suite, [buf[start:end]], serialized_context)
        else:
            sorted_edks = sorted(edk.serialize() for edk in edks)
            key = self._decrypt_key(suite, sorted_edks, serialized_context)
        try:
            # One lookup (``get`` is ``in`` then ``[]``: two, each reading the clock);
            # an expired entry raises KeyError as a missing one does.
            entry: _DecryptEntry | None = cache[key]
        except KeyError:
            entry = None
        if entry is not None:
            self._stats.decrypt_cache_hits += 1
            if self._observer is not None:
                self._observer.cache_lookup("decrypt", True)
            return entry.use(), verifier
        self._stats.decrypt_cache_misses += 1
        if self._observer is not None:
            self._observer.cache_lookup("decrypt", False)

        async def fetch_and_cache() -> DecryptionMaterials:
            # The decrypt rate limit is charged per KMS call, inside the keyrings
            # (Runtime.admit_remote_decrypt): one miss can try many EDKs.
            materials = await inner.decryption_materials(
                header, context, required, serialized_context
            )
            cache[key] = _DecryptEntry(materials)
            return materials

        # The partition, as before the key left it out: managers of one client (its
        # re-encryption targets) share the coalescer.
        materials = await self._coalescer.run(("decrypt", self._partition, key), fetch_and_cache)
        return materials, verifier
