"""Hierarchical keyring: data keys wrapped under branch keys kept in a BranchKeyStore.

One KMS Decrypt (and one DynamoDB GetItem) yields a branch key that then wraps any
number of data keys locally, so per-record encryption contexts cost no KMS call each.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache

from ...coalesce import Coalescer
from ...errors import BranchKeyNotFoundError, ConfigurationError, NoUsableKeyError
from ...format.header import EncryptedDataKey
from ...stats import StatsRecorder
from ..base import DecryptionMaterials, EncryptionMaterials, Keyring, _evolve
from . import wrapping
from .branch_key_store import BranchKeyMaterials, BranchKeyStore

if TYPE_CHECKING:
    from ...runtime import Runtime

__all__ = ["HierarchicalKeyring"]

BranchKeyIdSupplier = Callable[[Mapping[str, str]], "str | Awaitable[str]"]

_MAX_REFETCH = 3


class _WipingTTLCache(TTLCache[tuple[str, str], BranchKeyMaterials]):
    """A TTLCache that wipes branch-key materials when they leave it: evicted for size,
    expired, or deleted. Without this an expired key would stay in memory until the
    garbage collector happened to run. ``on_wipe`` hears of each wiped value (the
    keyring drops its fast-path references to it)."""

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        timer: Callable[[], float],
        on_wipe: Callable[[BranchKeyMaterials], None],
    ) -> None:
        super().__init__(maxsize, ttl, timer=timer)
        self._on_wipe = on_wipe

    def _wipe(self, value: Any) -> None:
        if isinstance(value, BranchKeyMaterials):
            self._on_wipe(value)
            value.wipe()

    def __setitem__(self, key: Any, value: Any) -> None:
        old = self.get(key)
        super().__setitem__(key, value)
        if old is not value:
            self._wipe(old)  # replaced (the same version fetched again): cachetools drops it

    def __delitem__(self, key: Any) -> None:
        value = self.get(key)
        super().__delitem__(key)
        self._wipe(value)

    def expire(self, time: float | None = None) -> list[tuple[Any, Any]]:
        expired: list[tuple[Any, Any]] = list(super().expire(time))
        for _, value in expired:
            self._wipe(value)
        return expired

    def popitem(self) -> tuple[Any, Any]:
        key, value = super().popitem()
        self._wipe(value)
        return key, value

    def wipe_all(self) -> None:
        """Zero and drop every entry. (``clear()`` alone would not zero: cachetools'
        ``clear`` empties its storage without going through ``__delitem__``; and
        expired entries are not listed by ``values()``: ``expire()`` zeroes them.)"""
        self.expire()
        for value in list(self.values()):
            self._wipe(value)
        self.clear()


def _check_encodable(branch_key_id: str) -> None:
    """A branch key ID travels as UTF-8 (EDK provider info, the AAD, the table's key)."""
    try:
        branch_key_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"branch key ID {branch_key_id!r} is not encodable as UTF-8 (a lone surrogate)"
        ) from None


class HierarchicalKeyring(Keyring):
    """Wraps each data key under the active version of a branch key ("aws-kms-hierarchy"
    EDKs, MPL-compatible); decrypts with the version each EDK names.

    Every message gets its own data key: wrapping is local, so the client's data-key
    reuse (``CacheConfig``) and decrypt cache are not used for this keyring; what is
    cached is the branch key, per (ID, version), for ``ttl`` seconds."""

    caches_data_keys = False

    def __init__(
        self,
        key_store: BranchKeyStore,
        *,
        branch_key_id: str | None = None,
        branch_key_id_supplier: BranchKeyIdSupplier | None = None,
        ttl: float = 600.0,
        max_cached_keys: int = 1000,
    ) -> None:
        if (branch_key_id is None) == (branch_key_id_supplier is None):
            raise ConfigurationError("give exactly one of branch_key_id or branch_key_id_supplier")
        if branch_key_id is not None and (not isinstance(branch_key_id, str) or not branch_key_id):
            raise ConfigurationError("branch_key_id must be a non-empty string")
        if branch_key_id is not None:
            _check_encodable(branch_key_id)
        if branch_key_id_supplier is not None and not callable(branch_key_id_supplier):
            raise ConfigurationError("branch_key_id_supplier must be callable")
        if not ttl > 0:
            raise ConfigurationError("ttl must be a positive number of seconds")
        if not isinstance(max_cached_keys, int) or max_cached_keys < 1:
            raise ConfigurationError("max_cached_keys must be a positive integer")
        self.key_store = key_store
        self.branch_key_id = branch_key_id
        self._supplier = branch_key_id_supplier
        self._ttl = ttl
        self._max = max_cached_keys
        # The caches read the client's clock once attached (tests move a fake one).
        self._clock: Callable[[], float] = time.monotonic
        self._runtime: Runtime | None = None
        self._keys = _WipingTTLCache(max_cached_keys, ttl, self._now, self._forget)
        self._active: TTLCache[str, str] = TTLCache(max_cached_keys, ttl, timer=self._now)
        # The per-message fast path, in front of the two caches above (two TTLCache
        # lookups cost ~2.5 us of a ~45 us message): branch key ID -> the active
        # version's materials, and (ID, version) -> materials, each with the time its
        # cache entry expires. An entry is dropped when its materials leave ``_keys``
        # (``_forget``: eviction, expiry, replacement, close) or on rotation, so it never
        # outlives the caches or hands out a zeroed key.
        self._hot_active: dict[str, tuple[BranchKeyMaterials, float]] = {}
        self._hot_versions: dict[tuple[str, str], tuple[BranchKeyMaterials, float]] = {}
        self._expire_due = math.inf  # see _expire_if_due
        # Concurrent misses share one fetch, which belongs to no caller (a caller that
        # is cancelled leaves it running for the others). Replaced on attach by one
        # that counts waits in the client's stats.
        self._coalescer = Coalescer(StatsRecorder())
        # Branch keys whose active version is being fetched, and those of them that the
        # store rotated meanwhile: that answer may name the old version, so it is not
        # cached as the active one.
        self._fetching_active: set[str] = set()
        self._rotated_while_fetching: set[str] = set()

    def __repr__(self) -> str:
        which = (
            f"branch_key_id={self.branch_key_id!r}"
            if self.branch_key_id is not None
            else "branch_key_id_supplier=<callable>"
        )
        return f"HierarchicalKeyring({self.key_store!r}, {which}, ttl={self._ttl})"

    def _now(self) -> float:
        return self._clock()

    def attach(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._clock = runtime.clock
        self._coalescer = Coalescer(runtime.stats)
        self.key_store.attach(runtime)
        self.key_store.notify_rotations_to(self)

    def branch_key_rotated(self, branch_key_id: str) -> None:
        """Called by the key store when it rotated ``branch_key_id``: the next message
        uses the new version at once instead of after the TTL. The old version stays
        cached for decryption."""
        self._active.pop(branch_key_id, None)
        self._hot_active.pop(branch_key_id, None)
        if branch_key_id in self._fetching_active:
            self._rotated_while_fetching.add(branch_key_id)

    def _count(self, *, hit: bool) -> None:
        runtime = self._runtime
        if runtime is not None:
            if hit:
                runtime.stats.branch_key_cache_hits += 1
            else:
                runtime.stats.branch_key_cache_misses += 1
            runtime.observer.cache_lookup("branch_key", hit)

    async def open(self) -> None:
        await self.key_store.open()

    async def close(self) -> None:
        try:
            await self._coalescer.aclose()
            self._keys.wipe_all()
            self._active.clear()
            self._hot_active.clear()
            self._hot_versions.clear()
        finally:
            await self.key_store.close()

    async def _branch_key_id_for(self, context: Mapping[str, str]) -> str:
        if self.branch_key_id is not None:
            return self.branch_key_id
        assert self._supplier is not None
        try:
            result = self._supplier(context)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            # Typically a context without the key the supplier reads (KeyError): the
            # caller's mistake, reported as ours, with the context's keys (not values).
            raise ConfigurationError(
                f"branch_key_id_supplier raised {type(exc).__name__}: {exc} (for an "
                f"encryption context with keys {sorted(context)}): every message under "
                "this keyring needs a context the supplier can map to a branch key ID"
            ) from exc
        if not isinstance(result, str) or not result:
            raise ConfigurationError("branch_key_id_supplier must return a non-empty string")
        _check_encodable(result)
        return result

    async def _fetch_active(self, branch_key_id: str) -> None:
        """Fetch the active version and cache it, as a version and as the active one."""
        self._fetching_active.add(branch_key_id)
        try:
            materials = await self.key_store.get_active_branch_key(branch_key_id)
        finally:
            self._fetching_active.discard(branch_key_id)
            rotated = branch_key_id in self._rotated_while_fetching
            self._rotated_while_fetching.discard(branch_key_id)
        until = self._remember(materials)
        if not rotated:
            self._active[branch_key_id] = materials.version
            self._hot_active[branch_key_id] = (materials, until)

    async def _fetch_version(self, branch_key_id: str, version: str) -> None:
        materials = await self.key_store.get_branch_key_version(branch_key_id, version)
        self._remember(materials)

    def _expire_if_due(self) -> None:
        """Expire (and so zero) branch keys whose TTL passed, as the first step of each
        message: at the next use, not at the next insertion, which may never come
        (cachetools expires lazily). Only when one may be due: ``_expire_due`` is the
        earliest ``until`` of the cached keys, never later than their cache entries
        expire, so ``expire()``, a walk through the cache's links, runs about once a TTL
        instead of once a message."""
        if self._clock() >= self._expire_due:
            self._keys.expire()
            self._expire_due = min(
                (until for _, until in self._hot_versions.values()), default=math.inf
            )

    def _remember(self, materials: BranchKeyMaterials) -> float:
        """Cache ``materials`` as their (ID, version), on the fast path too; returns
        when the fast path stops answering for them: the clock read before they entered
        ``_keys`` (monotonic), plus the TTL, so never after cachetools expires them.
        ``_forget`` drops them from the fast path the moment they leave ``_keys``."""
        until = self._now() + self._ttl
        self._expire_due = min(self._expire_due, until)
        key = (materials.branch_key_id, materials.version)
        self._keys[key] = materials
        self._hot_versions[key] = (materials, until)
        return until

    def _forget(self, materials: BranchKeyMaterials) -> None:
        """``materials`` are leaving ``_keys`` and about to be zeroed."""
        key = (materials.branch_key_id, materials.version)
        if self._hot_versions.get(key, (None,))[0] is materials:
            del self._hot_versions[key]
        if self._hot_active.get(materials.branch_key_id, (None,))[0] is materials:
            del self._hot_active[materials.branch_key_id]

    def _cached_active(self, branch_key_id: str) -> BranchKeyMaterials | None:
        hot = self._hot_active.get(branch_key_id)
        if hot is not None and self._clock() < hot[1]:
            return hot[0]
        version = self._active.get(branch_key_id)
        if version is None:
            return None
        materials: BranchKeyMaterials | None = self._keys.get((branch_key_id, version))
        return materials

    def _cached_version(self, branch_key_id: str, version: str) -> BranchKeyMaterials | None:
        hot = self._hot_versions.get((branch_key_id, version))
        if hot is not None and self._clock() < hot[1]:
            return hot[0]
        materials: BranchKeyMaterials | None = self._keys.get((branch_key_id, version))
        return materials

    async def _active_key(self, branch_key_id: str) -> BranchKeyMaterials:
        """The active version's materials, usable right now (callers must not await
        before using them: an eviction in between would have wiped them)."""
        for attempt in range(_MAX_REFETCH):
            cached = self._cached_active(branch_key_id)
            if cached is not None:
                if attempt == 0:
                    self._count(hit=True)
                return cached
            if attempt == 0:
                self._count(hit=False)
            await self._coalescer.run(
                ("active", branch_key_id), partial(self._fetch_active, branch_key_id)
            )
        cached = self._cached_active(branch_key_id)
        if cached is None:
            raise NoUsableKeyError(
                f"the active version of branch key {branch_key_id!r} could not be held after "
                f"{_MAX_REFETCH} fetches: it was rotated during each of them (retry), or "
                "other branch keys pushed it out of the cache at once (raise max_cached_keys)"
            )
        return cached

    async def _version_key(self, branch_key_id: str, version: str) -> BranchKeyMaterials:
        for attempt in range(_MAX_REFETCH):
            cached = self._cached_version(branch_key_id, version)
            if cached is not None:
                if attempt == 0:
                    self._count(hit=True)
                return cached
            if attempt == 0:
                self._count(hit=False)
            await self._coalescer.run(
                ("version", branch_key_id, version),
                partial(self._fetch_version, branch_key_id, version),
            )
        cached = self._keys.get((branch_key_id, version))
        if cached is None:
            raise NoUsableKeyError(
                f"branch key {branch_key_id!r} version {version} left the cache as soon as "
                "it was fetched: raise max_cached_keys"
            )
        return cached

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        self._expire_if_due()
        branch_key_id = self.branch_key_id or await self._branch_key_id_for(
            materials.encryption_context
        )
        # _active_key's first look, without its coroutine when the key is cached.
        branch_key = self._cached_active(branch_key_id)
        if branch_key is not None:
            self._count(hit=True)
        else:
            branch_key = await self._active_key(branch_key_id)
        data_key = materials.plaintext_data_key
        generated = data_key is None
        if data_key is None:
            data_key = os.urandom(materials.algorithm_suite.key_length)
        # No await from here on: the branch key cannot be wiped under us. Its length was
        # checked when it was fetched; the ID and version bytes come from the memos.
        id_bytes = wrapping._encoded_id(branch_key_id)
        ciphertext = wrapping._seal(
            branch_key.key,
            id_bytes,
            wrapping._parsed_version(branch_key.version),
            data_key,
            materials.serialized_encryption_context,  # kept: the header reuses it
        )
        edk = EncryptedDataKey._of(wrapping.PROVIDER_ID, id_bytes, ciphertext)
        if generated:  # one copy of the materials instead of two
            return materials._with_key_and_edk(data_key, edk)
        return materials.with_encrypted_data_key(edk)

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        if materials.plaintext_data_key is not None:
            return materials
        self._expire_if_due()
        branch_key_id = self.branch_key_id or await self._branch_key_id_for(
            materials.encryption_context
        )
        wanted = wrapping._encoded_id(branch_key_id)
        edk_length = wrapping.edk_length(materials.algorithm_suite.key_length)
        missing: BranchKeyNotFoundError | None = None
        named = 0
        for edk in encrypted_data_keys:
            if edk.provider_id != wrapping.PROVIDER_ID or edk.provider_info != wanted:
                continue
            named += 1
            ciphertext = edk.ciphertext
            if type(ciphertext) is not bytes:  # a caller's own EDK may hold a buffer
                if not isinstance(ciphertext, (bytearray, memoryview)):
                    continue
                ciphertext = bytes(ciphertext)
            if len(ciphertext) != edk_length:
                continue  # malformed, or another suite's: not worth a fetch
            version_bytes = ciphertext[wrapping._VERSION_START : wrapping._CIPHERTEXT_START]
            version = wrapping._version_string(version_bytes)
            # _version_key's first look, without its coroutine when the key is cached.
            branch_key = self._cached_version(branch_key_id, version)
            if branch_key is not None:
                self._count(hit=True)
            else:
                try:
                    branch_key = await self._version_key(branch_key_id, version)
                except NoUsableKeyError:
                    continue
                except BranchKeyNotFoundError as exc:
                    # A version this table does not have (an EDK from another key store
                    # with the same branch key ID, or a changed version field): the next
                    # EDK may still open, as the MPL's keyring tries each in turn.
                    # Outages and integrity failures are raised at once.
                    missing = missing or exc
                    continue
            # No await since the branch key was found: it cannot have been wiped. The
            # EDK has the suite's length and names this version (the key was looked up
            # by it).
            data_key = wrapping._open(
                branch_key.key,
                wanted,
                version_bytes,
                ciphertext,
                materials.serialized_encryption_context,  # once, whatever the EDKs
            )
            if data_key is None:
                continue  # the tag failed: another context, a changed EDK, another key
            # with_data_key without its checks: the slot is empty (tested above) and the
            # key has the suite's length (the EDK's length was).
            return _evolve(materials, plaintext_data_key=data_key)
        if missing is not None:
            raise missing  # says which version of which branch key the table lacks
        # Raised, as the raw keyrings do: the default materials manager turns an
        # unchanged result into a bare KeyringError, and MultiKeyring catches this one.
        raise NoUsableKeyError(
            f"the hierarchical keyring with branch key {branch_key_id!r} (table "
            f"{self.key_store.table_name!r}) could not decrypt any of the message's "
            f"{len(encrypted_data_keys)} encrypted data keys ({named} named this branch "
            "key): "
            + (
                "the encryption context differs, or the encrypted data key was changed"
                if named
                else "the message was written under another branch key"
            )
        )
