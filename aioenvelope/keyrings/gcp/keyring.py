"""A keyring on Google Cloud KMS symmetric keys (purpose ENCRYPT_DECRYPT).

Encrypt: a data key from ``os.urandom`` (the suite's length), wrapped with ``Encrypt``
under ``key_name`` and each additional key, in parallel. Decrypt: ``Decrypt`` of each EDK
that names one of this keyring's keys, in order, until one opens.

What is bound to what: the message's encryption context, serialized as the message
format does it, is sent as ``additional_authenticated_data`` on every call, so an EDK
opens only with the context it was made for. Integrity as Google advises: each request
carries the CRC32C of its plaintext (or ciphertext) and AAD, an Encrypt response must
say it verified both, and each response's CRC32C is checked; a mismatch is retried
within the deadline, then a transient :class:`~aioenvelope.errors.GcpKmsError`.

EDKs: provider ID ``gcp-kms``; provider info the key's resource name
(``projects/P/locations/L/keyRings/R/cryptoKeys/K``, no version: Cloud KMS finds the
version in the ciphertext, so rotation needs nothing here); ciphertext as Cloud KMS
returned it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from ..._concurrency import gather_in_order
from ...errors import (
    CircuitOpenError,
    ConfigurationError,
    GcpKmsError,
    GcpKmsKeyCheckError,
    NoUsableKeyError,
)
from ...format.header import EncryptedDataKey
from ..base import (
    DecryptionMaterials,
    EncryptionMaterials,
    Keyring,
    describe_encrypted_data_keys,
    shown_name,
)
from ._transport import ChecksumMismatch, GcpKmsTransport, InvalidResponse, crc32c

if TYPE_CHECKING:
    from google.auth.credentials import Credentials
    from google.cloud.kms_v1 import KeyManagementServiceAsyncClient

    from ...runtime import Runtime

__all__ = ["PROVIDER_ID", "GcpKmsKeyring"]

PROVIDER_ID = "gcp-kms"
# A Cloud KMS symmetric ciphertext of a data key (at most 32 bytes) is a few hundred
# bytes at most; an EDK's much longer than this is not ours, and is never sent.
MAX_CIPHERTEXT = 4096
_SEGMENT = r"[A-Za-z0-9_-]{1,63}"
_KEY_NAME = re.compile(
    rf"projects/[a-z0-9.:-]{{1,100}}/locations/{_SEGMENT}/keyRings/{_SEGMENT}"
    rf"/cryptoKeys/{_SEGMENT}"
)
_ENCRYPT_DECRYPT = 1  # CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
_ENABLED = 1  # CryptoKeyVersion.CryptoKeyVersionState.ENABLED


def _breaker_name(key_name: str) -> str:
    return f"gcp-kms {key_name.split('/')[3]}"


class GcpKmsKeyring(Keyring):
    """Envelope encryption under Google Cloud KMS keys.

    ``key_name`` (and each of ``additional_key_names``) is a key's resource name,
    ``projects/P/locations/L/keyRings/R/cryptoKeys/K``. ``client`` is a
    ``google.cloud.kms_v1.KeyManagementServiceAsyncClient`` of the caller's, used as given
    and never closed; without one the keyring makes its own when the ``EnvelopeClient``
    is entered (inside the running loop) and closes its transport on exit, with
    ``credentials`` or else ``google.auth.default()`` (searched for at most ``deadline``
    seconds: off Google Cloud the search ends in a probe of the metadata server).
    ``client_options`` are keyword arguments for that client (``client_options`` such
    as ``{"api_endpoint": ...}``, ``transport``, ``client_info``). Each call has
    ``deadline`` seconds, retries included, and at most ``max_attempts`` attempts. On
    open each key is read once (``GetCryptoKey``: it exists, its purpose is
    ENCRYPT_DECRYPT, its primary version is enabled), unless ``check_keys=False``.
    """

    caches_data_keys = True

    def __init__(
        self,
        key_name: str,
        *,
        additional_key_names: Sequence[str] = (),
        client: KeyManagementServiceAsyncClient | None = None,
        credentials: Credentials | None = None,
        deadline: float = 2.0,
        check_keys: bool = True,
        max_attempts: int = 4,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(additional_key_names, str):
            raise ConfigurationError("additional_key_names must be a sequence of key names")
        names = [key_name, *additional_key_names]
        for name in names:
            if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
                shown = shown_name(name) if isinstance(name, str) else repr(name)
                hint = (
                    ": name the key, not one of its versions (Encrypt uses the primary "
                    "version; Decrypt finds the version in the ciphertext)"
                    if isinstance(name, str) and "/cryptoKeyVersions/" in name
                    else ""
                )
                raise ConfigurationError(
                    f"{shown} is not a Cloud KMS key name, "
                    f"projects/P/locations/L/keyRings/R/cryptoKeys/K{hint}"
                )
        if len(set(names)) != len(names):
            raise ConfigurationError("the same Cloud KMS key is named twice")
        if client is not None and (credentials is not None or client_options):
            raise ConfigurationError(
                "give client= or credentials=/client_options=, not both: a client of "
                "your own has its credentials and options already"
            )
        if not deadline > 0:
            raise ConfigurationError("deadline must be a positive number of seconds")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        self.key_name = key_name
        self.additional_key_names = tuple(additional_key_names)
        self.check_keys = check_keys
        self._transport = GcpKmsTransport(
            client=client,
            credentials=credentials,
            client_options=client_options,
            deadline=deadline,
            max_attempts=max_attempts,
        )
        #: Each key's EDK provider info, and back.
        self._infos = {name: name.encode() for name in names}
        self._names = {info: name for name, info in self._infos.items()}

    def __repr__(self) -> str:
        extra = (
            f", additional_key_names={list(self.additional_key_names)!r}"
            if self.additional_key_names
            else ""
        )
        return f"GcpKmsKeyring({self.key_name!r}{extra})"

    @property
    def key_names(self) -> tuple[str, ...]:
        return (self.key_name, *self.additional_key_names)

    @property
    def breaker_name(self) -> str:
        """The circuit breaker of ``key_name``'s location in ``client.stats.breaker_states``:
        ``"gcp-kms <location>"`` (one per location, as AWS KMS has one per region; an
        additional key in another location has its location's)."""
        return _breaker_name(self.key_name)

    @property
    def gcp_calls(self) -> Mapping[str, int]:
        """Cloud KMS calls made so far, by method (``Encrypt``, ``Decrypt``,
        ``GetCryptoKey``): calls, not their retries."""
        return dict(self._transport.calls)

    @property
    def _description(self) -> str:
        plural = "s" if len(self.key_names) > 1 else ""
        return f"the Google Cloud KMS keyring with key{plural} {', '.join(self.key_names)}"

    def attach(self, runtime: Runtime) -> None:
        self._transport.runtime = runtime

    async def open(self) -> None:
        await self._transport.open()
        try:
            if self.check_keys:
                await gather_in_order([partial(self._check_key, name) for name in self.key_names])
        except BaseException:
            await self._transport.close()
            raise

    async def close(self) -> None:
        await self._transport.close()

    async def _call(
        self,
        operation: str,
        name: str,
        request: Mapping[str, Any],
        check: Any,
        *,
        unwrap: bool = False,
    ) -> Any:
        return await self._transport.call(
            operation, name, _breaker_name(name), request, check, unwrap=unwrap
        )

    async def _check_key(self, name: str) -> None:
        try:
            key = await self._call("GetCryptoKey", name, {"name": name}, lambda r: r)
        except GcpKmsError as exc:
            if exc.transient or exc.error_code == "CredentialUnavailable":
                raise  # not checked for want of the service (or of a token): says so itself
            what = {
                "PERMISSION_DENIED": (
                    "the caller may not read it (GetCryptoKey needs cloudkms.cryptoKeys.get, "
                    "e.g. roles/cloudkms.viewer, which roles/cloudkms.cryptoKeyEncrypterDecrypter "
                    "does not grant), or it does not exist"
                ),
                "NOT_FOUND": "it does not exist (check the project, location, key ring and key)",
            }.get(exc.error_code, f"reading it failed: {exc}")
            raise GcpKmsKeyCheckError(
                f"Cloud KMS key {name} failed the start-up check: {what}. Fix the key or "
                "the caller's roles, or pass check_keys=False to skip this check"
            ) from exc
        problems = []
        if int(key.purpose) != _ENCRYPT_DECRYPT:
            purpose = getattr(key.purpose, "name", str(key.purpose))
            problems.append(
                f"its purpose is {shown_name(str(purpose), 40)}, not ENCRYPT_DECRYPT "
                "(symmetric encryption)"
            )
        primary = key.primary
        if not primary or not primary.name:
            problems.append("it has no primary version (no enabled version to encrypt with)")
        elif int(primary.state) != _ENABLED:
            state = getattr(primary.state, "name", str(primary.state))
            version = primary.name.rsplit("/", 1)[-1]
            problems.append(
                f"its primary version {shown_name(version, 20)} is "
                f"{shown_name(str(state), 40)}, not ENABLED"
            )
        if problems:
            raise GcpKmsKeyCheckError(
                f"Cloud KMS key {name} cannot be used: " + "; ".join(problems)
            )

    # -- encrypt -----------------------------------------------------------------------

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        if materials.plaintext_data_key is None:
            materials = materials.generate_data_key()  # os.urandom, the suite's length
        assert materials.plaintext_data_key is not None
        plaintext = materials.plaintext_data_key
        aad = materials.serialized_encryption_context
        plaintext_crc, aad_crc = crc32c(plaintext), crc32c(aad)

        async def wrap(name: str) -> EncryptedDataKey:
            def check(response: Any) -> bytes:
                if not (
                    response.verified_plaintext_crc32c
                    and response.verified_additional_authenticated_data_crc32c
                ):
                    raise ChecksumMismatch(
                        "the response does not say the request's CRC32C checksums were "
                        "verified (the request may have been corrupted, or they were "
                        "dropped on the way)"
                    )
                ciphertext = bytes(response.ciphertext)
                if response.ciphertext_crc32c != crc32c(ciphertext):
                    raise ChecksumMismatch("the ciphertext's CRC32C did not match")
                if not str(response.name).startswith(name + "/cryptoKeyVersions/"):
                    raise InvalidResponse("the response names another key")
                if not 0 < len(ciphertext) <= MAX_CIPHERTEXT:
                    raise InvalidResponse(
                        f"the ciphertext's length ({len(ciphertext)} bytes) is not that of "
                        "a wrapped data key"
                    )
                return ciphertext

            request = {
                "name": name,
                "plaintext": plaintext,
                "additional_authenticated_data": aad,
                "plaintext_crc32c": plaintext_crc,
                "additional_authenticated_data_crc32c": aad_crc,
            }
            ciphertext = await self._call("Encrypt", name, request, check)
            return EncryptedDataKey(PROVIDER_ID, self._infos[name], ciphertext)

        # In parallel, not one after another: each is a round trip.
        for edk in await gather_in_order([partial(wrap, name) for name in self.key_names]):
            materials = materials.with_encrypted_data_key(edk)
        return materials

    # -- decrypt -----------------------------------------------------------------------

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        if materials.plaintext_data_key is not None:
            return materials
        attempts: list[tuple[EncryptedDataKey, str]] = []
        malformed = 0
        for edk in encrypted_data_keys:
            if edk.provider_id != PROVIDER_ID:
                continue
            name = self._names.get(edk.provider_info)  # exact: a long info is never ours
            if name is None:
                continue
            if not 0 < len(edk.ciphertext) <= MAX_CIPHERTEXT:
                malformed += 1  # never sent: it cannot be a wrapped data key
                continue
            attempts.append((edk, name))
        aad = materials.serialized_encryption_context
        aad_crc = crc32c(aad)
        length = materials.algorithm_suite.key_length

        def check(response: Any) -> bytes:
            plaintext = bytes(response.plaintext)
            if response.plaintext_crc32c != crc32c(plaintext):
                raise ChecksumMismatch("the plaintext's CRC32C did not match")
            # Its length is checked by the caller, not here: Cloud KMS answered as asked
            # (a data key of another suite, wrapped by anyone with Encrypt permission, is
            # the message's fault, not the service's: no breaker failure for it).
            return plaintext

        failures: list[GcpKmsError] = []
        refused: list[CircuitOpenError] = []
        for edk, name in attempts:
            request = {
                "name": name,
                "ciphertext": edk.ciphertext,
                "additional_authenticated_data": aad,
                "ciphertext_crc32c": crc32c(edk.ciphertext),
                "additional_authenticated_data_crc32c": aad_crc,
            }
            try:
                data_key = await self._call("Decrypt", name, request, check, unwrap=True)
                if len(data_key) == length:
                    return materials.with_data_key(data_key)
                failures.append(
                    GcpKmsError(
                        f"Cloud KMS Decrypt with key {name}: the data key is of the wrong "
                        f"length (not the suite's {length} bytes)",
                        operation="Decrypt",
                        key_id=name,
                        error_code="InvalidResponse",
                        transient=False,
                    )
                )
            except GcpKmsError as exc:
                if exc.error_code == "CredentialUnavailable":
                    raise  # no token: not a wrong key, and no EDK will do
                failures.append(exc)
            except CircuitOpenError as exc:
                refused.append(exc)
        # An EDK that went unanswered (an outage, or its location's breaker open) might
        # have opened the message, whatever the others answered: retry later (a 503),
        # not "no usable key" (a 4xx).
        if refused:
            raise min(refused, key=lambda exc: exc.retry_after)
        outages = [f for f in failures if f.transient]
        if outages:
            raise outages[-1]
        reasons = "; ".join(str(f) for f in failures)
        if malformed:
            reasons += ("; " if reasons else "") + (
                f"{malformed} naming its keys did not hold a Cloud KMS ciphertext (not sent)"
            )
        if not attempts and not malformed:
            reasons = (
                "no encrypted data key names one of its keys; the message's keys: "
                + describe_encrypted_data_keys(encrypted_data_keys)
            )
        raise NoUsableKeyError(
            f"{self._description} could not decrypt any of the message's "
            f"{len(encrypted_data_keys)} encrypted data keys ({len(attempts)} tried): "
            f"{reasons}"
        ) from (failures[-1] if failures else None)
