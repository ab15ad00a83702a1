"""A keyring on Azure Key Vault (or Managed HSM) keys: remote wrapKey and unwrapKey.

Encrypt: a data key from ``os.urandom``, wrapped by Key Vault under ``key_id`` and each
additional key, in parallel (``POST /keys/NAME/VERSION/wrapkey``). Decrypt: unwrapKey
of each EDK that names one of this keyring's keys, in order, until one opens.

Always remote, on purpose (see ``_transport``): the wrap is where Key Vault enforces the
wrapKey permission, a disabled or expired key, and its audit log; an ``oct-HSM`` key has
no local path at all.

What is bound to what: RSA-OAEP (and AES key wrap) take no associated data, so the
encryption context is **not** bound to the wrapped data key. It is bound the way the
ESDK's raw RSA keyring binds it: the message header, context included, is authenticated
by a tag under a key derived from the data key, so a message whose context was changed
fails authentication. EDKs: provider ID ``azure-kv``; provider info the key's versioned
URL, ``https://NAME.vault.azure.net/keys/KEY/VERSION`` (Key Vault's own ``kid``: the
versionless URL, ``/``, the version the data key was wrapped under); ciphertext the
wrapped key as Key Vault returns it (raw bytes, not base64url).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from ..._concurrency import gather_in_order
from ...errors import (
    AzureKeyVaultError,
    AzureKeyVaultKeyCheckError,
    CircuitOpenError,
    ConfigurationError,
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
from ._key_id import VERSION, KeyUrl, parse_key_url
from ._transport import AUTH_CODES, AzureTransport

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

    from ...runtime import Runtime

__all__ = ["ALGORITHMS", "PROVIDER_ID", "AzureKeyVaultKeyring"]

log = logging.getLogger("aioenvelope.azure")

PROVIDER_ID = "azure-kv"
#: Wrap algorithms, and the key types (JWK ``kty``) each needs. RSA1_5 is not offered.
ALGORITHMS: Mapping[str, frozenset[str]] = {
    "RSA-OAEP-256": frozenset({"RSA", "RSA-HSM"}),
    "RSA-OAEP": frozenset({"RSA", "RSA-HSM"}),
    "A256KW": frozenset({"oct-HSM", "oct"}),
    "A192KW": frozenset({"oct-HSM", "oct"}),
    "A128KW": frozenset({"oct-HSM", "oct"}),
}
# An RSA-16384 key wraps to 2048 bytes; anything longer is not ours and is never sent.
_MAX_CIPHERTEXT = 2048
# A versioned key URL is ~100 characters; a longer provider info is never parsed.
_MAX_INFO = 512
#: Seconds after which an unpinned key's current version is read again (GET), so that a
#: long-lived client follows a rotation; a failed read keeps the version it has and
#: tries again a minute later.
VERSION_REFRESH = 600.0
_REFRESH_RETRY = 60.0


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: object) -> bytes | None:
    if not isinstance(text, str) or len(text) > 4 * _MAX_CIPHERTEXT:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


class AzureKeyVaultKeyring(Keyring):
    """Envelope encryption under Azure Key Vault (or Managed HSM) keys.

    ``key_id`` (and each of ``additional_key_ids``) is a key URL,
    ``https://NAME.vault.azure.net/keys/KEY`` (its current version, read when the client
    is entered and again every 10 minutes, so a rotation is followed) or
    ``.../keys/KEY/VERSION`` (that version). Data keys are wrapped under
    every key; any one of them unwraps (any version of it). ``credential`` is an async
    azure-identity credential, used as given and never closed; without one, azure-identity's
    ``DefaultAzureCredential`` is made when the ``EnvelopeClient`` is entered and closed
    on exit. ``algorithm``: ``RSA-OAEP-256`` (RSA keys) or ``A256KW`` (``oct-HSM`` keys of
    a Managed HSM); wraps always go to Key Vault, never done locally. ``client_options``
    go to each ``CryptographyClient`` (``transport``, ``connection_verify``,
    ``verify_challenge_resource``, ``api_version``...), except retry settings: each call
    has ``deadline`` seconds, retries included, and at most ``max_attempts`` attempts;
    and except logging settings (``logging_enable`` logs the token and data keys). On
    open each key is read (GET) to check it exists, is enabled, fits the algorithm and
    permits wrapKey and unwrapKey, unless ``check_keys=False``.
    """

    caches_data_keys = True

    def __init__(
        self,
        key_id: str,
        *,
        additional_key_ids: Sequence[str] = (),
        credential: AsyncTokenCredential | None = None,
        algorithm: str = "RSA-OAEP-256",
        deadline: float = 2.0,
        check_keys: bool = True,
        client_options: Mapping[str, Any] | None = None,
        max_attempts: int = 4,
    ) -> None:
        if isinstance(additional_key_ids, str):
            raise ConfigurationError("additional_key_ids must be a sequence of key URLs")
        keys = [parse_key_url(k) for k in (key_id, *additional_key_ids)]
        if len({k.versionless for k in keys}) != len(keys):
            raise ConfigurationError("the same Key Vault key is named twice")
        if algorithm not in ALGORITHMS:
            raise ConfigurationError(
                f"algorithm must be one of {', '.join(ALGORITHMS)}, not "
                f"{shown_name(str(algorithm), 40)}"
            )
        if not deadline > 0:
            raise ConfigurationError("deadline must be a positive number of seconds")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        options = dict(client_options or {})
        retry = sorted(k for k in options if k.startswith("retry_"))
        if retry:
            raise ConfigurationError(
                f"client_options may not set {', '.join(retry)}: the keyring retries within "
                "deadline= (and max_attempts=), the SDK's retries are turned off"
            )
        logging_options = sorted(k for k in options if "logging" in k.lower() or k == "logger")
        if logging_options:
            raise ConfigurationError(
                f"client_options may not set {', '.join(logging_options)}: azure-core's "
                "network trace logs the bearer token and the wrapkey and unwrapkey bodies, "
                "which hold the plaintext data key; the keyring logs its calls itself "
                "(logger 'aioenvelope.azure')"
            )
        if credential is not None and not callable(getattr(credential, "get_token", None)):
            raise ConfigurationError(
                "credential must be an async azure-identity credential (with get_token), "
                "e.g. azure.identity.aio.DefaultAzureCredential()"
            )
        self._keys = tuple(keys)
        self._by_versionless = {k.versionless: k for k in keys}
        self.algorithm = algorithm
        self.check_keys = check_keys
        #: The version each key wraps under: pinned, or read on open.
        self._versions: dict[str, str] = {k.versionless: k.version for k in keys if k.version}
        self._version_lock: anyio.Lock | None = None
        self._read_at: dict[str, float] = {}  # when each unpinned key's version was read
        self._clock: Callable[[], float] = time.monotonic
        vaults: dict[str, str] = {}
        for key in keys:
            vaults.setdefault(key.vault_url, key.versionless)
        self._transport = AzureTransport(
            vaults=vaults,
            credential=credential,
            client_options=options,
            deadline=deadline,
            max_attempts=max_attempts,
        )

    def __repr__(self) -> str:
        first, *rest = (self._shown(k) for k in self._keys)
        extra = f", additional_key_ids={rest!r}" if rest else ""
        return f"AzureKeyVaultKeyring({first!r}{extra}, algorithm={self.algorithm!r})"

    @staticmethod
    def _shown(key: KeyUrl) -> str:
        return key.with_version(key.version) if key.version else key.versionless

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The configured keys' URLs (with a version where one was pinned)."""
        return tuple(self._shown(k) for k in self._keys)

    @property
    def breaker_name(self) -> str:
        """The circuit breaker of ``key_id``'s vault in ``client.stats.breaker_states``:
        ``"azure-kv https://NAME.vault.azure.net"``, one per vault."""
        return AzureTransport.breaker_name(self._keys[0].vault_url)

    def provider_info(self, key_id: str, version: str) -> bytes:
        """The EDK provider info this keyring writes for ``version`` of ``key_id``."""
        return parse_key_url(key_id).with_version(version).encode()

    @property
    def _description(self) -> str:
        plural = "s" if len(self._keys) > 1 else ""
        return f"the Azure Key Vault keyring with key{plural} " + ", ".join(self.key_ids)

    def attach(self, runtime: Runtime) -> None:
        self._transport.runtime = runtime
        self._clock = runtime.clock

    async def open(self) -> None:
        self._version_lock = anyio.Lock()
        await self._transport.open()
        try:
            if self.check_keys:
                await gather_in_order([partial(self._check_key, key) for key in self._keys])
        except BaseException:
            await self._transport.close()
            raise

    async def close(self) -> None:
        await self._transport.close()
        for key in self._keys:
            if key.version is None:
                self._versions.pop(key.versionless, None)  # read again on the next open
                self._read_at.pop(key.versionless, None)

    # -- the key: its current version and the start-up check ----------------------------

    async def _get_key(self, key: KeyUrl) -> tuple[str, Mapping[str, Any]]:
        """GET the key (its pinned or current version): the version and the answer."""
        data = await self._transport.call(
            "get",
            "GET",
            key.vault_url,
            f"/keys/{key.name}/{key.version or ''}",
            key.versionless,
        )
        jwk = data.get("key")
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        parts = kid.rsplit("/", 2) if isinstance(kid, str) else []
        if (
            len(parts) != 3
            or parts[1].lower() != key.name.lower()
            or not VERSION.fullmatch(parts[2])
            or (key.version is not None and parts[2] != key.version)
        ):
            raise AzureKeyVaultError(
                f"Azure Key Vault get with key {key.versionless} answered with no key "
                "identifier of that key",
                operation="get",
                key_id=key.versionless,
                error_code="InvalidResponse",
                transient=False,
            )
        return parts[2], data

    async def _check_key(self, key: KeyUrl) -> None:
        try:
            version, data = await self._get_key(key)
        except AzureKeyVaultError as exc:
            if exc.transient or exc.error_code in AUTH_CODES:
                raise  # not checked for want of the vault (or of a token): says so itself
            what = {
                "Forbidden": (
                    "the credential may not read it: grant keys/get (the role 'Key Vault "
                    "Crypto Service Encryption User' has get, wrapKey and unwrapKey)"
                ),
                "KeyNotFound": "it does not exist in this vault (check the name and the version)",
            }.get(exc.error_code, f"reading it failed: {exc}")
            raise AzureKeyVaultKeyCheckError(
                f"Azure Key Vault key {self._shown(key)} failed the start-up check: {what}. "
                "Fix the key or the permissions, or pass check_keys=False to skip this check"
            ) from exc
        jwk = data.get("key") or {}
        attributes = data.get("attributes")
        attributes = attributes if isinstance(attributes, dict) else {}
        problems = []
        if attributes.get("enabled") is False:
            problems.append("it is disabled")
        now = datetime.datetime.now(datetime.timezone.utc).timestamp()
        expires = attributes.get("exp")
        if isinstance(expires, (int, float)) and expires <= now:
            problems.append("it has expired")
        not_before = attributes.get("nbf")
        if isinstance(not_before, (int, float)) and not_before > now:
            problems.append("it is not valid yet (nbf)")
        kty = jwk.get("kty")
        if kty not in ALGORITHMS[self.algorithm]:
            problems.append(
                f"its key type is {shown_name(str(kty), 20)}, which cannot wrap with "
                f"{self.algorithm} (needs {' or '.join(sorted(ALGORITHMS[self.algorithm]))})"
            )
        ops = jwk.get("key_ops")
        ops = set(ops) if isinstance(ops, list) else set()
        missing = [op for op in ("wrapKey", "unwrapKey") if op not in ops]
        if missing:
            problems.append(f"its permitted operations (key_ops) lack {' and '.join(missing)}")
        if problems:
            raise AzureKeyVaultKeyCheckError(
                f"Azure Key Vault key {self._shown(key)} (version {version}) cannot be used: "
                + "; ".join(problems)
            )
        if key.version is None:
            self._versions[key.versionless] = version
            self._read_at[key.versionless] = self._clock()

    def _fresh(self, key: KeyUrl) -> str | None:
        version = self._versions.get(key.versionless)
        if version is None or key.version is not None:
            return version
        if self._clock() - self._read_at.get(key.versionless, 0.0) < VERSION_REFRESH:
            return version
        return None

    async def _version(self, key: KeyUrl) -> str:
        """The version ``key`` wraps under: pinned, or its current one as read on open
        (or, with ``check_keys=False``, on first use) and again every
        ``VERSION_REFRESH`` seconds; one read shared by concurrent callers."""
        version = self._fresh(key)
        if version is not None:
            return version
        lock = self._version_lock
        if lock is None:
            raise ConfigurationError(
                "the Azure Key Vault keyring is not open: use it inside "
                "`async with EnvelopeClient(...)`"
            )
        async with lock:
            version = self._fresh(key)
            if version is not None:
                return version
            old = self._versions.get(key.versionless)
            try:
                version, _ = await self._get_key(key)
            except AzureKeyVaultError as exc:
                if old is None:
                    raise
                log.warning(
                    "Azure Key Vault key %s: reading its current version failed (%s); "
                    "wrapping under version %s meanwhile",
                    key.versionless,
                    exc.error_code,
                    old,
                )
                self._read_at[key.versionless] = self._clock() - VERSION_REFRESH + _REFRESH_RETRY
                return old
            self._versions[key.versionless] = version
            self._read_at[key.versionless] = self._clock()
        return version

    # -- encrypt -----------------------------------------------------------------------

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        if materials.plaintext_data_key is None:
            materials = materials.generate_data_key()
        assert materials.plaintext_data_key is not None
        value = _b64url(materials.plaintext_data_key)

        async def wrap(key: KeyUrl) -> EncryptedDataKey:
            version = await self._version(key)
            data = await self._transport.call(
                "wrapkey",
                "POST",
                key.vault_url,
                f"/keys/{key.name}/{version}/wrapkey",
                key.versionless,
                {"alg": self.algorithm, "value": value},
            )
            wrapped = _unb64url(data.get("value"))
            if not wrapped or len(wrapped) > _MAX_CIPHERTEXT:
                raise AzureKeyVaultError(
                    f"Azure Key Vault wrapkey with key {key.versionless} returned no wrapped key",
                    operation="wrapkey",
                    key_id=key.versionless,
                    error_code="InvalidResponse",
                    transient=False,
                )
            return EncryptedDataKey(PROVIDER_ID, key.with_version(version).encode(), wrapped)

        # In parallel, not one after another: each is a round trip.
        for edk in await gather_in_order([partial(wrap, key) for key in self._keys]):
            materials = materials.with_encrypted_data_key(edk)
        return materials

    # -- decrypt -----------------------------------------------------------------------

    def _ours(self, edk: EncryptedDataKey) -> tuple[KeyUrl, str] | None:
        """The configured key and version an EDK names, or None: matched exactly against
        the configured keys, so a message never picks the host or the path."""
        if edk.provider_id != PROVIDER_ID or len(edk.provider_info) > _MAX_INFO:
            return None
        try:
            info = edk.provider_info.decode("ascii")
        except UnicodeDecodeError:
            return None
        versionless, _, version = info.rpartition("/")
        key = self._by_versionless.get(versionless)
        if key is None or not VERSION.fullmatch(version):
            return None
        return key, version

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        if materials.plaintext_data_key is not None:
            return materials
        attempts: list[tuple[EncryptedDataKey, KeyUrl, str]] = []
        malformed = 0
        for edk in encrypted_data_keys:
            ours = self._ours(edk)
            if ours is None:
                continue
            if not edk.ciphertext or len(edk.ciphertext) > _MAX_CIPHERTEXT:
                malformed += 1  # never sent: no key of ours wraps to that
                continue
            attempts.append((edk, *ours))
        length = materials.algorithm_suite.key_length
        failures: list[AzureKeyVaultError] = []
        outages: list[AzureKeyVaultError | CircuitOpenError] = []
        down: set[str] = set()  # vaults that failed transiently: their other EDKs would too
        refused: list[AzureKeyVaultError] = []  # a vault refused the token: try the others
        for edk, key, version in attempts:
            if key.vault_url in down:
                continue
            try:
                data = await self._transport.call(
                    "unwrapkey",
                    "POST",
                    key.vault_url,
                    f"/keys/{key.name}/{version}/unwrapkey",
                    key.versionless,
                    {"alg": self.algorithm, "value": _b64url(edk.ciphertext)},
                    unwrap=True,
                )
            except AzureKeyVaultError as exc:
                if exc.error_code == "CredentialUnavailable":
                    raise  # no token at all: no vault will do
                if exc.error_code in AUTH_CODES:
                    refused.append(exc)  # this vault refused the token; another may not
                    down.add(key.vault_url)
                elif exc.transient:
                    outages.append(exc)  # another vault may still answer
                    down.add(key.vault_url)
                else:
                    failures.append(exc)
                continue
            except CircuitOpenError as exc:
                outages.append(exc)  # that vault's breaker is open: another may answer
                down.add(key.vault_url)
                continue
            data_key = _unb64url(data.get("value"))
            if data_key is None or len(data_key) != length:
                failures.append(
                    AzureKeyVaultError(
                        f"Azure Key Vault unwrapkey with key {key.versionless} (version "
                        f"{version}) gave a data key of the wrong length (not the suite's "
                        f"{length} bytes)",
                        operation="unwrapkey",
                        key_id=key.versionless,
                        error_code="InvalidResponse",
                        transient=False,
                    )
                )
                continue
            return materials.with_data_key(data_key)
        if refused:
            raise refused[0]  # not a wrong key: the credential is not let in
        if outages:
            raise outages[0]  # an outage (or an open breaker), not a wrong key: retry later
        reasons = "; ".join(str(f) for f in failures)
        if malformed:
            reasons += ("; " if reasons else "") + (
                f"{malformed} naming its keys held no wrapped key of a possible size (not sent)"
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
