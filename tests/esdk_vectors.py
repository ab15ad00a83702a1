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
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from aioenvelope import Keyring, MultiKeyring, RawAesKeyring, RawRsaKeyring

__all__ = [
    "BUNDLE_NAMES",
    "DEFAULT_DIR",
    "ENV_VAR",
    "EXPECTED_RUN",
    "REQUIRE_VAR",
    "DecryptVector",
    "KeySpec",
    "MasterKey",
    "VectorBundle",
    "VectorFormatError",
    "VectorTally",
    "load_bundle",
    "missing_vectors_message",
    "raw_keyring",
    "vectors_dir",
    "vectors_required",
]

ENV_VAR = "AIOENVELOPE_ESDK_VECTORS"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = (PROJECT_ROOT / ".." / "shared" / "esdk-vectors").resolve()
# CI sets this (``.ci/run``): a missing folder, or any vector test not run as expected,
# fails the session instead of skipping. A fresh clone without the folder gets a skip.
REQUIRE_VAR = "AIOENVELOPE_REQUIRE_ESDK_VECTORS"
BUNDLE_NAMES = ("v4-Net-4.0.1.zip", "valid-Net-4.0.0.zip", "invalid-Net-4.0.0.zip")
ORIGIN = (
    "https://github.com/aws/aws-encryption-sdk, folder TestVectors/dafny/TestVectors/test/ "
    "(Apache-2.0): each of v4-Net-4.0.1/, valid-Net-4.0.0/ and invalid-Net-4.0.0/ zipped "
    "as <name>.zip with that folder's keys.json beside its manifest.json"
)
# What a full run does with the 165 vectors: decrypt 99 + 5, refuse the 28 written by a
# buggy encrypter, skip (with the reason) the 33 that need AWS's own KMS test account.
EXPECTED_RUN = {"decrypted": 104, "refused": 28, "need AWS KMS (skipped)": 33}

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


def vectors_required() -> bool:
    """Whether this run must decrypt the vectors (CI), rather than skip them when absent."""
    return os.environ.get(REQUIRE_VAR, "") not in ("", "0")


def missing_vectors_message(path: Path) -> str:
    """Why the vectors did not run, and where to get them."""
    return (
        f"ESDK test vectors not found at {path}: get them from {ORIGIN}; put "
        f"{', '.join(BUNDLE_NAMES)} in ../shared/esdk-vectors beside the project, or set "
        f"{ENV_VAR} to the folder holding them"
    )


class VectorTally:
    """A pytest plugin: counts what the per-vector tests of ``test_esdk_vectors.py`` did,
    prints it at the end of the run, and under ``$AIOENVELOPE_REQUIRE_ESDK_VECTORS``
    fails the session unless every vector ran as :data:`EXPECTED_RUN` says.

    Counting outcomes, not collected items, is the point: a loader that reads fewer
    vectors, a skip that spreads, or a folder that went missing all change the figures.
    """

    MODULE = "test_esdk_vectors.py"
    # (test function, outcome that counts, when) -> the tally's column
    COLUMNS: Mapping[tuple[str, str], str] = MappingProxyType(
        {
            ("test_vector_decrypts_to_expected_plaintext", "passed"): "decrypted",
            ("test_vector_from_buggy_encrypter_fails_authentication", "passed"): "refused",
            ("test_kms_vector_needs_aws_test_account", "skipped"): "need AWS KMS (skipped)",
        }
    )

    def __init__(self, required: bool) -> None:
        self.required = required
        self.counts: Counter[str] = Counter()
        self.module_skipped: str | None = None
        self.seen = False
        self.failure: str | None = None

    def _ours(self, nodeid: str) -> bool:
        return nodeid.split("::", 1)[0].endswith(self.MODULE)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if self._ours(report.nodeid) and "::" not in report.nodeid:
            self.seen = True
            if report.skipped and isinstance(report.longrepr, tuple):
                self.module_skipped = str(report.longrepr[2]).removeprefix("Skipped: ")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # A test's call counts; its setup only when that skipped it (no call follows).
        counted = report.when == "call" or (report.when == "setup" and report.skipped)
        if not (counted and self._ours(report.nodeid)):
            return
        self.seen = True
        function = report.nodeid.split("::")[-1].split("[", 1)[0]
        column = self.COLUMNS.get((function, report.outcome))
        if column is not None:
            self.counts[column] += 1

    def summary(self) -> str:
        if self.module_skipped is not None:
            return f"ESDK vectors: not run: {self.module_skipped}"
        return "ESDK vectors: " + ", ".join(
            f"{self.counts[column]} {column}" for column in EXPECTED_RUN
        )

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.required:
            return
        got = {column: self.counts[column] for column in EXPECTED_RUN}
        if got != EXPECTED_RUN:
            expected = ", ".join(f"{n} {column}" for column, n in EXPECTED_RUN.items())
            self.failure = f"{REQUIRE_VAR} is set, so every vector must run: expected {expected}"
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not (self.seen or self.required):
            return
        terminalreporter.write_sep("-", "ESDK test vectors")
        terminalreporter.write_line(self.summary())
        if self.failure is not None:
            terminalreporter.write_line(f"FAILED: {self.failure}", red=True, bold=True)


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
