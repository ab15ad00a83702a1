"""A small Azure Key Vault for tests: an HTTPS server that the real client talks to.

Microsoft ships no Key Vault emulator, so this serves the part of Key Vault's REST API
the keyring uses, as ``azure-keyvault-keys`` sends it, on ``https://127.0.0.1:PORT``
(aiohttp, in a thread with its own event loop) with a throwaway CA made here with
``cryptography``. What it does for real:

- the bearer challenge: a request without ``Authorization: Bearer <token>`` (the SDK's
  first, bodiless one) is answered 401 with ``WWW-Authenticate: Bearer
  authorization="https://login.microsoftonline.com/TENANT",
  resource="https://vault.azure.net"``; the SDK then asks its credential for a token and
  sends the request again. The host is not ``*.vault.azure.net``, so the client needs
  ``verify_challenge_resource=False`` (:meth:`AzureKeyVaultFake.client_options`);
- ``GET /keys/{name}[/{version}]``, ``POST /keys/{name}/{version}/wrapkey`` and
  ``/unwrapkey`` with ``api-version`` required; answers shaped as Key Vault's (``key``
  with ``kid``, ``kty``, ``key_ops`` and the public JWK; ``attributes`` with
  ``enabled``; ``{"kid", "value"}`` with base64url values; errors as
  ``{"error": {"code", "message"}}``);
- RSA keys (2048-bit) with real RSA-OAEP-256 and RSA-OAEP; ``oct-HSM`` keys with real
  AES key wrap (A256KW), their JWK without key bytes, as a Managed HSM answers;
- key versions: :meth:`rotate` makes a new current version; old versions still unwrap;
- disabled keys (per version) refuse wrapKey and unwrapKey with 403; ``key_ops``
  without an operation refuses it (400);
- faults for the next N authenticated requests: any status (503, 429 with
  ``Retry-After``, 403, 404...) or a delay before answering;
- a count of requests per key and operation (``get``, ``wrapkey``, ``unwrapkey``),
  faults included, challenges counted apart (``challenge``).

What it does not do: Microsoft Entra ID (the token is a fixed string the fake compares;
no tenant, audience, expiry or signature is checked), RBAC or access policies (every
token may do everything: a 403 is only ever a disabled key or an injected fault),
quotas and throttling, firewalls, Key Vault's exact error texts (those here are modelled
on them), HSM behaviour (key attestation, release policies), soft delete, or any
operation beyond the three above.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime
import ipaddress
import json
import os
import pathlib
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from azure.core.credentials import AccessToken
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)
from cryptography.x509.oid import NameOID

__all__ = ["TENANT", "AzureKeyVaultFake", "StaticTokenCredential", "azure_kv", "azure_kv_server"]

TENANT = "72f988bf-0000-4000-8000-00000000fa4e"
RESOURCE = "https://vault.azure.net"
_ALL_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey")
_OAEP = {
    "RSA-OAEP-256": padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None),
    "RSA-OAEP": padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None),
}
_AES_KW = {"A256KW": 32, "A192KW": 24, "A128KW": 16}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StaticTokenCredential:
    """An async credential (the ``AsyncTokenCredential`` protocol) handing out one fixed
    token, counting its calls and whether it was closed. Its repr shows no token."""

    def __init__(self, token: str) -> None:
        self._token = token
        self.calls = 0
        self.scopes: list[tuple[str, ...]] = []
        self.tenants: list[str | None] = []
        self.closed = False

    def __repr__(self) -> str:
        return f"StaticTokenCredential(calls={self.calls})"

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        self.calls += 1
        self.scopes.append(scopes)
        self.tenants.append(tenant_id)
        return AccessToken(self._token, int(time.time()) + 3600)

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> StaticTokenCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- a throwaway CA ------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost (one day): the CA's
    PEM (what the client trusts), the server's certificate and key PEMs."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("aioenvelope test CA"))
        .issuer_name(_name("aioenvelope test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


# -- keys and faults -------------------------------------------------------------------


@dataclass
class _Version:
    version: str
    kty: str
    private_key: rsa.RSAPrivateKey | None = None
    secret: bytes = b""
    enabled: bool = True


@dataclass
class _Key:
    name: str
    kty: str
    key_ops: tuple[str, ...]
    versions: dict[str, _Version] = field(default_factory=dict)
    current: str = ""


@dataclass
class _Fault:
    status: int = 0  # 0: no answer of its own (a delay only)
    code: str = ""
    message: str = ""
    retry_after: float | None = None
    delay: float = 0.0
    body: bytes | None = None  # answered as is, with content_type (not Key Vault's shape)
    content_type: str = "application/json"
    cut: bool = False  # Content-Length promises more than is sent; then the socket closes


class AzureKeyVaultFake:
    """The server (see the module docstring). Use as a context manager, or the
    ``azure_kv`` fixture (one server per test session, faults cleared per test)."""

    def __init__(self, *, like: AzureKeyVaultFake | None = None) -> None:
        """``like``: another fake whose token and certificates this one shares (a second
        vault that the same credential and CA reach)."""
        self._dir = tempfile.TemporaryDirectory(prefix="azure-kv-fake-")
        if like is None:
            self.token = "fake-kv-token-" + uuid.uuid4().hex
            made = make_certificates(pathlib.Path(self._dir.name))
        else:
            self.token = like.token
            made = (like.ca_path, like._cert, like._key_pem)  # its dir outlives ours
        self.ca_path: pathlib.Path = made[0]
        self._cert: pathlib.Path = made[1]
        self._key_pem: pathlib.Path = made[2]
        self._keys: dict[str, _Key] = {}
        self._faults: collections.deque[_Fault] = collections.deque()
        self._counts: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- life --------------------------------------------------------------------------

    def __enter__(self) -> AzureKeyVaultFake:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
        self._dir.cleanup()

    async def _start(self) -> None:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._cert, self._key_pem)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{port}"

    # -- what a test uses --------------------------------------------------------------

    def credential(self) -> StaticTokenCredential:
        """A credential that hands out the token this vault accepts."""
        return StaticTokenCredential(self.token)

    def client_options(self) -> dict[str, Any]:
        """What the keyring's ``client_options`` need here: trust the throwaway CA, and
        accept a challenge whose resource (vault.azure.net) is not this host."""
        return {"connection_verify": str(self.ca_path), "verify_challenge_resource": False}

    def create_key(
        self,
        name: str | None = None,
        *,
        kty: str = "RSA",
        key_ops: tuple[str, ...] = _ALL_OPS,
    ) -> str:
        """A new key (one version) and its versionless URL."""
        name = name or f"key-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._keys[name] = _Key(name, kty, tuple(key_ops))
        self.rotate(name)
        return f"{self.url}/keys/{name}"

    def rotate(self, name: str) -> str:
        """A new current version of ``name``; the old ones stay (and still unwrap)."""
        key = self._keys[name]
        version = uuid.uuid4().hex
        if key.kty.startswith("RSA"):
            made = _Version(version, key.kty, rsa.generate_private_key(65537, 2048))
        else:
            made = _Version(version, key.kty, secret=os.urandom(32))
        with self._lock:
            key.versions[version] = made
            key.current = version
        return version

    def current_version(self, name: str) -> str:
        return self._keys[name].current

    def set_enabled(self, name: str, enabled: bool, version: str | None = None) -> None:
        """Enable or disable one version of ``name``, or (``version=None``) all of them."""
        with self._lock:
            for made in self._keys[name].versions.values():
                if version is None or made.version == version:
                    made.enabled = enabled

    def fail_next(self, n: int, status: int = 503, *, retry_after: float | None = None) -> None:
        """The next ``n`` authenticated requests are answered ``status`` (an outage)."""
        code = {429: "Throttled", 503: "ServiceUnavailable"}.get(status, "InternalServerError")
        self._add(n, _Fault(status, code, "injected fault", retry_after))

    def refuse_next(
        self, n: int, status: int = 403, code: str = "Forbidden", message: str = ""
    ) -> None:
        """The next ``n`` authenticated requests are refused (403 by default)."""
        message = message or (
            "Caller is not authorized to perform action on resource. (injected)"
            if status == 403
            else "injected refusal"
        )
        self._add(n, _Fault(status, code, message))

    def garble_next(
        self, n: int, status: int = 200, body: bytes = b"{<truncated", content_type: str = ""
    ) -> None:
        """The next ``n`` authenticated requests are answered ``status`` with ``body``,
        which is not what its Content-Type (JSON by default) says (a gateway's page)."""
        self._add(n, _Fault(status, body=body, content_type=content_type or "application/json"))

    def cut_next(self, n: int) -> None:
        """The next ``n`` authenticated requests get a 200 whose body stops after a few
        of its promised bytes, and the connection is closed (a network failure)."""
        self._add(n, _Fault(200, cut=True))

    def delay_next(self, n: int, seconds: float) -> None:
        """The next ``n`` authenticated requests are answered after ``seconds``."""
        self._add(n, _Fault(delay=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests(self, name: str | None = None) -> collections.Counter[str]:
        """Requests so far per operation: for key ``name``, or for every key."""
        with self._lock:
            if name is not None:
                return collections.Counter(self._counts[name])
            total: collections.Counter[str] = collections.Counter()
            for counts in self._counts.values():
                total.update(counts)
            return total

    def secrets(self, name: str) -> tuple[bytes, ...]:
        """Every version's key material (for tests that nothing shows it)."""
        out: list[bytes] = []
        for made in self._keys[name].versions.values():
            if made.private_key is not None:
                d = made.private_key.private_numbers().d
                out.append(d.to_bytes((d.bit_length() + 7) // 8, "big"))
            if made.secret:
                out.append(made.secret)
        return tuple(out)

    def _add(self, n: int, fault: _Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * n)

    # -- the REST API ------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        name = parts[1] if len(parts) >= 2 and parts[0] == "keys" else ""
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            with self._lock:
                self._counts[name]["challenge"] += 1
            await request.read()
            return web.json_response(
                {
                    "error": {
                        "code": "Unauthorized",
                        "message": "AKV10000: Request is missing a Bearer or PoP token.",
                    }
                },
                status=401,
                headers={
                    "WWW-Authenticate": (
                        f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", '
                        f'resource="{RESOURCE}"'
                    )
                },
            )
        operation = "get" if request.method == "GET" else parts[3] if len(parts) == 4 else "other"
        with self._lock:
            self._counts[name][operation] += 1
            fault = self._faults.popleft() if self._faults else None
        body = await request.read()
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.cut:
                response = web.StreamResponse(status=200)
                response.content_type = "application/json"
                response.content_length = 500
                await response.prepare(request)
                await response.write(b'{"kid":"x","val')
                assert request.transport is not None
                request.transport.close()
                return response
            if fault.body is not None:
                return web.Response(
                    status=fault.status, body=fault.body, content_type=fault.content_type
                )
            if fault.status:
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = f"{fault.retry_after:g}"
                return _error(fault.status, fault.code, fault.message, headers=headers)
        if "api-version" not in request.query:
            return _error(400, "BadParameter", "The api-version query parameter is missing.")
        key = self._keys.get(name)
        if parts[0] != "keys" or key is None:
            return _error(
                404, "KeyNotFound", f"A key with (name/id) {name} was not found in this key vault."
            )
        version_name = parts[2] if len(parts) >= 3 and parts[2] else key.current
        made = key.versions.get(version_name)
        if made is None:
            return _error(
                404,
                "KeyNotFound",
                f"A key with (name/id) {name}/{version_name} was not found in this key vault.",
            )
        kid = f"{self.url}/keys/{name}/{made.version}"
        if request.method == "GET" and len(parts) <= 3:
            return web.json_response(self._bundle(key, made, kid))
        if request.method != "POST" or operation not in ("wrapkey", "unwrapkey"):
            return _error(405, "BadParameter", "Operation not supported by this fake.")
        op = "wrapKey" if operation == "wrapkey" else "unwrapKey"
        if not made.enabled:
            return _error(
                403,
                "Forbidden",
                f"Operation {op} is not allowed on a disabled key.",
                inner="KeyDisabled",
            )
        if op not in key.key_ops:
            return _error(400, "BadParameter", f"Operation {op} is not permitted on this key.")
        try:
            params = json.loads(body)
            alg = params["alg"]
            value = unb64url(params["value"])
        except (ValueError, KeyError, TypeError):
            return _error(
                400, "BadParameter", "Property 'value' is required and must be base64url."
            )
        try:
            result = _crypt(made, alg, value, wrap=op == "wrapKey")
        except (ValueError, InvalidUnwrap):
            return _error(400, "BadParameter", "The parameter is incorrect.")
        if result is None:
            return _error(
                400, "BadParameter", f"Algorithm {alg} is not supported for key type {made.kty}."
            )
        return web.json_response({"kid": kid, "value": b64url(result)})

    @staticmethod
    def _bundle(key: _Key, made: _Version, kid: str) -> dict[str, Any]:
        jwk: dict[str, Any] = {"kid": kid, "kty": made.kty, "key_ops": list(key.key_ops)}
        if made.private_key is not None:
            numbers = made.private_key.public_key().public_numbers()
            jwk["n"] = b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
            jwk["e"] = b64url(numbers.e.to_bytes(3, "big"))
        created = int(time.time())
        return {
            "key": jwk,
            "attributes": {
                "enabled": made.enabled,
                "created": created,
                "updated": created,
                "recoveryLevel": "Recoverable+Purgeable",
                "exportable": False,
            },
        }


def _crypt(made: _Version, alg: str, value: bytes, *, wrap: bool) -> bytes | None:
    if made.private_key is not None and alg in _OAEP:
        if wrap:
            return made.private_key.public_key().encrypt(value, _OAEP[alg])
        return made.private_key.decrypt(value, _OAEP[alg])
    if made.secret and alg in _AES_KW:
        kek = made.secret[: _AES_KW[alg]]
        return aes_key_wrap(kek, value) if wrap else aes_key_unwrap(kek, value)
    return None


def _error(
    status: int,
    code: str,
    message: str,
    *,
    inner: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return web.json_response({"error": error}, status=status, headers=headers)


@pytest.fixture(scope="session")
def azure_kv_server() -> Iterator[AzureKeyVaultFake]:
    with AzureKeyVaultFake() as fake:
        yield fake


@pytest.fixture
def azure_kv(azure_kv_server: AzureKeyVaultFake) -> Iterator[AzureKeyVaultFake]:
    """The session's fake Key Vault, with no fault left from another test (make keys of
    your own: counts are per key)."""
    azure_kv_server.clear_faults()
    yield azure_kv_server
    azure_kv_server.clear_faults()
