"""Counters a user can read: ``client.stats`` returns a :class:`ClientStats` snapshot."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

__all__ = ["ClientStats", "StatsRecorder"]


@dataclass(frozen=True)
class ClientStats:
    """A snapshot of one client's counters since it was created.

    ``kms_calls`` counts AWS KMS calls by operation (a hierarchical keyring's branch key
    fetches included), ``dynamodb_calls`` the DynamoDB calls of a branch key store.
    ``branch_key_cache_hits``/``misses`` count a hierarchical keyring's lookups of a
    branch key (a miss is one GetItem + one KMS Decrypt, or a wait on one in flight).
    ``messages_*``/``bytes_*`` count messages completed and plaintext bytes sealed or
    released (a stream's bytes as they go, its message when it ends)."""

    kms_calls: Mapping[str, int]
    dynamodb_calls: Mapping[str, int]
    encrypt_cache_hits: int
    encrypt_cache_misses: int
    decrypt_cache_hits: int
    decrypt_cache_misses: int
    coalesced_waits: int
    rate_limited: int
    breaker_states: Mapping[str, str]
    breaker_transitions: int
    branch_key_cache_hits: int
    branch_key_cache_misses: int
    messages_encrypted: int = 0
    messages_decrypted: int = 0
    bytes_encrypted: int = 0
    bytes_decrypted: int = 0

    def __repr__(self) -> str:
        # Plain dicts, not the read-only views' ``mappingproxy({...})``.
        shown = (
            f"{f.name}={dict(value) if isinstance(value, Mapping) else value!r}"
            for f in fields(self)
            for value in (getattr(self, f.name),)
        )
        return f"ClientStats({', '.join(shown)})"


@dataclass(eq=False)  # compared and hashed by identity: telemetry keeps them in a WeakKeyDictionary
class StatsRecorder:
    """The live counters (mutated in place; single event loop, so no locking)."""

    kms_calls: collections.Counter[str] = field(default_factory=collections.Counter)
    dynamodb_calls: collections.Counter[str] = field(default_factory=collections.Counter)
    encrypt_cache_hits: int = 0
    encrypt_cache_misses: int = 0
    decrypt_cache_hits: int = 0
    decrypt_cache_misses: int = 0
    coalesced_waits: int = 0
    rate_limited: int = 0
    breaker_states: dict[str, str] = field(default_factory=dict)
    breaker_transitions: int = 0
    branch_key_cache_hits: int = 0
    branch_key_cache_misses: int = 0
    messages_encrypted: int = 0
    messages_decrypted: int = 0
    bytes_encrypted: int = 0
    bytes_decrypted: int = 0

    def snapshot(self) -> ClientStats:
        return ClientStats(
            kms_calls=MappingProxyType(dict(self.kms_calls)),
            dynamodb_calls=MappingProxyType(dict(self.dynamodb_calls)),
            encrypt_cache_hits=self.encrypt_cache_hits,
            encrypt_cache_misses=self.encrypt_cache_misses,
            decrypt_cache_hits=self.decrypt_cache_hits,
            decrypt_cache_misses=self.decrypt_cache_misses,
            coalesced_waits=self.coalesced_waits,
            rate_limited=self.rate_limited,
            breaker_states=MappingProxyType(dict(self.breaker_states)),
            breaker_transitions=self.breaker_transitions,
            branch_key_cache_hits=self.branch_key_cache_hits,
            branch_key_cache_misses=self.branch_key_cache_misses,
            messages_encrypted=self.messages_encrypted,
            messages_decrypted=self.messages_decrypted,
            bytes_encrypted=self.bytes_encrypted,
            bytes_decrypted=self.bytes_decrypted,
        )
