"""A keyring on HashiCorp Vault's (or OpenBao's) transit secrets engine.

Encrypt: one ``datakey/plaintext`` call under ``key_name`` gives the data key and its
first EDK; each additional key wraps it with ``encrypt``, in parallel. Decrypt: ``decrypt``
of each EDK that names one of this keyring's keys, in order, until one opens (an outage
or a failed login ends it: the next EDK would go to the same server).

What is bound to what: the message's encryption context, serialized as the message
format does it, goes to Vault as ``associated_data`` on every call, so an EDK opens only
with the context it was made for (which is why only AEAD key types are accepted; Vault's
``context`` field is ignored for keys that are not derived). EDKs: provider ID
``vault-transit``; provider info ``[namespace/]mount/key`` (no server address, so a
replica or a restored cluster with the same key opens them); ciphertext the
``vault:vN:...`` string as UTF-8. The server's key versions live inside that string:
rotation needs no change here, and ``reencrypt`` to the same keyring moves a message to
the latest version (Vault's ``rewrap`` cannot carry associated data).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from ..._concurrency import gather_in_order
from ...errors import (
    ConfigurationError,
    NoUsableKeyError,
    VaultError,
    VaultKeyCheckError,
)
from ...format.header import EncryptedDataKey
from ..base import (
    DecryptionMaterials,
    EncryptionMaterials,
    Keyring,
    describe_encrypted_data_keys,
    shown_name,
)
from ._auth import AppRoleAuth
from ._transport import VaultTransport

if TYPE_CHECKING:
    import ssl as _ssl

    import aiohttp

    from ...runtime import Runtime

__all__ = ["AEAD_KEY_TYPES", "PROVIDER_ID", "VaultTransitKeyring"]

PROVIDER_ID = "vault-transit"
#: Transit key types that take ``associated_data``, i.e. bind the encryption context.
AEAD_KEY_TYPES = frozenset({"aes128-gcm96", "aes256-gcm96", "chacha20-poly1305"})
# Data key lengths (bytes) that ``datakey`` makes; others (the AES-192 suites) are made
# here and wrapped with ``encrypt``.
_DATAKEY_BITS = {16: 128, 32: 256, 64: 512}
# A wrapped data key is "vault:v<version>:" and base64 of 12 + 32 + 16 bytes: ~100
# characters. Anything much longer is not ours, and is never sent.
_MAX_CIPHERTEXT = 1024
_CIPHERTEXT = re.compile(rb"vault:v[1-9][0-9]{0,9}:[A-Za-z0-9+/]+={0,2}")
_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MOUNT = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def _is_path(text: str) -> bool:
    """A mount or namespace path: segments of letters, digits, '_', '-', '.', none of
    them '.' or '..' (which would step out of it)."""
    return bool(_MOUNT.fullmatch(text)) and not {".", ".."} & set(text.split("/"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


class VaultTransitKeyring(Keyring):
    """Envelope encryption under Vault (or OpenBao) transit keys.

    ``url`` defaults to ``VAULT_ADDR`` (then ``BAO_ADDR``); ``token`` to ``VAULT_TOKEN``
    (then ``BAO_TOKEN``) unless ``auth=AppRoleAuth(...)`` is given. ``namespace`` is sent
    as ``X-Vault-Namespace`` (Vault Enterprise, OpenBao namespaces). ``session`` is an
    ``aiohttp.ClientSession`` of the caller's, used as given and never closed; without
    one the keyring opens its own when the ``EnvelopeClient`` is entered and closes it on
    exit. ``ssl`` goes to each request as aiohttp's ``ssl=`` (an ``SSLContext`` for a
    private CA). Each call has ``deadline`` seconds, retries included, and at most
    ``max_attempts`` attempts. On open each key is read once (``GET <mount>/keys/<name>``)
    to check it exists and is an AEAD key that can encrypt, unless ``check_keys=False``.
    """

    caches_data_keys = True

    def __init__(
        self,
        key_name: str,
        *,
        url: str | None = None,
        token: str | None = None,
        auth: AppRoleAuth | None = None,
        mount: str = "transit",
        namespace: str | None = None,
        additional_key_names: Sequence[str] = (),
        session: aiohttp.ClientSession | None = None,
        ssl: _ssl.SSLContext | bool | None = None,
        deadline: float = 2.0,
        max_attempts: int = 4,
        check_keys: bool = True,
    ) -> None:
        if isinstance(additional_key_names, str):
            raise ConfigurationError("additional_key_names must be a sequence of key names")
        names = [key_name, *additional_key_names]
        for name in names:
            if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
                raise ConfigurationError(
                    f"{name!r} is not a Vault transit key name (letters, digits, '_', '-' "
                    "and '.', no '/')"
                )
        if len(set(names)) != len(names):
            raise ConfigurationError("the same Vault transit key is named twice")
        if not isinstance(mount, str) or not _is_path(mount.strip("/")):
            raise ConfigurationError(f"{mount!r} is not a Vault mount path, e.g. 'transit'")
        mount = mount.strip("/")
        if namespace is not None:
            namespace = namespace.strip("/")
            if not _is_path(namespace):
                raise ConfigurationError(f"{namespace!r} is not a Vault namespace path")
        url = url or _env("VAULT_ADDR", "BAO_ADDR")
        if not url:
            raise ConfigurationError(
                "no Vault address: give url= (e.g. 'https://vault.example.com:8200') or set "
                "VAULT_ADDR"
            )
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError("the Vault url must start with http:// or https://")
        if auth is not None and not isinstance(auth, AppRoleAuth):
            raise ConfigurationError("auth must be an AppRoleAuth")
        if auth is not None and token is not None:
            raise ConfigurationError("give token= or auth=, not both")
        if auth is None:
            token = token or _env("VAULT_TOKEN", "BAO_TOKEN")
            if not token:
                raise ConfigurationError(
                    "no Vault token: give token=, auth=AppRoleAuth(role_id, secret_id), or "
                    "set VAULT_TOKEN"
                )
        if not deadline > 0:
            raise ConfigurationError("deadline must be a positive number of seconds")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        self.key_name = key_name
        self.additional_key_names = tuple(additional_key_names)
        self.mount = mount
        self.namespace = namespace
        self.check_keys = check_keys
        self._transport = VaultTransport(
            url=url,
            token=token,
            auth=auth,
            namespace=namespace,
            session=session,
            ssl=ssl,
            deadline=deadline,
            max_attempts=max_attempts,
        )
        prefix = f"{namespace}/{mount}" if namespace else mount
        #: Each key's EDK provider info, and back.
        self._infos = {name: f"{prefix}/{name}".encode() for name in names}
        self._names = {info: name for name, info in self._infos.items()}

    def __repr__(self) -> str:
        extra = (
            f", additional_key_names={list(self.additional_key_names)!r}"
            if self.additional_key_names
            else ""
        )
        space = f", namespace={self.namespace!r}" if self.namespace else ""
        return (
            f"VaultTransitKeyring({self.key_name!r}{extra}, mount={self.mount!r}{space}, "
            f"url={self._transport.shown_url!r})"
        )

    @property
    def key_names(self) -> tuple[str, ...]:
        return (self.key_name, *self.additional_key_names)

    @property
    def breaker_name(self) -> str:
        """This keyring's circuit breaker in ``client.stats.breaker_states``:
        ``"vault <url>"``, one per server."""
        return self._transport.breaker_name

    @property
    def vault_calls(self) -> Mapping[str, int]:
        """Vault calls made so far, by operation (``datakey``, ``encrypt``, ``decrypt``,
        ``keys``, ``login``, ``renew``, ``lookup``): calls sent, not their retries."""
        return dict(self._transport.calls)

    def provider_info(self, key_name: str) -> bytes:
        """The EDK provider info this keyring writes for ``key_name``."""
        return self._infos[key_name]

    @property
    def _description(self) -> str:
        keys = ", ".join(self._infos[name].decode() for name in self.key_names)
        plural = "s" if len(self.key_names) > 1 else ""
        return f"the Vault transit keyring ({self._transport.shown_url}) with key{plural} {keys}"

    def _key_id(self, name: str) -> str:
        return self._infos[name].decode()

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

    async def _check_key(self, name: str) -> None:
        key_id = self._key_id(name)
        path = f"{self.mount}/keys/{name}"
        try:
            data = await self._transport.call("keys", "GET", path, key_id)
        except VaultError as exc:
            if exc.transient or exc.operation == "login":
                raise  # not checked for want of the server (or of a token): says so itself
            what = {
                "PermissionDenied": (
                    f"the token may not read {path}: grant 'read' on it, or the token is "
                    "not valid (expired, revoked or mistyped: Vault answers both with 403)"
                ),
                "NotFound": (
                    "it does not exist (encrypting to it would create a new key where the "
                    "policy allows: check the name and mount=)"
                ),
            }.get(exc.error_code, f"reading it failed: {exc}")
            raise VaultKeyCheckError(
                f"Vault transit key {key_id} ({self._transport.shown_url}) failed the "
                f"start-up check: {what}. Fix the key or the policy, or pass "
                "check_keys=False to skip this check"
            ) from exc
        problems = []
        kind = data.get("type")
        if kind not in AEAD_KEY_TYPES:
            problems.append(
                f"its type is {shown_name(str(kind), 40)}; only AEAD key types "
                f"({', '.join(sorted(AEAD_KEY_TYPES))}) bind the encryption context"
            )
        if data.get("supports_encryption") is False or data.get("supports_decryption") is False:
            problems.append("it does not support encryption and decryption")
        if data.get("derived") is True:
            problems.append("it is a derived key (convergent or per-context), not supported")
        if problems:
            raise VaultKeyCheckError(
                f"Vault transit key {key_id} cannot be used: " + "; ".join(problems)
            )

    # -- encrypt -----------------------------------------------------------------------

    def _ciphertext(self, data: Mapping[str, Any], operation: str, name: str) -> bytes:
        ciphertext = data.get("ciphertext")
        raw = ciphertext.encode("ascii", "replace") if isinstance(ciphertext, str) else b""
        if len(raw) > _MAX_CIPHERTEXT or not _CIPHERTEXT.fullmatch(raw):
            raise VaultError(
                f"Vault {operation} with key {self._key_id(name)} returned no transit ciphertext",
                operation=operation,
                key_id=self._key_id(name),
                error_code="InvalidResponse",
                transient=False,
            )
        return raw

    def _plaintext(self, data: Mapping[str, Any], length: int, operation: str, name: str) -> bytes:
        try:
            plaintext = base64.b64decode(str(data.get("plaintext", "")), validate=True)
        except (binascii.Error, ValueError):
            plaintext = b""
        if len(plaintext) != length:
            raise VaultError(
                f"Vault {operation} with key {self._key_id(name)} returned a data key of the "
                f"wrong length (not the suite's {length} bytes)",
                operation=operation,
                key_id=self._key_id(name),
                error_code="InvalidResponse",
                transient=False,
            )
        return plaintext

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        aad = _b64(materials.serialized_encryption_context)
        length = materials.algorithm_suite.key_length
        wrap_names: Sequence[str] = self.key_names
        if materials.plaintext_data_key is None:
            bits = _DATAKEY_BITS.get(length)
            if bits is None:
                materials = materials.generate_data_key()  # datakey makes no such length
            else:
                name = self.key_name
                data = await self._transport.call(
                    "datakey",
                    "POST",
                    f"{self.mount}/datakey/plaintext/{name}",
                    self._key_id(name),
                    {"bits": bits, "associated_data": aad},
                )
                edk = EncryptedDataKey(
                    PROVIDER_ID, self._infos[name], self._ciphertext(data, "datakey", name)
                )
                data_key = self._plaintext(data, length, "datakey", name)
                materials = materials.with_data_key(data_key).with_encrypted_data_key(edk)
                wrap_names = self.additional_key_names
        assert materials.plaintext_data_key is not None
        plaintext = _b64(materials.plaintext_data_key)

        async def wrap(name: str) -> EncryptedDataKey:
            data = await self._transport.call(
                "encrypt",
                "POST",
                f"{self.mount}/encrypt/{name}",
                self._key_id(name),
                {"plaintext": plaintext, "associated_data": aad},
            )
            return EncryptedDataKey(
                PROVIDER_ID, self._infos[name], self._ciphertext(data, "encrypt", name)
            )

        # In parallel, not one after another: each is a round trip.
        for edk in await gather_in_order([partial(wrap, name) for name in wrap_names]):
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
            ciphertext = edk.ciphertext
            if len(ciphertext) > _MAX_CIPHERTEXT or not _CIPHERTEXT.fullmatch(ciphertext):
                malformed += 1  # never sent: it cannot be a transit ciphertext
                continue
            attempts.append((edk, name))
        aad = _b64(materials.serialized_encryption_context)
        length = materials.algorithm_suite.key_length
        failures: list[VaultError] = []
        for edk, name in attempts:
            try:
                data = await self._transport.call(
                    "decrypt",
                    "POST",
                    f"{self.mount}/decrypt/{name}",
                    self._key_id(name),
                    {"ciphertext": edk.ciphertext.decode("ascii"), "associated_data": aad},
                    unwrap=True,
                )
            except VaultError as exc:
                if exc.transient or exc.operation != "decrypt":
                    # An outage (every EDK here goes to the same server: the next would
                    # wait out a deadline of its own), or no token: not a wrong key.
                    raise
                failures.append(exc)
                continue
            return materials.with_data_key(self._plaintext(data, length, "decrypt", name))
        reasons = "; ".join(str(f) for f in failures)
        if malformed:
            reasons += ("; " if reasons else "") + (
                f"{malformed} naming its keys did not hold a transit ciphertext (not sent)"
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
