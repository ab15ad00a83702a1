"""ECDSA message signatures for signing suites (ESDK format sections 3 and 4.3).

Hashing is incremental so a stream is signed without being held; the private key
lives only as long as the encryptor that uses it.
"""

from __future__ import annotations

import base64
import binascii
import mmap

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import AuthenticationError, MalformedMessageError
from .body import Buffer
from .suites import AlgorithmSuite

__all__ = ["Signer", "Verifier"]


def _algorithms(suite: AlgorithmSuite) -> tuple[ec.EllipticCurve, hashes.HashAlgorithm]:
    info = suite.info
    if info.signature_curve is None or info.signature_hash is None:
        raise ValueError(f"{suite.name} is not a signing suite")
    return info.signature_curve(), info.signature_hash()


class Signer:
    __slots__ = ("_hash", "_hash_alg", "_key", "_suite")

    def __init__(
        self, suite: AlgorithmSuite, key: ec.EllipticCurvePrivateKey | None = None
    ) -> None:
        curve, self._hash_alg = _algorithms(suite)
        self._suite = suite
        self._key = key if key is not None else ec.generate_private_key(curve)
        self._hash = hashes.Hash(self._hash_alg)

    def __repr__(self) -> str:
        return f"Signer(curve={self._key.curve.name})"

    def fork(self) -> Signer:
        """A signer with the same key and a fresh hash, for the next message that reuses
        these materials (the key is in their encryption context)."""
        return Signer(self._suite, self._key)

    @property
    def encoded_public_key(self) -> str:
        """The value of ``aws-crypto-public-key``: base64 of the compressed point."""
        point = self._key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
        return base64.b64encode(point).decode("ascii")

    def update(self, data: Buffer | memoryview) -> None:
        self._hash.update(data if not isinstance(data, mmap.mmap) else memoryview(data))

    def finalize(self) -> bytes:
        digest = self._hash.finalize()
        return self._key.sign(digest, ec.ECDSA(utils.Prehashed(self._hash_alg)))


class Verifier:
    __slots__ = ("_hash", "_hash_alg", "_key")

    def __init__(self, suite: AlgorithmSuite, encoded_public_key: str) -> None:
        curve, self._hash_alg = _algorithms(suite)
        try:
            point = base64.b64decode(encoded_public_key.encode("ascii"), validate=True)
            self._key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        except (ValueError, binascii.Error, UnicodeEncodeError):
            raise MalformedMessageError(
                "the message's aws-crypto-public-key is not a valid public key"
            ) from None
        self._hash = hashes.Hash(self._hash_alg)

    def update(self, data: Buffer | memoryview) -> None:
        self._hash.update(data if not isinstance(data, mmap.mmap) else memoryview(data))

    def verify(self, signature: bytes) -> None:
        digest = self._hash.finalize()
        try:
            self._key.verify(signature, digest, ec.ECDSA(utils.Prehashed(self._hash_alg)))
        except InvalidSignature:
            raise AuthenticationError("message signature does not verify") from None
