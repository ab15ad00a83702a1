"""The AWS Encryption SDK as an interop peer: raw AES/RSA master keys behind a typed facade.

The ESDK's raw keys are ``RawMasterKey`` objects built from a provider ID (our keyring's
key namespace), a key ID (our key name) and a ``WrappingKey``. A :class:`PeerKeys`
provider holds any number of them (the first one generates the data key, as with our
``MultiKeyring``'s generator) and is what ``EncryptionSDKClient`` takes as
``key_provider``. The ESDK has no type stubs, so its objects are ``Any`` here and this
module is the only place that touches them.
"""

from __future__ import annotations

import enum
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aws_encryption_sdk
from aws_encryption_sdk.exceptions import InvalidKeyIdError
from aws_encryption_sdk.identifiers import Algorithm, EncryptionKeyType, WrappingAlgorithm
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.base import MasterKeyProvider, MasterKeyProviderConfig
from aws_encryption_sdk.key_providers.raw import RawMasterKey, RawMasterKeyConfig
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from aioenvelope import Keyring, MessageHeader, RawAesKeyring, RawRsaKeyring

__all__ = [
    "KEY_KINDS",
    "PeerHeader",
    "PeerKeys",
    "RsaWrapping",
    "SharedKey",
    "assert_headers_agree",
    "esdk_decrypt",
    "esdk_encrypt",
    "kms_master_keys",
    "peer_keys",
    "raw_aes_key",
    "raw_rsa_key",
    "shared_key",
]

PUBLIC_KEY_FIELD = "aws-crypto-public-key"


class RsaWrapping(enum.Enum):
    """One RSA padding, named once for both libraries."""

    PKCS1 = "PKCS1v15"
    OAEP_SHA1 = "OAEP-SHA1"
    OAEP_SHA256 = "OAEP-SHA256"
    OAEP_SHA384 = "OAEP-SHA384"
    OAEP_SHA512 = "OAEP-SHA512"

    @property
    def esdk(self) -> Any:
        """The ESDK's ``WrappingAlgorithm`` member."""
        return {
            RsaWrapping.PKCS1: WrappingAlgorithm.RSA_PKCS1,
            RsaWrapping.OAEP_SHA1: WrappingAlgorithm.RSA_OAEP_SHA1_MGF1,
            RsaWrapping.OAEP_SHA256: WrappingAlgorithm.RSA_OAEP_SHA256_MGF1,
            RsaWrapping.OAEP_SHA384: WrappingAlgorithm.RSA_OAEP_SHA384_MGF1,
            RsaWrapping.OAEP_SHA512: WrappingAlgorithm.RSA_OAEP_SHA512_MGF1,
        }[self]

    def padding(self) -> padding.AsymmetricPadding:
        """The ``cryptography`` padding our ``RawRsaKeyring`` takes."""
        if self is RsaWrapping.PKCS1:
            return padding.PKCS1v15()
        hash_algorithm: hashes.HashAlgorithm = {
            RsaWrapping.OAEP_SHA1: hashes.SHA1(),
            RsaWrapping.OAEP_SHA256: hashes.SHA256(),
            RsaWrapping.OAEP_SHA384: hashes.SHA384(),
            RsaWrapping.OAEP_SHA512: hashes.SHA512(),
        }[self]
        return padding.OAEP(mgf=padding.MGF1(hash_algorithm), algorithm=hash_algorithm, label=None)


_AES_WRAPPING = {
    16: WrappingAlgorithm.AES_128_GCM_IV12_TAG16_NO_PADDING,
    24: WrappingAlgorithm.AES_192_GCM_IV12_TAG16_NO_PADDING,
    32: WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
}


def _master_key(provider_id: str, key_id: str, wrapping_key: Any) -> Any:
    config = RawMasterKeyConfig(
        key_id=key_id.encode("utf-8"), provider_id=provider_id, wrapping_key=wrapping_key
    )
    return RawMasterKey(config=config)


def raw_aes_key(provider_id: str, key_id: str, key: bytes) -> Any:
    """An ESDK raw AES-GCM master key (AES-128/192/256 by ``len(key)``)."""
    wrapping_key = WrappingKey(
        wrapping_algorithm=_AES_WRAPPING[len(key)],
        wrapping_key=key,
        wrapping_key_type=EncryptionKeyType.SYMMETRIC,
    )
    return _master_key(provider_id, key_id, wrapping_key)


def raw_rsa_key(
    provider_id: str,
    key_id: str,
    wrapping: RsaWrapping,
    *,
    private_key: rsa.RSAPrivateKey | None = None,
    public_key: rsa.RSAPublicKey | None = None,
) -> Any:
    """An ESDK raw RSA master key; with only ``public_key`` it can encrypt but not decrypt."""
    if private_key is not None:
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key_type = EncryptionKeyType.PRIVATE
    elif public_key is not None:
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        key_type = EncryptionKeyType.PUBLIC
    else:
        raise ValueError("raw_rsa_key needs private_key or public_key")
    wrapping_key = WrappingKey(
        wrapping_algorithm=wrapping.esdk, wrapping_key=pem, wrapping_key_type=key_type
    )
    return _master_key(provider_id, key_id, wrapping_key)


class PeerKeys(MasterKeyProvider):  # type: ignore[misc]  # the ESDK is untyped
    """A fixed set of raw master keys; the first generates the data key on encrypt.

    Its own provider ID never appears in a message: on decrypt the ESDK matches each
    EDK against the member keys' provider IDs, and on encrypt each member wraps.
    """

    provider_id = "aioenvelope-interop-peer"
    _config_class = MasterKeyProviderConfig
    vend_masterkey_on_decrypt = False

    def _new_master_key(self, key_id: bytes) -> Any:
        raise InvalidKeyIdError(f"PeerKeys has a fixed set of keys; no key {key_id!r}")


def peer_keys(*master_keys: Any) -> PeerKeys:
    """Bundle raw master keys (from :func:`raw_aes_key` / :func:`raw_rsa_key`) into one provider."""
    if not master_keys:
        raise ValueError("peer_keys needs at least one master key")
    provider = PeerKeys()
    provider.add_master_key_providers_from_list(list(master_keys))
    return provider


@dataclass(frozen=True)
class PeerHeader:
    """The parts of an ESDK-parsed header the tests compare, in plain Python types."""

    suite_id: int
    message_id: bytes
    frame_length: int
    framed: bool
    encryption_context: dict[str, str]
    encrypted_data_keys: frozenset[tuple[str, bytes, bytes]]

    @property
    def user_context(self) -> dict[str, str]:
        """The context without the ESDK-reserved public-key entry of signing suites."""
        return {k: v for k, v in self.encryption_context.items() if k != PUBLIC_KEY_FIELD}


def _peer_header(header: Any) -> PeerHeader:
    return PeerHeader(
        suite_id=int(header.algorithm.algorithm_id),
        message_id=bytes(header.message_id),
        frame_length=int(header.frame_length),
        framed=header.content_type is aws_encryption_sdk.identifiers.ContentType.FRAMED_DATA,
        encryption_context=dict(header.encryption_context),
        encrypted_data_keys=frozenset(
            (
                str(edk.key_provider.provider_id),
                bytes(edk.key_provider.key_info),
                bytes(edk.encrypted_data_key),
            )
            for edk in header.encrypted_data_keys
        ),
    )


def kms_master_keys(*key_arns: str) -> Any:
    """The ESDK's strict KMS provider for ``key_arns`` (its boto3 clients find moto
    through ``AWS_ENDPOINT_URL_KMS``: see the ``esdk_kms`` fixture)."""
    return aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=list(key_arns))


def _edk_set(header: MessageHeader) -> frozenset[tuple[str, bytes, bytes]]:
    return frozenset(
        (edk.provider_id, edk.provider_info, edk.ciphertext) for edk in header.encrypted_data_keys
    )


def assert_headers_agree(ours: MessageHeader, peer: PeerHeader) -> None:
    """Both parsers read the same bytes into the same header: suite, message ID, frame
    length and framing, encryption context and every encrypted data key."""
    assert ours.algorithm_suite.suite_id == peer.suite_id
    assert ours.message_id == peer.message_id
    assert ours.frame_length == peer.frame_length
    assert (ours.frame_length != 0) == peer.framed
    assert dict(ours.encryption_context) == peer.encryption_context
    assert _edk_set(ours) == peer.encrypted_data_keys


def _client(allow_legacy_writes: bool) -> Any:
    policy = (
        aws_encryption_sdk.CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT
        if allow_legacy_writes
        else aws_encryption_sdk.CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    return aws_encryption_sdk.EncryptionSDKClient(commitment_policy=policy)


def esdk_encrypt(
    keys: PeerKeys,
    plaintext: bytes,
    *,
    suite_id: int,
    encryption_context: Mapping[str, str],
    frame_length: int,
    streaming: bool = False,
) -> tuple[bytes, PeerHeader]:
    """Encrypt with the ESDK. Non-committing suites use a FORBID_ENCRYPT_ALLOW_DECRYPT client
    (the only policy under which the ESDK writes them); ``frame_length=0`` is non-framed.
    ``streaming`` uses its streaming API (``stream(mode="e")``, iterated chunk by chunk)
    instead of the one-shot ``encrypt``."""
    algorithm = Algorithm.get_by_id(suite_id)
    client = _client(allow_legacy_writes=not algorithm.is_committing())
    options = {
        "key_provider": keys,
        "encryption_context": dict(encryption_context),
        "algorithm": algorithm,
        "frame_length": frame_length,
    }
    if not streaming:
        ciphertext, header = client.encrypt(source=plaintext, **options)
        return bytes(ciphertext), _peer_header(header)
    with client.stream(mode="e", source=io.BytesIO(plaintext), **options) as encryptor:
        chunks = [bytes(chunk) for chunk in encryptor]
        return b"".join(chunks), _peer_header(encryptor.header)


def esdk_decrypt(
    keys: PeerKeys, ciphertext: bytes, *, streaming: bool = False
) -> tuple[bytes, PeerHeader]:
    """Decrypt with a strict (REQUIRE_ENCRYPT_REQUIRE_DECRYPT) ESDK client; ``streaming``
    with its streaming API (``stream(mode="d")``, iterated chunk by chunk).

    The ESDK does not check the context itself; callers compare the returned header's.
    """
    client = _client(allow_legacy_writes=False)
    if not streaming:
        plaintext, header = client.decrypt(source=ciphertext, key_provider=keys)
        return bytes(plaintext), _peer_header(header)
    with client.stream(mode="d", source=io.BytesIO(ciphertext), key_provider=keys) as decryptor:
        chunks = [bytes(chunk) for chunk in decryptor]
        return b"".join(chunks), _peer_header(decryptor.header)


# -- one wrapping key seen by both libraries ---------------------------------------------

KEY_KINDS = [
    "aes-128",
    "aes-192",
    "aes-256",
    "rsa-pkcs1",
    "rsa-oaep-sha1",
    "rsa-oaep-sha256",
    "rsa-oaep-sha384",
    "rsa-oaep-sha512",
]
_RSA_WRAPPINGS = {
    "rsa-pkcs1": RsaWrapping.PKCS1,
    "rsa-oaep-sha1": RsaWrapping.OAEP_SHA1,
    "rsa-oaep-sha256": RsaWrapping.OAEP_SHA256,
    "rsa-oaep-sha384": RsaWrapping.OAEP_SHA384,
    "rsa-oaep-sha512": RsaWrapping.OAEP_SHA512,
}


@dataclass(frozen=True)
class SharedKey:
    """One wrapping key as our keyring and as the ESDK master key with the same identity
    (``peer``: bundle it with :func:`peer_keys`)."""

    ours: Keyring
    peer: Any  # an ESDK RawMasterKey


def shared_key(
    kind: str,
    rsa_key: rsa.RSAPrivateKey | None = None,
    *,
    namespace: str,
    name: str,
    public_only: bool = False,
) -> SharedKey:
    """Build ``kind`` (see :data:`KEY_KINDS`; AES keys are fresh random bytes) for both
    libraries. ``public_only`` gives RSA keys without their private half (encrypt-only)
    on both sides."""
    if kind.startswith("aes-"):
        key = os.urandom(int(kind[4:]) // 8)
        return SharedKey(RawAesKeyring(namespace, name, key), raw_aes_key(namespace, name, key))
    if rsa_key is None:
        raise ValueError(f"shared_key({kind!r}) needs rsa_key")
    wrapping = _RSA_WRAPPINGS[kind]
    public_key = rsa_key.public_key()
    if public_only:
        ours = RawRsaKeyring(namespace, name, public_key=public_key, padding=wrapping.padding())
        peer = raw_rsa_key(namespace, name, wrapping, public_key=public_key)
    else:
        ours = RawRsaKeyring(namespace, name, private_key=rsa_key, padding=wrapping.padding())
        peer = raw_rsa_key(namespace, name, wrapping, private_key=rsa_key)
    return SharedKey(ours, peer)
