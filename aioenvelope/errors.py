"""One exception hierarchy, rooted at :class:`EnvelopeError`.

The split follows h11: "the message is bad" (:class:`MalformedMessageError`,
:class:`AuthenticationError`) is the peer's fault, "you called it wrong"
(:class:`ConfigurationError`) is the caller's. Messages say what was wrong and
what to do, and never carry key material.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "AzureKeyVaultError",
    "AzureKeyVaultKeyCheckError",
    "BranchKeyExistsError",
    "BranchKeyIntegrityError",
    "BranchKeyNotFoundError",
    "BranchKeyStoreError",
    "CircuitOpenError",
    "CommitmentPolicyError",
    "ConfigurationError",
    "DynamoDBError",
    "EncryptionContextError",
    "EncryptionContextMismatchError",
    "EnvelopeError",
    "GcpKmsError",
    "GcpKmsKeyCheckError",
    "KMSDecryptRateLimited",
    "KMSError",
    "KMSKeyCheckError",
    "KMSTimeoutError",
    "KeyServiceError",
    "KeyringError",
    "MalformedMessageError",
    "MessageLimitError",
    "NoUsableKeyError",
    "SignedStreamRefusedError",
    "TruncatedMessageError",
    "VaultError",
    "VaultKeyCheckError",
]


class EnvelopeError(Exception):
    """Root of every error this library raises on purpose."""


class ConfigurationError(EnvelopeError, ValueError):
    """The caller misused the API: a bad argument, key or option."""


class EncryptionContextError(ConfigurationError):
    """An encryption context given to encrypt is not valid (reserved key, size, type)."""


class MalformedMessageError(EnvelopeError):
    """The bytes are not a well-formed message: wrong field, bad length, unknown suite."""


class TruncatedMessageError(MalformedMessageError):
    """The message ended before it was complete (or, when streaming, the source did)."""


class MessageLimitError(MalformedMessageError):
    """The message exceeds a limit this client enforces against hostile input."""


class AuthenticationError(EnvelopeError):
    """The message failed authentication: a tag, the key commitment or the signature.

    One type for every check, like ``cryptography``'s ``InvalidTag``, so that the
    error is no oracle for which byte was changed.
    """


class CommitmentPolicyError(EnvelopeError):
    """The algorithm suite is not allowed by the client's commitment policy."""


class SignedStreamRefusedError(EnvelopeError):
    """``decrypt_stream(..., allow_signed=False)`` met a signed message.

    A signed message's frames can be checked against the signature only at its end, so
    streaming one hands out plaintext that the signature has not yet covered.
    """


class EncryptionContextMismatchError(EnvelopeError):
    """The encryption context given to decrypt does not match the message's."""


class KeyringError(EnvelopeError):
    """A keyring could not produce or recover a data key."""


class NoUsableKeyError(KeyringError):
    """None of the message's encrypted data keys could be decrypted by this keyring."""


class KeyServiceError(KeyringError):
    """A call to a remote key service failed (AWS KMS, a branch key store's DynamoDB
    table; Vault, Google Cloud KMS and Azure Key Vault as they come). One base, so a web
    service maps them all alike: ``transient`` failures (throttling after retries, 5xx,
    timeouts, network: they say nothing about the request) are worth retrying later,
    the others are answers (access denied, a wrong key, an unknown ciphertext).
    ``service`` names the service (``"aws-kms"``, ``"dynamodb"``), ``operation`` the
    call, ``key_id`` the key (or table) it was about, ``error_code`` the service's code;
    the service's own exception is chained."""

    SERVICE: ClassVar[str | None] = None
    """What ``service`` a subclass names (``"aws-kms"``, ...): one constructor for all."""

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        key_id: str | None,
        error_code: str,
        transient: bool,
        service: str | None = None,
    ) -> None:
        super().__init__(message)
        named = service if service is not None else type(self).SERVICE
        if named is None:
            raise TypeError(f"{type(self).__name__} needs service=")
        self.service = named
        self.operation = operation
        self.key_id = key_id
        self.error_code = error_code
        self.transient = transient


class KMSError(KeyServiceError):
    """A call to AWS KMS failed. ``operation``, ``key_id`` and ``error_code`` say which
    and why; the botocore exception is chained. ``transient`` is true for failures that
    say nothing about the request (throttling after retries, 5xx, timeouts, network)."""

    SERVICE = "aws-kms"


class DynamoDBError(KeyServiceError):
    """A call to Amazon DynamoDB (a branch key store's table) failed. ``operation``,
    ``table_name`` (also ``key_id``) and ``error_code`` say which and why; the botocore
    exception is chained. ``transient`` as for :class:`KMSError`."""

    SERVICE = "dynamodb"

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        table_name: str,
        error_code: str,
        transient: bool,
    ) -> None:
        super().__init__(
            message,
            operation=operation,
            key_id=table_name,
            error_code=error_code,
            transient=transient,
        )
        self.table_name = table_name


class VaultError(KeyServiceError):
    """A call to HashiCorp Vault or OpenBao (its transit engine, or an auth method's
    login) failed. ``operation`` is the call (``datakey``, ``encrypt``, ``decrypt``,
    ``keys``, ``login``), ``key_id`` the transit key as ``mount/name``, ``error_code``
    one of a small vocabulary (``PermissionDenied``, ``KeyNotFound``, ``NotAuthentic``,
    ``CiphertextTooOld``, ``InvalidCiphertext``, ``InvalidRequest``, ``Sealed``,
    ``RateLimited``, ``ServerError``, ``ConnectionError``, ``Timeout``,
    ``InvalidResponse``). ``transient`` as for :class:`KMSError`: 5xx (a sealed server
    too), 429, timeouts and network failures, after the retries within the deadline."""

    SERVICE = "vault-transit"


class GcpKmsError(KeyServiceError):
    """A call to Google Cloud KMS failed. ``operation`` is the call (``Encrypt``,
    ``Decrypt``, ``GetCryptoKey``), ``key_id`` the key's resource name (without
    ``/cryptoKeyVersions/N``), ``error_code`` the gRPC status name (``PERMISSION_DENIED``,
    ``NOT_FOUND``, ``INVALID_ARGUMENT``, ``UNAVAILABLE``...), ``ChecksumMismatch`` for
    a CRC32C that did not match, ``CredentialUnavailable`` for credentials Google refused
    (not transient: fix them), ``Timeout`` or ``InvalidResponse``. ``transient`` as for
    :class:`KMSError`: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, a
    checksum mismatch and timeouts, after the retries within the deadline."""

    SERVICE = "gcp-kms"


class AzureKeyVaultError(KeyServiceError):
    """A call to Azure Key Vault (or Managed HSM) failed. ``operation`` is the call
    (``wrapkey``, ``unwrapkey``, ``get``), ``key_id`` the key's URL without a version,
    ``error_code`` Key Vault's own code when it gave one (``Forbidden``,
    ``KeyNotFound``, ``BadParameter``, ``Unauthorized``, ``Throttled``...), else
    ``ServerError``, ``ConnectionError``, ``Timeout``, ``CredentialUnavailable``,
    ``ChallengeRejected`` or ``InvalidResponse``. ``transient`` as for
    :class:`KMSError`: 5xx, 429, timeouts and network failures, after the retries within
    the deadline."""

    SERVICE = "azure-kv"


class BranchKeyStoreError(KeyringError):
    """The branch key store refused: its table is missing or has the wrong key schema,
    or a branch key ID to create exists already. ``table_name``, ``branch_key_id`` and
    ``version`` (None when no version is concerned) say where."""

    def __init__(
        self,
        message: str,
        *,
        table_name: str,
        branch_key_id: str | None = None,
        version: str | None = None,
    ) -> None:
        super().__init__(message)
        self.table_name = table_name
        self.branch_key_id = branch_key_id
        self.version = version


class BranchKeyNotFoundError(BranchKeyStoreError):
    """The branch key, or the version of it asked for, is not in the key store."""


class BranchKeyExistsError(BranchKeyStoreError):
    """``create_branch_key`` was given an ID the table holds already: nothing was
    written. Catch it to make "create unless it exists" safe among several processes."""


class BranchKeyIntegrityError(BranchKeyStoreError):
    """A key store item cannot be trusted: its ``kms-arn`` is not the configured KMS key,
    KMS refused its encryption context, or it is malformed. Someone wrote the table
    other than through a key store, or the store is configured with the wrong key or
    logical name."""


class KMSTimeoutError(KMSError):
    """A KMS call did not finish within its deadline (retries included)."""


class KMSKeyCheckError(ConfigurationError):
    """A configured KMS key failed the start-up check (missing, disabled, wrong kind, or
    the caller may not describe it)."""


class VaultKeyCheckError(ConfigurationError):
    """A configured Vault transit key failed the start-up check: it does not exist, the
    token may not read it, or it cannot be used (not an AEAD type, cannot encrypt, or
    derived)."""


class GcpKmsKeyCheckError(ConfigurationError):
    """A configured Google Cloud KMS key failed the start-up check (``GetCryptoKey``): it
    does not exist, the caller may not read it, its purpose is not ENCRYPT_DECRYPT, or
    its primary version is not enabled."""


class AzureKeyVaultKeyCheckError(ConfigurationError):
    """A configured Azure Key Vault key failed the start-up check (GET key): it does not
    exist, the credential may not read it, it is disabled or expired, its key type does
    not fit the algorithm, or its permitted operations lack wrapKey or unwrapKey."""


class KMSDecryptRateLimited(EnvelopeError):
    """Too many remote unwrap calls (KMS Decrypt on cache misses, one per EDK tried): the
    decrypt rate limit's token bucket is empty. Map it to HTTP 429 with
    ``Retry-After: retry_after``."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpenError(EnvelopeError):
    """KMS in ``region`` failed repeatedly, so calls fail fast without touching the
    network until a probe succeeds. Map it to HTTP 503 with ``Retry-After``."""

    def __init__(self, message: str, *, region: str, retry_after: float) -> None:
        super().__init__(message)
        self.region = region
        self.retry_after = retry_after
