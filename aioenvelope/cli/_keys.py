"""The command line's keys: the keyring the key options add up to. Raw AES key files
(``keygen``, ``--raw-key-file``) are the library's own format:
:mod:`aioenvelope.keyrings.key_file`. A Vault token file (``--vault-token-file``) holds
the token alone, as ``~/.vault-token`` and a Vault Agent sink do."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioboto3

from ..errors import ConfigurationError
from ..keyrings import (
    AzureKeyVaultKeyring,
    BranchKeyStore,
    DiscoveryFilter,
    GcpKmsKeyring,
    HierarchicalKeyring,
    Keyring,
    KmsDiscoveryKeyring,
    KmsKeyring,
    MultiKeyring,
)
from ..keyrings.key_file import read_raw_key
from ..keyrings.kms_arn import parse_arn
from ..keyrings.vault import VaultTransitKeyring
from ._args import is_loopback
from ._paths import CliError

__all__ = [
    "CloudOptions",
    "HierarchyOptions",
    "KeyOptions",
    "KmsOptions",
    "VaultOptions",
    "branch_key_store",
    "build_keyring",
    "is_key_arn",
    "read_token_file",
]

# A Vault service token is about 100 characters, a batch token a few hundred: a file much
# longer than this is not a token file, and is not read whole.
_MAX_TOKEN_FILE = 16 * 1024


@dataclass(frozen=True)
class KmsOptions:
    """How to reach KMS: shared by every KMS keyring of one command. ``check_keys``
    False (``--no-check-keys``) skips the DescribeKey each KMS key gets on start, for a
    caller allowed to use a key but not to describe it, and the read of each Vault
    transit key (the Vault keyring's own ``check_keys``)."""

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    check_keys: bool = True

    def session(self) -> aioboto3.Session | None:
        """A session for ``--profile``; None lets each keyring use the default chain."""
        return aioboto3.Session(profile_name=self.profile) if self.profile else None


@dataclass(frozen=True)
class HierarchyOptions:
    """A hierarchical keyring's branch key and the key store that holds it."""

    branch_key_id: str
    table: str
    name: str
    kms_key: str


@dataclass(frozen=True)
class VaultOptions:
    """One side's Vault transit keys: the first is the Vault keyring's generator. ``url``
    and ``token`` None leave them to the keyring (``VAULT_ADDR`` then ``BAO_ADDR``,
    ``VAULT_TOKEN`` then ``BAO_TOKEN``). The token is never shown in a repr."""

    key_names: Sequence[str]
    url: str | None = None
    mount: str = "transit"
    token: str | None = field(default=None, repr=False)

    def keyring(self, check_keys: bool) -> VaultTransitKeyring:
        generator, *additional = self.key_names
        return VaultTransitKeyring(
            generator,
            url=self.url,
            token=self.token,
            mount=self.mount,
            additional_key_names=additional,
            check_keys=check_keys,
        )


def read_token_file(path: Path, flag: str) -> str:
    """The Vault token in ``path``, surrounding whitespace (a final newline) removed.

    The file's mode is not checked: Kubernetes mounts secrets 0644 by default and Vault
    Agent writes its sink 0640, and refusing those would refuse the files this option is
    for; this command only reads the file. Whatever is wrong with it, the error names
    the file and ``flag``, never its content."""
    with path.open("rb") as file:
        raw = file.read(_MAX_TOKEN_FILE + 1)
    if len(raw) > _MAX_TOKEN_FILE:
        raise CliError(
            f"{flag} {path}: longer than {_MAX_TOKEN_FILE} bytes, not a Vault token file"
        )
    token = raw.strip()
    if not token:
        raise CliError(f"{flag} {path}: the file is empty (it should hold a Vault token)")
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise CliError(
            f"{flag} {path}: does not hold one Vault token (a single word of printable "
            "ASCII characters, with nothing else in the file)"
        )
    return token.decode("ascii")


@dataclass(frozen=True)
class CloudOptions:
    """How Google Cloud KMS and Azure Key Vault are reached: shared by both sides of a
    reencrypt. Credentials are the vendors' defaults (``google.auth.default()``,
    azure-identity's ``DefaultAzureCredential``), except on a loopback ``gcp_endpoint``."""

    gcp_endpoint: str | None = None
    azure_ca_file: str | None = None
    azure_challenge_resource_check: bool = True

    def gcp_keyring(self, names: Sequence[str], check_keys: bool) -> GcpKmsKeyring:
        """A --gcp-endpoint on this machine (an emulator, a test server) is reached over
        plaintext gRPC with anonymous credentials: nothing would carry a token safely,
        and none is looked for. Any other endpoint is TLS with the default credentials."""
        generator, *additional = names
        options: dict[str, Any] = {}
        credentials: Any = None
        if self.gcp_endpoint is not None and is_loopback(self.gcp_endpoint):
            credentials, options["transport"] = _plaintext_gcp(self.gcp_endpoint)
        elif self.gcp_endpoint is not None:
            options["client_options"] = {"api_endpoint": self.gcp_endpoint}
        return GcpKmsKeyring(
            generator,
            additional_key_names=additional,
            credentials=credentials,
            client_options=options,
            check_keys=check_keys,
        )

    def azure_keyring(self, key_ids: Sequence[str], check_keys: bool) -> AzureKeyVaultKeyring:
        generator, *additional = key_ids
        options: dict[str, Any] = {}
        if self.azure_ca_file is not None:
            options["connection_verify"] = self.azure_ca_file
        if not self.azure_challenge_resource_check:
            options["verify_challenge_resource"] = False
        return AzureKeyVaultKeyring(
            generator, additional_key_ids=additional, client_options=options, check_keys=check_keys
        )


def _plaintext_gcp(endpoint: str) -> tuple[Any, Callable[..., Any]]:
    """Anonymous credentials, and a transport factory the client calls when the keyring
    opens (inside the running loop, where a gRPC channel must be made)."""
    try:
        import grpc
        from google.auth.credentials import AnonymousCredentials
        from google.cloud.kms_v1.services.key_management_service.transports import (
            KeyManagementServiceGrpcAsyncIOTransport,
        )
    except ImportError:
        raise CliError("--gcp-key needs the [gcp] extra: pip install 'aioenvelope[gcp]'") from None

    def transport(**_: Any) -> Any:
        return KeyManagementServiceGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(endpoint))

    return AnonymousCredentials(), transport  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class KeyOptions:
    """One side's keys: a branch key (hierarchical keyring), KMS keys, Vault transit
    keys, raw key files, and discovery (decrypt only). The first of them generates the
    data key."""

    kms_keys: Sequence[str] = ()
    raw_key_files: Sequence[Path] = ()
    discovery: bool = False
    discovery_accounts: Sequence[str] = ()
    discovery_partition: str = "aws"
    hierarchy: HierarchyOptions | None = None
    vault: VaultOptions | None = None
    gcp_keys: Sequence[str] = ()
    azure_keys: Sequence[str] = ()

    def __bool__(self) -> bool:
        return bool(
            self.kms_keys
            or self.raw_key_files
            or self.discovery
            or self.hierarchy is not None
            or self.vault is not None
            or self.gcp_keys
            or self.azure_keys
        )


def is_key_arn(text: str) -> bool:
    """Whether ``text`` is a KMS key ARN, which a key store needs (it records the ARN in
    every item and compares it on every read; an alias could be repointed)."""
    arn = parse_arn(text)
    return arn is not None and arn.resource_type == "key"


def branch_key_store(
    table: str,
    name: str,
    kms_key: str,
    kms: KmsOptions,
    session: aioboto3.Session | None = None,
) -> BranchKeyStore:
    """The key store, reached as KMS is: ``--region`` is the table's region (default: the
    profile's or environment's, else the KMS key ARN's), ``--endpoint-url`` serves both."""
    return BranchKeyStore(
        table,
        logical_key_store_name=name,
        kms_key_id=kms_key,
        session=session,
        region_name=kms.region,
        endpoint_url=kms.endpoint_url,
    )


def build_keyring(
    keys: KeyOptions,
    kms: KmsOptions,
    session: aioboto3.Session | None = None,
    cloud: CloudOptions | None = None,
) -> Keyring:
    """One keyring for all of ``keys``: several combine into a :class:`MultiKeyring` whose
    generator is the first, so any one of them decrypts. The branch key comes first
    (the generator, and the first tried on decrypt: after one fetch it unwraps locally,
    where a KMS key costs a call per message), then KMS keys, Vault transit keys, Cloud
    KMS keys, Key Vault keys, raw keys, discovery. ``--no-check-keys`` (``kms.check_keys``)
    applies to every remote key."""
    cloud = cloud or CloudOptions()
    keyrings: list[Keyring] = []
    if keys.hierarchy is not None:
        store = branch_key_store(
            keys.hierarchy.table, keys.hierarchy.name, keys.hierarchy.kms_key, kms, session
        )
        keyrings.append(HierarchicalKeyring(store, branch_key_id=keys.hierarchy.branch_key_id))
    if keys.kms_keys:
        generator, *additional = keys.kms_keys
        keyrings.append(
            KmsKeyring(
                generator,
                additional_key_ids=additional,
                session=session,
                region_name=kms.region,
                endpoint_url=kms.endpoint_url,
                check_keys=kms.check_keys,
            )
        )
    if keys.vault is not None:
        keyrings.append(keys.vault.keyring(kms.check_keys))
    if keys.gcp_keys:
        keyrings.append(cloud.gcp_keyring(keys.gcp_keys, kms.check_keys))
    if keys.azure_keys:
        keyrings.append(cloud.azure_keyring(keys.azure_keys, kms.check_keys))
    keyrings.extend(read_raw_key(path).keyring() for path in keys.raw_key_files)
    if keys.discovery:
        discovery_filter = (
            DiscoveryFilter(keys.discovery_accounts, keys.discovery_partition)
            if keys.discovery_accounts
            else None
        )
        keyrings.append(
            KmsDiscoveryKeyring(
                discovery_filter=discovery_filter,
                session=session,
                region_name=kms.region,
                endpoint_url=kms.endpoint_url,
            )
        )
    if not keyrings:
        raise ConfigurationError("no key given")
    return keyrings[0] if len(keyrings) == 1 else MultiKeyring(keyrings[0], keyrings[1:])
