"""Multi-keyring: one generator plus children that wrap the same data key."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from .._concurrency import gather_in_order
from ..errors import (
    CircuitOpenError,
    ConfigurationError,
    KeyringError,
    KeyServiceError,
    NoUsableKeyError,
)
from ..format.header import EncryptedDataKey
from .base import DecryptionMaterials, EncryptionMaterials, Keyring

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["MultiKeyring"]


class MultiKeyring(Keyring):
    """Encrypt: the generator makes the data key, every child wraps it too (concurrently).
    Decrypt: try the generator, then each child, until one recovers the key."""

    def __init__(self, generator: Keyring | None = None, children: Sequence[Keyring] = ()) -> None:
        if generator is None and not children:
            raise ConfigurationError("MultiKeyring needs a generator, children, or both")
        for keyring in (generator, *children):
            if keyring is not None and not isinstance(keyring, Keyring):
                raise ConfigurationError(f"{keyring!r} is not a Keyring")
        self.generator = generator
        self.children = tuple(children)

    def __repr__(self) -> str:
        return f"MultiKeyring(generator={self.generator!r}, children={list(self.children)!r})"

    @property
    def _all(self) -> tuple[Keyring, ...]:
        return ((self.generator,) if self.generator else ()) + self.children

    @property
    def caches_data_keys(self) -> bool:  # type: ignore[override]
        """Reuse and caching pay when any member calls out per data key (a KMS child
        wraps each new data key with a KMS Encrypt call)."""
        return any(keyring.caches_data_keys for keyring in self._all)

    def attach(self, runtime: Runtime) -> None:
        for keyring in self._all:
            keyring.attach(runtime)

    async def open(self) -> None:
        for keyring in self._all:
            await keyring.open()

    async def close(self) -> None:
        for keyring in reversed(self._all):
            await keyring.close()

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        if self.generator is not None:
            materials = await self.generator.on_encrypt(materials)
        if materials.plaintext_data_key is None:
            raise KeyringError(
                "MultiKeyring has no generator and no data key was supplied; give it a generator"
            )
        if not self.children:
            return materials
        base = materials
        # Children wrap the same data key concurrently (KMS children are round trips).
        results = await gather_in_order(
            [partial(child.on_encrypt, base) for child in self.children]
        )
        for result in results:
            for edk in result.encrypted_data_keys[len(base.encrypted_data_keys) :]:
                materials = materials.with_encrypted_data_key(edk)
        return materials

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        if materials.plaintext_data_key is not None:
            return materials
        reasons: list[str] = []
        unavailable: list[KeyServiceError | CircuitOpenError] = []
        for keyring in self._all:
            try:
                result = await keyring.on_decrypt(materials, encrypted_data_keys)
            except CircuitOpenError as exc:  # a key service is down: the next child may do
                unavailable.append(exc)
                reasons.append(str(exc))
                continue
            except KeyringError as exc:
                if isinstance(exc, KeyServiceError) and exc.transient:
                    unavailable.append(exc)
                reasons.append(str(exc))
                continue
            if result.plaintext_data_key is not None:
                return result
        if unavailable:
            # A child that could not be asked might have held the key: "try again later"
            # (a 503 in the web integrations), not "wrong key".
            raise unavailable[0]
        raise NoUsableKeyError(
            "no keyring in the MultiKeyring could decrypt the message: " + "; ".join(reasons)
        )
