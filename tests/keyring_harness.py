"""What the keyring conformance suite (``test_keyring_conformance.py``) needs from a
keyring, and one fixture per keyring that provides it.

In the manner of the Go CDK's ``secrets/drivertest``: the suite is written once against
a small :class:`KeyringHarness`, and every keyring runs it through one fixture that
builds the harness against its real or wire-level server. A harness is "a backend with
two keys", nothing KMS-specific:

- ``keyring("A")`` / ``keyring("B")``: a fresh keyring on key A or on key B, another key
  of the same backend (``one_attempt=True``: no retries, so that one failed call is one
  failed request: what the circuit-breaker tests count);
- ``several(["A", "B"])``: one keyring that wraps under both keys (the backend's own way,
  e.g. KMS ``additional_key_ids``; by default a ``MultiKeyring`` of the two);
- ``secrets``: the key material the test process holds (raw key bytes), which must
  never show in a repr, a str or an error;
- ``remote``: for a keyring that calls a service, a :class:`RemoteBackend`: make the next
  requests fail (an outage) or be refused (an answer), and count the requests that
  wrap and unwrap data keys, as the server saw them.

What a harness can do is declared when its fixture is registered (:func:`keyring_harness`),
so the suite parametrizes each test over the harnesses that can run it: a test that does
not apply to a keyring is not collected for it, rather than skipped.

Adding a keyring (AWS KMS hierarchical, Vault/OpenBao transit, GCP KMS, Azure Key
Vault, ...) is one fixture here::

    @keyring_harness(Can.CALL_A_REMOTE_SERVICE, Can.BIND_CONTEXT_TO_WRAPPED_KEY)
    def vault_transit_harness(vault_server: VaultServer) -> Iterator[KeyringHarness]:
        with FaultProxy(vault_server.url) as proxy:       # or the server's own faults
            yield KeyringHarness(
                name="vault-transit",
                keyring=lambda key, one_attempt=False: VaultTransitKeyring(...),
                remote=VaultBehindProxy(proxy),           # a RemoteBackend
            )

and its name in :data:`HARNESSES` is what the suite's test IDs show (``conftest.py``
loads this module as a plugin, so its fixtures are visible to the suite). A remote
keyring is then held to what the KMS keyrings do: transient failures retried within a
call, the client's circuit breaker (``Runtime.breaker(breaker_name)``) told of each
outage and each answer, and one token of the decrypt rate limit
(``Runtime.admit_remote_decrypt``) taken per unwrap request.
"""

from __future__ import annotations

import base64
import enum
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pytest
from azure_kv_fake import AzureKeyVaultFake, azure_kv, azure_kv_server
from cryptography.hazmat.primitives.asymmetric import rsa
from fault_proxy import FaultProxy
from gcp_kms_fake import GcpKmsFake, gcp_kms
from google.auth.credentials import AnonymousCredentials
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_keyring
from vault_server import VaultServer, transit_operation, vault_server

from aioenvelope import (
    AzureKeyVaultKeyring,
    BranchKeyStore,
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    GcpKmsKeyring,
    HierarchicalKeyring,
    Keyring,
    MultiKeyring,
    RawAesKeyring,
    RawRsaKeyring,
    VaultTransitKeyring,
    errors,
)
from aioenvelope.runtime import Runtime

__all__ = [
    "HARNESSES",
    "Can",
    "Key",
    "KeyringHarness",
    "RemoteBackend",
    "WatchedKeyring",
    "azure_kv",
    "azure_kv_server",
    "exception_chain",
    "gcp_kms",
    "keyring_harness",
    "leaks",
    "shown_forms",
    "texts_of",
    "vault_server",
]

Key = Literal["A", "B"]

# Long enough that botocore's jittered backoff (up to 1 s before the first retry, 2 s
# before the second) never meets it: the retry tests test retries, not the deadline.
KMS_DEADLINE = 30.0


class Can(enum.Enum):
    """What a harness's keyring can be tested for, beyond what every keyring does."""

    # It calls a service: faults, request counts, the circuit breaker, the rate limit.
    CALL_A_REMOTE_SERVICE = "remote"
    # The encryption context is bound to each wrapped data key (AES-GCM AAD, KMS), so a
    # wrong required pair is refused when unwrapping; without it (RSA) the header's
    # authentication tag refuses it instead.
    BIND_CONTEXT_TO_WRAPPED_KEY = "binds-context"
    # The client may reuse its data keys across messages and cache the ones it
    # recovers (``Keyring.caches_data_keys``). The hierarchical keyring does not: its
    # wraps are local, so every message gets its own data key.
    SHARE_DATA_KEYS = "shares-data-keys"


class RemoteBackend(Protocol):
    """A key service as the test sees it from outside the library."""

    @property
    def breaker_name(self) -> str:
        """The name its circuit breaker has in ``client.stats.breaker_states``."""
        ...

    @property
    def request_error(self) -> type[errors.KeyringError]:
        """What a failed or refused wrap request raises (it has a bool ``transient``)."""
        ...

    def fail_next(self, n: int) -> None:
        """The next ``n`` requests fail as an outage would (a 5xx): ``transient``."""

    def refuse_next(self, n: int) -> None:
        """The next ``n`` requests are answered with a refusal (access denied): the
        service is up, so this is no outage."""

    def wrap_requests(self) -> int:
        """Requests received so far that make or wrap a data key."""
        ...

    def unwrap_requests(self) -> int:
        """Requests received so far that unwrap a data key."""
        ...


def _multi(make: Callable[[Key], Keyring], keys: Sequence[Key]) -> Keyring:
    first, *rest = keys
    return MultiKeyring(generator=make(first), children=[make(k) for k in rest])


@dataclass(frozen=True)
class KeyringHarness:
    """One keyring's way into the conformance suite (see the module docstring)."""

    name: str
    keyring: Callable[..., Keyring]  # (key: Key, *, one_attempt: bool = False)
    several: Callable[[Sequence[Key]], Keyring] | None = None
    secrets: tuple[bytes, ...] = ()
    remote: RemoteBackend | None = None

    def wrapping_all(self, keys: Sequence[Key]) -> Keyring:
        """A keyring that wraps every data key under each of ``keys``."""
        if self.several is not None:
            return self.several(keys)
        return _multi(self.keyring, keys)


HARNESSES: dict[str, frozenset[Can]] = {}
"""Every registered harness fixture, by name, with what it declared it can do."""


def keyring_harness(
    *capabilities: Can,
) -> Callable[[Callable[..., Any]], Any]:
    """Register a harness fixture (function-scoped: each test gets fresh keyrings, and a
    remote backend whose faults and counts start from nothing) with its capabilities."""

    def register(fixture: Callable[..., Any]) -> Any:
        HARNESSES[fixture.__name__] = frozenset(capabilities)
        return pytest.fixture(fixture)

    return register


# -- AWS KMS: moto behind the fault proxy ------------------------------------------------


class KmsBehindProxy:
    """moto KMS seen through a :class:`FaultProxy`: faults are canned KMS error
    responses, counts are the requests the proxy forwarded or answered."""

    def __init__(self, proxy: FaultProxy, region: str) -> None:
        self.proxy = proxy
        self.breaker_name = region  # one breaker per KMS region
        self.request_error: type[errors.KeyringError] = errors.KMSError

    def fail_next(self, n: int) -> None:
        self.proxy.fail_next(n, 500, error_type="KMSInternalException")

    def refuse_next(self, n: int) -> None:
        self.proxy.refuse_next(n, "AccessDeniedException")

    def wrap_requests(self) -> int:
        counts = self.proxy.requests()
        return counts.get("GenerateDataKey", 0) + counts.get("Encrypt", 0)

    def unwrap_requests(self) -> int:
        return self.proxy.requests().get("Decrypt", 0)


@keyring_harness(Can.CALL_A_REMOTE_SERVICE, Can.BIND_CONTEXT_TO_WRAPPED_KEY, Can.SHARE_DATA_KEYS)
def aws_kms_harness(
    moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey, fault_proxy: FaultProxy
) -> KeyringHarness:
    """``KmsKeyring`` against the session's moto server, through the test's fault proxy.
    Keys by ARN, with the start-up DescribeKey (it happens when the client is entered,
    before any test sets a fault)."""
    arns = {"A": kms_key.arn, "B": kms_key_2.arn}

    def keyring(key: Key, *, one_attempt: bool = False, **options: Any) -> Keyring:
        return moto_kms_keyring(
            moto_kms,
            arns[key],
            endpoint_url=fault_proxy.url,
            deadline=KMS_DEADLINE,
            max_attempts=1 if one_attempt else 4,
            **options,
        )

    def several(keys: Sequence[Key]) -> Keyring:
        first, *rest = keys
        return keyring(first, additional_key_ids=[arns[k] for k in rest])

    return KeyringHarness(
        name="aws-kms",
        keyring=keyring,
        several=several,
        remote=KmsBehindProxy(fault_proxy, moto_kms.region),
    )


# -- Vault / OpenBao transit: a real dev server behind the fault proxy --------------------


class VaultBehindProxy:
    """The OpenBao dev server seen through a :class:`FaultProxy`: faults are Vault's own
    error answers (``{"errors": [...]}``), counts the transit requests the proxy saw."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.breaker_name = f"vault {proxy.url}"  # one breaker per server
        self.request_error: type[errors.KeyringError] = errors.VaultError

    def fail_next(self, n: int) -> None:
        self.proxy.json_error_next(n, 500, {"errors": ["injected server error"]})

    def refuse_next(self, n: int) -> None:
        self.proxy.json_error_next(
            n, 403, {"errors": ["1 error occurred:\n\t* permission denied\n\n"]}
        )

    def wrap_requests(self) -> int:
        counts = self.proxy.requests()
        return counts.get("datakey", 0) + counts.get("encrypt", 0)

    def unwrap_requests(self) -> int:
        return self.proxy.requests().get("decrypt", 0)


@keyring_harness(Can.CALL_A_REMOTE_SERVICE, Can.BIND_CONTEXT_TO_WRAPPED_KEY, Can.SHARE_DATA_KEYS)
def vault_transit_harness(vault_server: VaultServer) -> Iterator[KeyringHarness]:
    """``VaultTransitKeyring`` against the session's OpenBao dev server, through a fault
    proxy of its own; two fresh aes256-gcm96 keys per test, checked at start-up (before
    any test sets a fault). Its ``secrets`` are the token's: it must show nowhere either."""
    names = {"A": vault_server.create_key(), "B": vault_server.create_key()}
    with FaultProxy(vault_server.url, operation_of=transit_operation) as proxy:

        def keyring(key: Key, *, one_attempt: bool = False, **options: Any) -> Keyring:
            return VaultTransitKeyring(
                names[key],
                url=proxy.url,
                token=vault_server.root_token,
                deadline=KMS_DEADLINE,
                max_attempts=1 if one_attempt else 4,
                **options,
            )

        def several(keys: Sequence[Key]) -> Keyring:
            first, *rest = keys
            return keyring(first, additional_key_names=[names[k] for k in rest])

        yield KeyringHarness(
            name="vault-transit",
            keyring=keyring,
            several=several,
            secrets=(vault_server.root_token.encode(),),  # the token is the secret here
            remote=VaultBehindProxy(proxy),
        )


# -- Google Cloud KMS: the real async client against tests/gcp_kms_fake.py ---------------


class GcpKmsFakeBackend:
    """The fake Cloud KMS (a gRPC server): faults are gRPC statuses (UNAVAILABLE, as a
    Google front end answers an outage; PERMISSION_DENIED), counts the calls it served."""

    def __init__(self, kms: GcpKmsFake) -> None:
        self.kms = kms
        self.breaker_name = "gcp-kms global"  # one breaker per location
        self.request_error: type[errors.KeyringError] = errors.GcpKmsError

    def fail_next(self, n: int) -> None:
        self.kms.fail_next(n, "UNAVAILABLE")

    def refuse_next(self, n: int) -> None:
        self.kms.fail_next(n, "PERMISSION_DENIED")

    def wrap_requests(self) -> int:
        return self.kms.calls["Encrypt"]

    def unwrap_requests(self) -> int:
        return self.kms.calls["Decrypt"]


@keyring_harness(Can.CALL_A_REMOTE_SERVICE, Can.BIND_CONTEXT_TO_WRAPPED_KEY, Can.SHARE_DATA_KEYS)
def gcp_kms_harness(gcp_kms: GcpKmsFake) -> KeyringHarness:
    """``GcpKmsKeyring`` (google-cloud-kms's real async client, on an insecure channel)
    against a fake Cloud KMS of the test's own; two keys, checked at start-up (before any
    test sets a fault)."""
    names = {"A": gcp_kms.create_key("harness-a"), "B": gcp_kms.create_key("harness-b")}

    def keyring(key: Key, *, one_attempt: bool = False, **options: Any) -> Keyring:
        return GcpKmsKeyring(
            names[key],
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=gcp_kms.client_options(),
            deadline=KMS_DEADLINE,
            max_attempts=1 if one_attempt else 4,
            **options,
        )

    def several(keys: Sequence[Key]) -> Keyring:
        first, *rest = keys
        return keyring(first, additional_key_names=[names[k] for k in rest])

    return KeyringHarness(
        name="gcp-kms", keyring=keyring, several=several, remote=GcpKmsFakeBackend(gcp_kms)
    )


# -- Azure Key Vault: the real async client against tests/azure_kv_fake.py --------------


class AzureKeyVaultFakeBackend:
    """The fake Key Vault (HTTPS, a throwaway CA, the bearer challenge): faults are its
    503 (an outage) and 403 Forbidden (a refusal); counts are its requests for the
    harness's two keys."""

    def __init__(self, vault: AzureKeyVaultFake, names: Sequence[str]) -> None:
        self.vault = vault
        self.names = tuple(names)
        self.breaker_name = f"azure-kv {vault.url}"  # one breaker per vault
        self.request_error: type[errors.KeyringError] = errors.AzureKeyVaultError

    def fail_next(self, n: int) -> None:
        self.vault.fail_next(n, 503)

    def refuse_next(self, n: int) -> None:
        self.vault.refuse_next(n, 403)

    def _count(self, operation: str) -> int:
        return sum(self.vault.requests(name)[operation] for name in self.names)

    def wrap_requests(self) -> int:
        return self._count("wrapkey")

    def unwrap_requests(self) -> int:
        return self._count("unwrapkey")


@keyring_harness(Can.CALL_A_REMOTE_SERVICE, Can.SHARE_DATA_KEYS)
def azure_kv_harness(azure_kv: AzureKeyVaultFake) -> KeyringHarness:
    """``AzureKeyVaultKeyring`` (azure-keyvault-keys' real async client over HTTPS, with
    the 401 bearer challenge) against the session's fake Key Vault; two fresh RSA keys
    per test, checked at start-up (before any test sets a fault). RSA-OAEP takes no
    associated data: the context is bound by the header tag, as for raw RSA. Its
    ``secrets`` are the bearer token and the keys' private exponents."""
    urls = {"A": azure_kv.create_key(), "B": azure_kv.create_key()}
    names = [url.rsplit("/", 1)[1] for url in urls.values()]

    def keyring(key: Key, *, one_attempt: bool = False, **options: Any) -> Keyring:
        return AzureKeyVaultKeyring(
            urls[key],
            credential=azure_kv.credential(),
            client_options=azure_kv.client_options(),
            deadline=KMS_DEADLINE,
            max_attempts=1 if one_attempt else 4,
            **options,
        )

    def several(keys: Sequence[Key]) -> Keyring:
        first, *rest = keys
        return keyring(first, additional_key_ids=[urls[k] for k in rest])

    secrets = (azure_kv.token.encode(), *(s for n in names for s in azure_kv.secrets(n)))
    return KeyringHarness(
        name="azure-kv",
        keyring=keyring,
        several=several,
        secrets=secrets,
        remote=AzureKeyVaultFakeBackend(azure_kv, names),
    )


# -- raw AES and raw RSA: local keys -----------------------------------------------------

RAW_NAMESPACE = "aioenvelope-conformance"


@keyring_harness(Can.BIND_CONTEXT_TO_WRAPPED_KEY, Can.SHARE_DATA_KEYS)
def raw_aes_harness() -> KeyringHarness:
    """``RawAesKeyring``: two AES-256 wrapping keys, ``key-A`` and ``key-B``."""
    keys = {"A": os.urandom(32), "B": os.urandom(32)}

    def keyring(key: Key, *, one_attempt: bool = False) -> Keyring:
        return RawAesKeyring(RAW_NAMESPACE, f"key-{key}", keys[key])

    return KeyringHarness(name="raw-aes", keyring=keyring, secrets=tuple(keys.values()))


@pytest.fixture(scope="session")
def rsa_private_key_b() -> rsa.RSAPrivateKey:
    """A second RSA key for the session (key B of the raw RSA harness)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _rsa_secrets(key: rsa.RSAPrivateKey) -> tuple[bytes, ...]:
    numbers = key.private_numbers()
    return tuple(
        n.to_bytes((n.bit_length() + 7) // 8, "big")
        for n in (numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp)
    )


@keyring_harness(Can.SHARE_DATA_KEYS)
def raw_rsa_harness(
    rsa_private_key: rsa.RSAPrivateKey, rsa_private_key_b: rsa.RSAPrivateKey
) -> KeyringHarness:
    """``RawRsaKeyring`` (OAEP-SHA256) with two 2048-bit key pairs."""
    keys = {"A": rsa_private_key, "B": rsa_private_key_b}

    def keyring(key: Key, *, one_attempt: bool = False) -> Keyring:
        return RawRsaKeyring(RAW_NAMESPACE, f"rsa-{key}", private_key=keys[key])

    secrets = _rsa_secrets(rsa_private_key) + _rsa_secrets(rsa_private_key_b)
    return KeyringHarness(name="raw-rsa", keyring=keyring, secrets=secrets)


# -- AWS KMS hierarchical: branch keys in moto's DynamoDB, unwrapped by moto's KMS ------


@keyring_harness(Can.BIND_CONTEXT_TO_WRAPPED_KEY)
async def aws_kms_hierarchy_harness(
    make_branch_key_store: Callable[..., BranchKeyStore], branch_keys: tuple[str, str]
) -> KeyringHarness:
    """``HierarchicalKeyring`` on two branch keys of one table (keys A and B), each
    keyring on a store of its own. Its remote calls fetch branch keys, which are cached,
    not one per data key: the remote behaviour of the KMS keyrings (a request per wrap
    or unwrap) does not apply, so it is not declared; tests/test_hierarchy_faults.py
    holds it to the breaker, retries, deadline and rate limit. ``secrets`` are the
    branch keys' plaintexts."""
    ids = {"A": branch_keys[0], "B": branch_keys[1]}

    def keyring(key: Key, *, one_attempt: bool = False) -> Keyring:
        return HierarchicalKeyring(make_branch_key_store(), branch_key_id=ids[key])

    secrets = []
    async with make_branch_key_store() as admin:
        for branch_key_id in branch_keys:
            materials = await admin.get_active_branch_key(branch_key_id)
            secrets.append(bytes(materials.key))
            materials.wipe()
    return KeyringHarness(name="aws-kms-hierarchy", keyring=keyring, secrets=tuple(secrets))


# -- seams the suite uses on every keyring -----------------------------------------------


@dataclass
class WatchedKeyring(Keyring):
    """Delegates to ``inner`` (a keyring's public interface, nothing private) and keeps
    what a test needs to see from outside: how often the client asked the keyring, and
    the data keys the keyring produced or recovered."""

    inner: Keyring
    encrypt_calls: int = 0
    decrypt_calls: int = 0
    data_keys: list[bytes] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return f"WatchedKeyring({self.inner!r})"

    @property
    def caches_data_keys(self) -> bool:  # type: ignore[override]
        return self.inner.caches_data_keys

    def attach(self, runtime: Runtime) -> None:
        self.inner.attach(runtime)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        self.encrypt_calls += 1
        result = await self.inner.on_encrypt(materials)
        if result.plaintext_data_key is not None:
            self.data_keys.append(result.plaintext_data_key)
        return result

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        self.decrypt_calls += 1
        result = await self.inner.on_decrypt(materials, encrypted_data_keys)
        if result.plaintext_data_key is not None:
            self.data_keys.append(result.plaintext_data_key)
        return result


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything chained to it (causes, contexts, group members)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        members = getattr(current, "exceptions", ())  # an exception group's (3.10-safe)
        todo.extend(e for e in members if isinstance(e, BaseException))


def shown_forms(secret: bytes) -> list[str]:
    """The ways ``secret`` could show up in text: raw (as latin-1), hex either case,
    base64 (standard and URL-safe), a bytes repr's escapes, and as a decimal integer."""
    return [
        secret.decode("latin-1"),
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret)[2:-1],
        str(int.from_bytes(secret, "big")),
    ]


def texts_of(exc: BaseException) -> list[str]:
    """Everything an error shows along its chain: str, repr and args of each."""
    return [text for e in exception_chain(exc) for text in (str(e), repr(e), str(e.args))]


def leaks(texts: Sequence[str], secrets: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """(secret's name, text) for each text that shows a secret in any form."""
    return [
        (name, text)
        for name, secret in secrets.items()
        for form in shown_forms(secret)
        for text in texts
        if form in text
    ]
