"""A test-only hierarchical keyring over a dict of branch keys: no key store, no server.

It implements the public ``Keyring`` interface with the pure wrapping functions, so the
MPL's messages can be decrypted (and ours written) with known branch keys. The real
keyring fetches and caches branch keys from DynamoDB; this one is handed them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aioenvelope import DecryptionMaterials, EncryptedDataKey, EncryptionMaterials, Keyring
from aioenvelope.errors import NoUsableKeyError
from aioenvelope.keyrings.hierarchy.wrapping import (
    PROVIDER_ID,
    branch_key_version_of,
    unwrap_data_key,
    wrap_data_key,
)

__all__ = ["StaticBranchKeyring"]


class StaticBranchKeyring(Keyring):
    """Wraps under ``branch_keys[active_version]``; unwraps any EDK of this branch key ID
    whose version is in ``branch_keys``."""

    def __init__(
        self, branch_key_id: str, branch_keys: Mapping[str, bytes], active_version: str
    ) -> None:
        self.branch_key_id = branch_key_id
        self._info = branch_key_id.encode("utf-8")
        self._keys = dict(branch_keys)
        self.active_version = active_version

    def __repr__(self) -> str:
        return f"StaticBranchKeyring({self.branch_key_id!r}, versions={sorted(self._keys)})"

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        if materials.plaintext_data_key is None:
            materials = materials.generate_data_key()
        assert materials.plaintext_data_key is not None
        wrapped = wrap_data_key(
            self._keys[self.active_version],
            self.branch_key_id,
            self.active_version,
            materials.plaintext_data_key,
            materials.encryption_context,
        )
        return materials.with_encrypted_data_key(EncryptedDataKey(PROVIDER_ID, self._info, wrapped))

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        if materials.plaintext_data_key is not None:
            return materials
        failures: list[str] = []
        for edk in encrypted_data_keys:
            if edk.provider_id != PROVIDER_ID or edk.provider_info != self._info:
                continue
            try:
                version = branch_key_version_of(edk.ciphertext)
                if version not in self._keys:
                    failures.append(f"version {version} is not known")
                    continue
                data_key = unwrap_data_key(
                    self._keys[version],
                    self.branch_key_id,
                    version,
                    edk.ciphertext,
                    materials.encryption_context,
                    key_length=materials.algorithm_suite.key_length,
                )
            except NoUsableKeyError as exc:
                failures.append(str(exc))
                continue
            return materials.with_data_key(data_key)
        raise NoUsableKeyError(
            f"{self!r} could not unwrap any of {len(encrypted_data_keys)} EDKs: {failures}"
        )
