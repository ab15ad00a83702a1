"""Data-key derivation and key commitment (ESDK format section 4.1/4.2)."""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from ..errors import AuthenticationError
from .suites import AlgorithmSuite

__all__ = ["check_commitment", "derive_keys"]

# Hash objects are stateless descriptions; one instance serves every call.
_SHA512 = hashes.SHA512()
_DERIVE_LABEL = b"DERIVEKEY"
_COMMIT_LABEL = b"COMMITKEY"
# A committing suite's derivation info: its ID, then the label (made once, not per call).
# Keyed by the ID: a member's hash is Python code (Enum.__hash__).
_DERIVE_INFO = {
    suite.suite_id: suite.suite_id.to_bytes(2, "big") + _DERIVE_LABEL for suite in AlgorithmSuite
}


def derive_keys(suite: AlgorithmSuite, data_key: bytes, message_id: bytes) -> tuple[bytes, bytes]:
    """Return (encryption key, commitment); the commitment is b"" for non-committing suites."""
    info = suite.info
    if len(data_key) != info.key_length:
        raise AuthenticationError("the data key has the wrong length for the message's suite")
    if info.kdf_hash is None:
        return bytes(data_key), b""
    if info.committing:
        # Extract once, expand twice, as the specification recommends.
        prk = HKDF.extract(_SHA512, message_id, data_key)
        key = HKDFExpand(_SHA512, info.key_length, _DERIVE_INFO[suite.suite_id]).derive(prk)
        commitment = HKDFExpand(_SHA512, 32, _COMMIT_LABEL).derive(prk)
        return key, commitment
    suite_id = suite.suite_id.to_bytes(2, "big")
    hkdf = HKDF(info.kdf_hash(), info.key_length, salt=None, info=suite_id + message_id)
    return hkdf.derive(data_key), b""


def check_commitment(expected: bytes, found: bytes) -> None:
    if not hmac.compare_digest(expected, found):
        raise AuthenticationError(
            "key commitment does not match: the data key is not the one this message was "
            "written with"
        )
