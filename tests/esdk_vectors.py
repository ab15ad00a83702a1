"""Read the AWS Encryption SDK's decrypt test vectors in place, and build keyrings for them.

A bundle is one zip from the ESDK's ``TestVectors`` (manifest type ``awses-decrypt``,
version 4) holding ``manifest.json``, ``keys.json``, ``ciphertexts/<id>`` and
``plaintexts/<name>``. The reader refuses whatever it does not understand, so a change
in the vector format fails loudly instead of quietly testing less.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from aioenvelope import Keyring, MultiKeyring, RawAesKeyring, RawRsaKeyring

__all__ = [
    "DEFAULT_DIR",
    "ENV_VAR",
    "DecryptVector",
    "KeySpec",
    "MasterKey",
    "VectorBundle",
    "VectorFormatError",
    "load_bundle",
    "raw_keyring",
    "vectors_dir",
]

ENV_VAR = "AIOENVELOPE_ESDK_VECTORS"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = (PROJECT_ROOT / ".." / "shared" / "esdk-vectors").resolve()

_FILE_URI = "file://"
_CMMS = frozenset({"Default", "RequiredEncryptionContext"})
_OAEP_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class VectorFormatError(ValueError):
    """A manifest or key file says something this reader does not understand."""


def vectors_dir() -> Path:
    """``$AIOENVELOPE_ESDK_VECTORS`` when set, else ``../shared/esdk-vectors`` from the root."""
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else DEFAULT_DIR


@dataclass(frozen=True)
class KeySpec:
    """One entry of ``keys.json``; ``material`` is base64 (AES), PEM (RSA) or empty (KMS)."""

    name: str
    type: str  # "symmetric" | "private" | "public" | "aws-kms"
    key_id: str  # the EDK's key name (raw keys) or the key ARN (KMS)
    decrypt: bool
    material: str = field(default="", repr=False)

    @property
    def can_unwrap(self) -> bool:
        """Whether a raw keyring built from this key can recover a data key."""
        return self.decrypt and self.type in ("symmetric", "private")


@dataclass(frozen=True)
class MasterKey:
    """One entry of a vector's ``master-keys``; the RSA fields are empty for AES and KMS."""

    type: str  # "raw" | "aws-kms"
    key: str  # name in keys.json
    provider_id: str = ""  # the EDK's provider ID: a raw keyring's key namespace
    encryption_algorithm: str = ""  # "aes" | "rsa"
    padding_algorithm: str = ""  # "oaep-mgf1" | "pkcs1"
    padding_hash: str = ""


@dataclass(frozen=True)
class DecryptVector:
    """One decrypt test: a ciphertext, the keys to read it with and what should come out."""

    bundle: str
    id: str
    master_keys: tuple[MasterKey, ...]
    cmm: str
    encryption_context: Mapping[str, str]
    ciphertext: bytes = field(repr=False)
    expected_plaintext: bytes | None = field(repr=False)  # None: the manifest expects an error
    keys: Mapping[str, KeySpec] = field(repr=False)

    @property
    def needs_kms(self) -> bool:
        return any(mk.type == "aws-kms" for mk in self.master_keys)

    @property
    def kind(self) -> str:
        """``aws-kms``, or the raw wrapping algorithms used (``aes``, ``rsa``)."""
        if self.needs_kms:
            return "aws-kms"
        return "+".join(sorted({mk.encryption_algorithm for mk in self.master_keys}))

    def keyring(self) -> Keyring:
        """A keyring per listed master key; the ESDK decrypts with all of them, in order."""
        keyrings = [raw_keyring(mk, self.keys[mk.key]) for mk in self.master_keys]
        return keyrings[0] if len(keyrings) == 1 else MultiKeyring(children=keyrings)


@dataclass(frozen=True)
class VectorBundle:
    name: str
    client: str  # the implementation that wrote the ciphertexts, e.g. "ESDK-NET 4.0.0"
    keys: Mapping[str, KeySpec]
    vectors: tuple[DecryptVector, ...]
    ciphertext_files: int  # members under ciphertexts/, to show none went unread


def raw_keyring(master_key: MasterKey, key: KeySpec) -> Keyring:
    """Our raw keyring for one ESDK raw master key (namespace = provider ID)."""
    if master_key.type != "raw":
        raise VectorFormatError(f"master key {master_key.key!r} is {master_key.type}, not raw")
    if master_key.encryption_algorithm == "aes" and key.type == "symmetric":
        wrapping_key = base64.b64decode(key.material, validate=True)
        return RawAesKeyring(master_key.provider_id, key.key_id, wrapping_key)
    if master_key.encryption_algorithm == "rsa" and key.type in ("private", "public"):
        pad = _rsa_padding(master_key)
        if key.type == "private":
            return RawRsaKeyring(
                master_key.provider_id,
                key.key_id,
                private_key=_private_key(key.material),
                padding=pad,
            )
        return RawRsaKeyring(
            master_key.provider_id, key.key_id, public_key=_public_key(key.material), padding=pad
        )
    raise VectorFormatError(
        f"no raw keyring for {master_key.encryption_algorithm!r} with a {key.type} key"
    )


def _rsa_padding(master_key: MasterKey) -> padding.AsymmetricPadding:
    if master_key.padding_algorithm == "pkcs1":
        return padding.PKCS1v15()
    hash_type = _OAEP_HASHES.get(master_key.padding_hash)
    if master_key.padding_algorithm == "oaep-mgf1" and hash_type is not None:
        return padding.OAEP(mgf=padding.MGF1(hash_type()), algorithm=hash_type(), label=None)
    raise VectorFormatError(
        f"unknown RSA padding {master_key.padding_algorithm!r}/{master_key.padding_hash!r}"
    )


@functools.cache
def _private_key(pem: str) -> rsa.RSAPrivateKey:
    """Parsed once: checking an RSA-4096 private key takes ~0.4 s, using it ~5 ms."""
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise VectorFormatError(f"expected an RSA private key, got {type(key).__name__}")
    return key


@functools.cache
def _public_key(pem: str) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    if not isinstance(key, rsa.RSAPublicKey):
        raise VectorFormatError(f"expected an RSA public key, got {type(key).__name__}")
    return key


# -- reading a bundle --------------------------------------------------------------------


def load_bundle(path: Path) -> VectorBundle:
    """Read one zip in place: manifest, keys, every ciphertext and expected plaintext."""
    with zipfile.ZipFile(path) as archive:
        manifest = _read_json(archive, "manifest.json")
        _expect(
            manifest.get("manifest") == {"type": "awses-decrypt", "version": 4},
            f"{path.name}: not an awses-decrypt version 4 manifest",
        )
        key_file = _read_json(archive, _member(manifest["keys"]))
        _expect(key_file.get("manifest", {}).get("type") == "keys", f"{path.name}: no key file")
        keys = MappingProxyType(
            {name: _key_spec(name, entry) for name, entry in key_file["keys"].items()}
        )
        client = f"{manifest['client']['name']} {manifest['client']['version']}"
        vectors = tuple(
            _vector(archive, path.name, vector_id, test, keys)
            for vector_id, test in manifest["tests"].items()
        )
        ciphertext_files = sum(
            1
            for info in archive.infolist()
            if info.filename.startswith("ciphertexts/") and not info.is_dir()
        )
    return VectorBundle(path.name, client, keys, vectors, ciphertext_files)


def _vector(
    archive: zipfile.ZipFile,
    bundle: str,
    vector_id: str,
    test: Mapping[str, Any],
    keys: Mapping[str, KeySpec],
) -> DecryptVector:
    where = f"{bundle}: {vector_id}"
    master_keys = tuple(_master_key(entry, keys, where) for entry in test["master-keys"])
    _expect(bool(master_keys), f"{where}: no master keys")
    cmm = test.get("cmm", "Default")
    _expect(cmm in _CMMS, f"{where}: unknown cmm {cmm!r}")
    context = test.get("encryption-context", {})
    _expect(
        isinstance(context, dict)
        and all(isinstance(x, str) for pair in context.items() for x in pair),
        f"{where}: encryption context is not a str -> str map",
    )
    result = test["result"]
    _expect(
        len(result) == 1 and ("output" in result or "error" in result),
        f"{where}: result is neither output nor error: {result!r}",
    )
    expected = archive.read(_member(result["output"]["plaintext"])) if "output" in result else None
    return DecryptVector(
        bundle=bundle,
        id=vector_id,
        master_keys=master_keys,
        cmm=cmm,
        encryption_context=MappingProxyType(dict(context)),
        ciphertext=archive.read(_member(test["ciphertext"])),
        expected_plaintext=expected,
        keys=keys,
    )


def _master_key(entry: Mapping[str, Any], keys: Mapping[str, KeySpec], where: str) -> MasterKey:
    master_key = MasterKey(
        type=entry["type"],
        key=entry["key"],
        provider_id=entry.get("provider-id", ""),
        encryption_algorithm=entry.get("encryption-algorithm", ""),
        padding_algorithm=entry.get("padding-algorithm", ""),
        padding_hash=entry.get("padding-hash", ""),
    )
    _expect(master_key.key in keys, f"{where}: master key {master_key.key!r} not in keys.json")
    if master_key.type == "raw":
        _expect(
            bool(master_key.provider_id) and master_key.encryption_algorithm in ("aes", "rsa"),
            f"{where}: unsupported raw master key {entry!r}",
        )
    else:
        _expect(
            master_key.type == "aws-kms" and keys[master_key.key].type == "aws-kms",
            f"{where}: unsupported master key {entry!r}",
        )
    return master_key


def _key_spec(name: str, entry: Mapping[str, Any]) -> KeySpec:
    """Error messages name the key, never its material."""
    key = KeySpec(
        name=name,
        type=entry["type"],
        key_id=entry["key-id"],
        decrypt=entry["decrypt"],
        material=entry.get("material", ""),
    )
    _expect(
        key.type in ("symmetric", "private", "public", "aws-kms"),
        f"key {name!r}: unknown type {key.type!r}",
    )
    _expect(isinstance(key.decrypt, bool), f"key {name!r}: 'decrypt' is not a boolean")
    _expect(key.type == "aws-kms" or bool(key.material), f"key {name!r}: no material")
    return key


def _read_json(archive: zipfile.ZipFile, member: str) -> dict[str, Any]:
    data = json.loads(archive.read(member))
    if not isinstance(data, dict):
        raise VectorFormatError(f"{member} in {archive.filename} is not a JSON object")
    return data


def _member(uri: str) -> str:
    """``file://ciphertexts/x`` names the zip member ``ciphertexts/x``."""
    _expect(uri.startswith(_FILE_URI), f"only file:// URIs are supported, got {uri!r}")
    return uri[len(_FILE_URI) :]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise VectorFormatError(message)
