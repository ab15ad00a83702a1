"""Raw RSA keyring: wraps data keys with a local RSA key pair, ESDK-compatible."""

from __future__ import annotations

from collections.abc import Sequence

import anyio.to_thread
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import ConfigurationError, NoUsableKeyError
from ..format.header import EncryptedDataKey
from ._naming import check_raw_names
from .base import DecryptionMaterials, EncryptionMaterials, Keyring, shown_name

__all__ = ["RawRsaKeyring"]

_OAEP_HASHES = (hashes.SHA1, hashes.SHA256, hashes.SHA384, hashes.SHA512)


def _describe_padding(pad: asym_padding.AsymmetricPadding) -> str:
    if isinstance(pad, asym_padding.PKCS1v15):
        return "PKCS1v15"
    if isinstance(pad, asym_padding.OAEP):
        hash_alg = pad.algorithm
        mgf = pad.mgf
        # MGF1 exposes its hash only as a private attribute; read it to refuse mismatches.
        mgf_hash = getattr(mgf, "_algorithm", None)
        if (
            isinstance(mgf, asym_padding.MGF1)
            and isinstance(hash_alg, _OAEP_HASHES)
            and type(mgf_hash) is type(hash_alg)
            and pad._label in (None, b"")
        ):
            return f"OAEP-MGF1-{hash_alg.name.upper()}"
    raise ConfigurationError(
        "padding must be PKCS1v15() or OAEP(mgf=MGF1(H), algorithm=H, label=None) with H one "
        "of SHA1, SHA256, SHA384, SHA512"
    )


def _wrong_key_type(name: str, value: object) -> str:
    """What to say when a key is not a key object; never the value (a PEM is a key)."""
    kind = "RSAPrivateKey" if name == "private_key" else "RSAPublicKey"
    loader = "load_pem_private_key" if name == "private_key" else "load_pem_public_key"
    said = f"{name} must be a cryptography {kind}, not {type(value).__name__}"
    if isinstance(value, (str, bytes, bytearray)):
        said += (
            f": load a PEM or DER key first, with cryptography.hazmat.primitives."
            f"serialization.{loader} (or the load_der_ function)"
        )
    return said


class RawRsaKeyring(Keyring):
    """Wraps with a local RSA public key, unwraps with the private key.

    The encryption context is not bound to the EDK (RSA has no AAD); it is still
    authenticated by the message header. Private-key operations run in a worker thread:
    an RSA-4096 decryption takes milliseconds and would stall the event loop.
    """

    def __init__(
        self,
        key_namespace: str,
        key_name: str,
        *,
        private_key: rsa.RSAPrivateKey | None = None,
        public_key: rsa.RSAPublicKey | None = None,
        padding: asym_padding.AsymmetricPadding | None = None,
    ) -> None:
        check_raw_names(key_namespace, key_name)
        if private_key is None and public_key is None:
            raise ConfigurationError("RawRsaKeyring needs a private_key, a public_key or both")
        if private_key is not None and not isinstance(private_key, rsa.RSAPrivateKey):
            raise ConfigurationError(_wrong_key_type("private_key", private_key))
        if public_key is not None and not isinstance(public_key, rsa.RSAPublicKey):
            raise ConfigurationError(_wrong_key_type("public_key", public_key))
        if private_key is not None:
            derived = private_key.public_key()
            if public_key is not None and public_key.public_numbers() != derived.public_numbers():
                raise ConfigurationError("public_key does not belong to private_key")
            public_key = derived
        if padding is None:
            padding = asym_padding.OAEP(
                mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
            )
        self._padding_name = _describe_padding(padding)
        self.key_namespace = key_namespace
        self.key_name = key_name
        self._private = private_key
        self._public = public_key
        self._padding = padding
        self._name_bytes = key_name.encode("utf-8")

    def __repr__(self) -> str:
        keys = "private+public" if self._private is not None else "public only"
        return (
            f"RawRsaKeyring(key_namespace={self.key_namespace!r}, key_name={self.key_name!r}, "
            f"padding={self._padding_name}, keys={keys})"
        )

    @property
    def _description(self) -> str:
        return f"the raw RSA keyring {shown_name(self.key_namespace)}/{shown_name(self.key_name)}"

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        if self._public is None:  # unreachable by construction; kept for type narrowing
            raise ConfigurationError(f"{self!r} has no public key to encrypt with")
        if materials.plaintext_data_key is None:
            materials = materials.generate_data_key()
        assert materials.plaintext_data_key is not None
        wrapped = self._public.encrypt(materials.plaintext_data_key, self._padding)
        edk = EncryptedDataKey(self.key_namespace, self._name_bytes, wrapped)
        return materials.with_encrypted_data_key(edk)

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        if materials.plaintext_data_key is not None:
            return materials
        private = self._private
        if private is None:
            raise NoUsableKeyError(f"{self._description} has no private key, so it cannot decrypt")
        key_length = materials.algorithm_suite.key_length
        candidates = [
            edk.ciphertext
            for edk in encrypted_data_keys
            if edk.provider_id == self.key_namespace and edk.provider_info == self._name_bytes
        ]

        def unwrap() -> bytes | None:
            for ciphertext in candidates:
                try:
                    data_key = private.decrypt(ciphertext, self._padding)
                except ValueError:
                    continue
                if len(data_key) == key_length:
                    return data_key
            return None

        data_key = await anyio.to_thread.run_sync(unwrap) if candidates else None
        if data_key is None:
            why = (
                "wrong private key, or another padding than the one used to encrypt"
                if candidates
                else "the message was not encrypted for this key"
            )
            raise NoUsableKeyError(
                f"{self._description} could not decrypt any of the message's "
                f"{len(encrypted_data_keys)} encrypted data keys ({len(candidates)} named this "
                f"key): {why}"
            )
        return materials.with_data_key(data_key)
