"""A small Google Cloud KMS for tests: a real gRPC server that the real client talks to.

Google ships no Cloud KMS emulator, so this serves the three methods the keyring uses
(``google.cloud.kms.v1.KeyManagementService``'s ``Encrypt``, ``Decrypt`` and
``GetCryptoKey``) on ``127.0.0.1``, with the ``google.cloud.kms_v1.types`` messages on
the wire (proto-plus ``serialize``/``deserialize``, i.e. the same protobuf bytes Google
sends). What it does for real:

- AES-256-GCM per key version, with the request's ``additional_authenticated_data`` as
  the AAD: a ciphertext opens only under its key and with its AAD;
- versions: :meth:`GcpKmsFake.rotate` makes a new primary; the ciphertext names its
  version (``0x01 | version (4 bytes) | nonce (12) | AES-GCM``), so old ones still open;
- CRC32C: the request's ``plaintext_crc32c``, ``ciphertext_crc32c`` and
  ``additional_authenticated_data_crc32c`` are checked (a mismatch is INVALID_ARGUMENT,
  as Google documents) and the ``verified_*`` flags set; responses carry their CRC32C;
- faults for the next N calls (any method): a status code (UNAVAILABLE,
  RESOURCE_EXHAUSTED, PERMISSION_DENIED, NOT_FOUND...), a delay, a wrong response CRC32C,
  or ``verified_*`` flags left false;
- a count of calls per method, faults included.

What it does not do: IAM (every caller may do everything: a PERMISSION_DENIED is only
ever an injected one), quotas, Google's exact error texts (those here are modelled on
them), protection levels, other key purposes' operations, or authentication (the client
reaches it over an insecure channel, and its credentials are never presented; with
``local_credentials=True`` they are asked for a token, but the server does not check it).
"""

from __future__ import annotations

import asyncio
import collections
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import google_crc32c
import grpc
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud.kms_v1 import types
from google.cloud.kms_v1.services.key_management_service import KeyManagementServiceAsyncClient
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcAsyncIOTransport,
)

__all__ = ["GcpKmsFake", "crc32c", "fake_transport", "gcp_kms"]

SERVICE = "google.cloud.kms.v1.KeyManagementService"
KEY_RING = "projects/test-project/locations/global/keyRings/test-ring"
_FORMAT = 1
_HEADER = struct.Struct(">BI")  # format, version
_NONCE = 12
_Request = TypeVar("_Request")


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


@dataclass
class _Key:
    name: str
    purpose: int  # a types.CryptoKey.CryptoKeyPurpose
    versions: dict[int, bytes] = field(default_factory=dict, repr=False)
    states: dict[int, int] = field(default_factory=dict)  # each a CryptoKeyVersionState
    primary: int = 0


@dataclass(frozen=True)
class _Fault:
    code: grpc.StatusCode | None = None
    message: str = ""
    delay: float = 0.0
    corrupt_crc: bool = False
    unverified: bool = False


class GcpKmsFake:
    """The server. Use ``async with GcpKmsFake() as kms`` inside the test's loop, then
    :meth:`create_key` and :meth:`client_options` for the keyring."""

    def __init__(self, *, local_credentials: bool = False) -> None:
        #: Serve with gRPC's local (loopback) credentials rather than on an insecure
        #: port: then the client's call credentials (google-auth's plugin) run.
        self.local_credentials = local_credentials
        self.keys: dict[str, _Key] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self._faults: collections.deque[_Fault] = collections.deque()
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> GcpKmsFake:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([self._handler()])
        if self.local_credentials:
            local = grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP)
            port = server.add_secure_port("127.0.0.1:0", local)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    # -- keys ----------------------------------------------------------------------------

    def create_key(
        self,
        key_id: str,
        *,
        purpose: str = "ENCRYPT_DECRYPT",
        location: str = "global",
    ) -> str:
        """A new key with one enabled primary version; its resource name. ``purpose`` is
        a ``CryptoKeyPurpose`` name (only ENCRYPT_DECRYPT keys encrypt); ``location``
        replaces ``KEY_RING``'s (another location: another breaker in the client)."""
        ring = KEY_RING.replace("/locations/global/", f"/locations/{location}/")
        name = f"{ring}/cryptoKeys/{key_id}"
        self.keys[name] = _Key(name, getattr(types.CryptoKey.CryptoKeyPurpose, purpose))
        self.rotate(name)
        return name

    def rotate(self, name: str) -> int:
        """A new version, made primary (the old ones stay enabled); its number."""
        key = self.keys[name]
        version = max(key.versions, default=0) + 1
        key.versions[version] = os.urandom(32)
        key.states[version] = types.CryptoKeyVersion.CryptoKeyVersionState.ENABLED
        key.primary = version
        return version

    def set_state(self, name: str, version: int, state: str) -> None:
        """Set a version's state (``"DISABLED"``, ``"DESTROYED"``, ``"ENABLED"``)."""
        self.keys[name].states[version] = getattr(
            types.CryptoKeyVersion.CryptoKeyVersionState, state
        )

    # -- faults --------------------------------------------------------------------------

    def fail_next(self, n: int, code: str = "UNAVAILABLE", message: str = "") -> None:
        """The next ``n`` calls end with status ``code`` (a ``grpc.StatusCode`` name)."""
        status = grpc.StatusCode[code]
        text = message or {
            "UNAVAILABLE": "The service is currently unavailable.",
            "RESOURCE_EXHAUSTED": "Quota exceeded for quota metric 'Cryptographic requests'.",
            "PERMISSION_DENIED": (
                "Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied on resource "
                "(or it may not exist)."
            ),
            "NOT_FOUND": "CryptoKey not found.",
            "INTERNAL": "Internal error encountered.",
        }.get(code, f"injected {code}")
        self._faults.extend(_Fault(code=status, message=text) for _ in range(n))

    def delay_next(self, n: int, seconds: float) -> None:
        """The next ``n`` calls are answered (normally) only after ``seconds``."""
        self._faults.extend(_Fault(delay=seconds) for _ in range(n))

    def corrupt_crc_next(self, n: int) -> None:
        """The next ``n`` responses carry a wrong CRC32C of their ciphertext or plaintext
        (as if corrupted on the way back)."""
        self._faults.extend(_Fault(corrupt_crc=True) for _ in range(n))

    def unverified_next(self, n: int) -> None:
        """The next ``n`` Encrypt responses say the request's CRC32Cs were not verified
        (as if a proxy had dropped those fields)."""
        self._faults.extend(_Fault(unverified=True) for _ in range(n))

    # -- the client's way in ------------------------------------------------------------

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for ``KeyManagementServiceAsyncClient`` (the keyring's
        ``client_options=``): a transport on an insecure channel to this server, made when
        the client is (so inside the running loop)."""
        return {"transport": fake_transport(self.address)}

    def authenticated_client_options(self) -> dict[str, Any]:
        """Like :meth:`client_options`, for a fake made with ``local_credentials=True``:
        the transport is made with the keyring's credentials on a local (loopback) secure
        channel, so google-auth's plugin asks them for a token before each call."""

        def make(credentials: Any = None, **_: Any) -> KeyManagementServiceGrpcAsyncIOTransport:
            return KeyManagementServiceGrpcAsyncIOTransport(
                host=self.address,
                credentials=credentials,
                ssl_channel_credentials=grpc.local_channel_credentials(
                    grpc.LocalConnectionType.LOCAL_TCP
                ),
            )

        return {"transport": make}

    def client(self) -> KeyManagementServiceAsyncClient:
        """A client of the test's own (a caller's ``client=``): close its transport."""
        return KeyManagementServiceAsyncClient(transport=fake_transport(self.address))

    # -- the service ---------------------------------------------------------------------

    def _handler(self) -> grpc.GenericRpcHandler:
        def method(
            fn: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
            request: Any,
            response: Any,
        ) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=request.deserialize, response_serializer=response.serialize
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Encrypt": method(self._encrypt, types.EncryptRequest, types.EncryptResponse),
                "Decrypt": method(self._decrypt, types.DecryptRequest, types.DecryptResponse),
                "GetCryptoKey": method(
                    self._get_crypto_key, types.GetCryptoKeyRequest, types.CryptoKey
                ),
            },
        )

    async def _fault(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> _Fault:
        self.calls[method] += 1
        fault = self._faults.popleft() if self._faults else _Fault()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.code is not None:
            await context.abort(fault.code, fault.message)
        return fault

    async def _key(self, name: str, context: grpc.aio.ServicerContext[Any, Any]) -> _Key:
        key = self.keys.get(name)
        if key is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"CryptoKey {name} not found.")
        assert key is not None
        return key

    @staticmethod
    async def _check_crc(
        context: grpc.aio.ServicerContext[Any, Any], field: str, data: bytes, crc: int | None
    ) -> bool:
        if crc is None:
            return False
        if crc32c(data) != crc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The checksum in field {field} did not match the data in field "
                f"{field.removesuffix('_crc32c')}.",
            )
        return True

    async def _encrypt(
        self, request: types.EncryptRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> types.EncryptResponse:
        fault = await self._fault("Encrypt", context)
        key = await self._key(request.name, context)
        if key.purpose != types.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{key.name} is not an ENCRYPT_DECRYPT key."
            )
        version = key.primary
        if key.states[version] != types.CryptoKeyVersion.CryptoKeyVersionState.ENABLED:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{key.name}/cryptoKeyVersions/{version} is not enabled.",
            )
        aad = request.additional_authenticated_data
        verified_plaintext = await self._check_crc(
            context, "plaintext_crc32c", request.plaintext, request.plaintext_crc32c
        )
        verified_aad = await self._check_crc(
            context,
            "additional_authenticated_data_crc32c",
            aad,
            request.additional_authenticated_data_crc32c,
        )
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(key.versions[version]).encrypt(nonce, request.plaintext, aad or None)
        ciphertext = _HEADER.pack(_FORMAT, version) + nonce + sealed
        crc = crc32c(ciphertext) ^ (1 if fault.corrupt_crc else 0)
        return types.EncryptResponse(
            name=f"{key.name}/cryptoKeyVersions/{version}",
            ciphertext=ciphertext,
            ciphertext_crc32c=crc,
            verified_plaintext_crc32c=verified_plaintext and not fault.unverified,
            verified_additional_authenticated_data_crc32c=verified_aad and not fault.unverified,
            protection_level=types.ProtectionLevel.SOFTWARE,
        )

    async def _decrypt(
        self, request: types.DecryptRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> types.DecryptResponse:
        fault = await self._fault("Decrypt", context)
        key = await self._key(request.name, context)
        ciphertext = request.ciphertext
        aad = request.additional_authenticated_data
        await self._check_crc(context, "ciphertext_crc32c", ciphertext, request.ciphertext_crc32c)
        await self._check_crc(
            context,
            "additional_authenticated_data_crc32c",
            aad,
            request.additional_authenticated_data_crc32c,
        )
        invalid = "Decryption failed: the ciphertext is invalid."
        if len(ciphertext) < _HEADER.size + _NONCE + 16:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, invalid)
        form, version = _HEADER.unpack_from(ciphertext)
        material = key.versions.get(version) if form == _FORMAT else None
        if material is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, invalid)
        assert material is not None
        if key.states[version] != types.CryptoKeyVersion.CryptoKeyVersionState.ENABLED:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{key.name}/cryptoKeyVersions/{version} is not enabled.",
            )
        nonce = ciphertext[_HEADER.size : _HEADER.size + _NONCE]
        try:
            plaintext = AESGCM(material).decrypt(
                nonce, ciphertext[_HEADER.size + _NONCE :], aad or None
            )
        except InvalidTag:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, invalid)
            raise  # not reached: abort raises
        crc = crc32c(plaintext) ^ (1 if fault.corrupt_crc else 0)
        return types.DecryptResponse(
            plaintext=plaintext,
            plaintext_crc32c=crc,
            used_primary=version == key.primary,
            protection_level=types.ProtectionLevel.SOFTWARE,
        )

    async def _get_crypto_key(
        self, request: types.GetCryptoKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> types.CryptoKey:
        await self._fault("GetCryptoKey", context)
        key = await self._key(request.name, context)
        return types.CryptoKey(
            name=key.name,
            purpose=key.purpose,
            primary=types.CryptoKeyVersion(
                name=f"{key.name}/cryptoKeyVersions/{key.primary}",
                state=key.states[key.primary],
                protection_level=types.ProtectionLevel.SOFTWARE,
                algorithm=types.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
            ),
        )


def fake_transport(address: str) -> Callable[..., KeyManagementServiceGrpcAsyncIOTransport]:
    """A transport factory for ``KeyManagementServiceAsyncClient(transport=...)``: the
    client calls it (with its credentials, host and so on, unused here) when it is made,
    and it opens an insecure gRPC channel to ``address`` then, inside the running loop."""

    def make(**_: Any) -> KeyManagementServiceGrpcAsyncIOTransport:
        return KeyManagementServiceGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(address))

    return make


@pytest.fixture
async def gcp_kms() -> AsyncIterator[GcpKmsFake]:
    """A fresh fake Cloud KMS for the test, on the test's loop, stopped after it."""
    async with GcpKmsFake() as kms:
        yield kms
