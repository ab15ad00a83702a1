"""The AWS Encryption SDK algorithm suites and commitment policies, as plain data."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["AlgorithmSuite", "CommitmentPolicy", "SuiteInfo"]


@dataclass(frozen=True)
class SuiteInfo:
    message_version: int
    key_length: int  # bytes of the data key, the KDF input and the derived key
    kdf_hash: type[hashes.HashAlgorithm] | None  # None: identity KDF
    committing: bool
    signature_curve: type[ec.EllipticCurve] | None
    signature_hash: type[hashes.HashAlgorithm] | None
    suite_data_length: int

    iv_length: int = 12
    tag_length: int = 16


_SHA256, _SHA384, _SHA512 = hashes.SHA256, hashes.SHA384, hashes.SHA512
_P256, _P384 = ec.SECP256R1, ec.SECP384R1


class AlgorithmSuite(enum.Enum):
    """ESDK algorithm suites; the value is the two-byte suite ID."""

    AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384 = 0x0578
    AES_256_GCM_HKDF_SHA512_COMMIT_KEY = 0x0478
    AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384 = 0x0378
    AES_192_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384 = 0x0346
    AES_128_GCM_IV12_TAG16_HKDF_SHA256_ECDSA_P256 = 0x0214
    AES_256_GCM_IV12_TAG16_HKDF_SHA256 = 0x0178
    AES_192_GCM_IV12_TAG16_HKDF_SHA256 = 0x0146
    AES_128_GCM_IV12_TAG16_HKDF_SHA256 = 0x0114
    AES_256_GCM_IV12_TAG16_NO_KDF = 0x0078
    AES_192_GCM_IV12_TAG16_NO_KDF = 0x0046
    AES_128_GCM_IV12_TAG16_NO_KDF = 0x0014

    # Set once per member below. Read as plain attributes because ``Enum.__hash__`` is
    # Python code, and dict lookups keyed by members cost ~10 hashes a message.
    info: SuiteInfo
    suite_id: int
    committing: bool
    signing: bool
    message_version: int
    key_length: int

    @classmethod
    def from_id(cls, suite_id: int) -> AlgorithmSuite | None:
        return _BY_ID.get(suite_id)


_INFO: dict[AlgorithmSuite, SuiteInfo] = {
    AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384: SuiteInfo(
        2, 32, _SHA512, True, _P384, _SHA384, 32
    ),
    AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY: SuiteInfo(
        2, 32, _SHA512, True, None, None, 32
    ),
    AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384: SuiteInfo(
        1, 32, _SHA384, False, _P384, _SHA384, 0
    ),
    AlgorithmSuite.AES_192_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384: SuiteInfo(
        1, 24, _SHA384, False, _P384, _SHA384, 0
    ),
    AlgorithmSuite.AES_128_GCM_IV12_TAG16_HKDF_SHA256_ECDSA_P256: SuiteInfo(
        1, 16, _SHA256, False, _P256, _SHA256, 0
    ),
    AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA256: SuiteInfo(
        1, 32, _SHA256, False, None, None, 0
    ),
    AlgorithmSuite.AES_192_GCM_IV12_TAG16_HKDF_SHA256: SuiteInfo(
        1, 24, _SHA256, False, None, None, 0
    ),
    AlgorithmSuite.AES_128_GCM_IV12_TAG16_HKDF_SHA256: SuiteInfo(
        1, 16, _SHA256, False, None, None, 0
    ),
    AlgorithmSuite.AES_256_GCM_IV12_TAG16_NO_KDF: SuiteInfo(1, 32, None, False, None, None, 0),
    AlgorithmSuite.AES_192_GCM_IV12_TAG16_NO_KDF: SuiteInfo(1, 24, None, False, None, None, 0),
    AlgorithmSuite.AES_128_GCM_IV12_TAG16_NO_KDF: SuiteInfo(1, 16, None, False, None, None, 0),
}
for _suite, _info in _INFO.items():
    for _name, _value in (
        ("info", _info),
        ("suite_id", int(_suite.value)),
        ("committing", _info.committing),
        ("signing", _info.signature_curve is not None),
        ("message_version", _info.message_version),
        ("key_length", _info.key_length),
    ):
        object.__setattr__(_suite, _name, _value)
_BY_ID = {suite.suite_id: suite for suite in AlgorithmSuite}


class CommitmentPolicy(enum.Enum):
    """The ESDK's commitment policies.

    This library writes only key-committing suites, so ``FORBID_ENCRYPT_ALLOW_DECRYPT``
    makes a read-only client (useful while migrating old data).
    """

    FORBID_ENCRYPT_ALLOW_DECRYPT = "FORBID_ENCRYPT_ALLOW_DECRYPT"
    REQUIRE_ENCRYPT_ALLOW_DECRYPT = "REQUIRE_ENCRYPT_ALLOW_DECRYPT"
    REQUIRE_ENCRYPT_REQUIRE_DECRYPT = "REQUIRE_ENCRYPT_REQUIRE_DECRYPT"

    def allows_decrypt(self, suite: AlgorithmSuite) -> bool:
        return suite.committing or self is not CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
