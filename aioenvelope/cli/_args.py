"""The command line's grammar: subcommands, options and their checks.

Values are checked here, at parse time, whenever they can be, so a typo is a usage error
(exit status 2) before any key is touched or any file opened.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable

from .. import __version__
from ..errors import ConfigurationError
from ..format.header import MAX_FRAME_LENGTH
from ..format.suites import AlgorithmSuite, CommitmentPolicy
from ..keyrings import GcpKmsKeyring
from ..keyrings.azure._key_id import parse_key_url
from ..materials import WRITABLE_SUITES

__all__ = ["PROG", "build_parser", "gcp_endpoint", "is_loopback"]

PROG = "aioenvelope"

_DESCRIPTION = (
    "Envelope encryption in the AWS Encryption SDK message format: files, directories "
    "and pipes, under AWS KMS keys, Vault/OpenBao transit keys, Google Cloud KMS keys, "
    "Azure Key Vault keys and/or raw AES key files."
)


def _context_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _suite(text: str) -> AlgorithmSuite:
    """A writable suite by name or by ID (``0x0478``)."""
    name = text.strip().upper()
    suite = (
        AlgorithmSuite.from_id(int(name, 16))
        if name.startswith("0X") and name[2:].isalnum()
        else AlgorithmSuite.__members__.get(name)
    )
    if suite not in WRITABLE_SUITES:
        choices = ", ".join(sorted(s.name for s in WRITABLE_SUITES))
        raise argparse.ArgumentTypeError(f"{text!r} is not a suite this tool writes ({choices})")
    assert suite is not None
    return suite


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def _policy(text: str) -> CommitmentPolicy:
    try:
        return CommitmentPolicy[text.upper().replace("-", "_")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown commitment policy {text!r}") from None


def _common() -> argparse.ArgumentParser:
    """--debug after the subcommand too (SUPPRESS: an absent flag keeps the top level's)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and logs"
    )
    return common


def _io() -> argparse.ArgumentParser:
    io = argparse.ArgumentParser(add_help=False)
    io.add_argument(
        "input",
        nargs="+",
        metavar="INPUT",
        help="files, directories (recursive) or - for stdin; several need -o DIR/ (like cp)",
    )
    io.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTPUT",
        help="a file, a directory (for a directory INPUT or several INPUTs, or to keep "
        "INPUT's name; DIR/ is created) or - for stdout",
    )
    io.add_argument(
        "--force",
        action="store_true",
        help="replace existing output files; write ciphertext to stdout even on a terminal",
    )
    io.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="in a directory INPUT, follow symbolic links (by default they are skipped, "
        "each reported on stderr); nothing is ever written through a link in the output",
    )
    io.add_argument(
        "-c",
        "--encryption-context",
        dest="context",
        action="append",
        type=_context_pair,
        default=[],
        metavar="KEY=VALUE",
        help="an encryption context pair (repeatable); on decrypt and reencrypt, each must match",
    )
    io.add_argument(
        "--concurrency",
        type=_bounded_int(1, 1024),
        default=8,
        metavar="N",
        help="files processed at once for a directory (default 8)",
    )
    io.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return io


def _keys(*, discovery: bool) -> argparse.ArgumentParser:
    keys = argparse.ArgumentParser(add_help=False)
    group = keys.add_argument_group("keys (several combine: any one of them decrypts)")
    group.add_argument(
        "--kms-key",
        action="append",
        default=[],
        metavar="ID",
        help="a KMS key ID, ARN or alias (repeatable; the first generates the data key)",
    )
    group.add_argument(
        "--raw-key-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a raw AES key file made by `aioenvelope keygen` (repeatable)",
    )
    if discovery:
        group.add_argument(
            "--discovery",
            action="store_true",
            help="decrypt with whichever KMS key each message names",
        )
        group.add_argument(
            "--discovery-account",
            action="append",
            default=[],
            metavar="ACCOUNT",
            help="with --discovery, only keys of this AWS account (repeatable; recommended)",
        )
        group.add_argument(
            "--discovery-partition",
            default="aws",
            metavar="PARTITION",
            help="with --discovery-account (default aws)",
        )
    _hierarchy_options(keys)
    _vault_options(keys)
    _gcp_options(keys)
    _azure_options(keys)
    _aws_options(keys)
    _check_keys_option(keys)
    return keys


def _hierarchy_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """A hierarchical keyring: a branch key of a DynamoDB key store. ``prefix`` is
    ``to-`` for reencrypt's new keys."""
    group = parser.add_argument_group(
        ("new key: " if prefix else "")
        + "hierarchical keyring (no KMS call per message; see `aioenvelope branch-key`)"
    )
    group.add_argument(
        f"--{prefix}branch-key-id",
        metavar="ID",
        help=f"a branch key of the key store below (needs --{prefix}key-store-table, "
        f"--{prefix}key-store-name and its KMS key); with other keys it comes first: it "
        "generates the data key and is tried first to decrypt",
    )
    group.add_argument(
        f"--{prefix}key-store-table", metavar="TABLE", help="the key store's DynamoDB table"
    )
    group.add_argument(
        f"--{prefix}key-store-name",
        metavar="NAME",
        help="the key store's logical name (bound into every branch key; the same for "
        "every reader and writer of the table)",
    )
    group.add_argument(
        f"--{prefix}key-store-kms-key",
        metavar="ARN",
        help=f"the KMS key ARN the key store's branch keys are encrypted under. Without it, "
        f"a single --{prefix}kms-key ARN names that key (and adds no KMS keyring); with it, "
        f"each --{prefix}kms-key adds a KMS keyring as usual",
    )


def _vault_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Vault (or OpenBao) transit keys. ``prefix`` is ``to-`` for reencrypt's new keys,
    whose connection options default to the source side's."""
    new = bool(prefix)
    group = parser.add_argument_group(
        ("new key: " if new else "")
        + "Vault/OpenBao transit keys (the token: VAULT_TOKEN, BAO_TOKEN or a token file)"
    )
    group.add_argument(
        f"--{prefix}vault-key",
        action="append",
        default=[],
        metavar="NAME",
        help="a transit key name (repeatable; the first generates the data key unless a "
        f"branch key or --{prefix}kms-key comes first); only its mount and name are written "
        "into the message, not the server's address",
    )
    group.add_argument(
        f"--{prefix}vault-url",
        metavar="URL",
        help="the Vault server, e.g. https://vault.example.com:8200 (default: "
        + ("--vault-url, else " if new else "")
        + "VAULT_ADDR, else BAO_ADDR)",
    )
    group.add_argument(
        f"--{prefix}vault-mount",
        metavar="MOUNT",
        help="the transit engine's mount path (default: "
        + ("--vault-mount, else " if new else "")
        + "transit)",
    )
    group.add_argument(
        f"--{prefix}vault-token-file",
        metavar="FILE",
        help="a file holding the Vault token (surrounding whitespace ignored; e.g. "
        "~/.vault-token or a Vault Agent sink); default: "
        + ("--vault-token-file, else " if new else "")
        + "VAULT_TOKEN, else BAO_TOKEN. The token is never printed",
    )


def _gcp_key(text: str) -> str:
    """A Cloud KMS key name, checked as the keyring checks it (nothing is opened)."""
    try:
        GcpKmsKeyring(text, check_keys=False)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _azure_key(text: str) -> str:
    """A Key Vault key URL, checked as the keyring checks it."""
    try:
        parse_key_url(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def gcp_endpoint(text: str) -> str:
    """``HOST:PORT`` (``[::1]:PORT`` for an IPv6 address): a Cloud KMS endpoint."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (e.g. kms.example.internal:443), got {text!r}"
        )
    return text


def is_loopback(endpoint: str) -> bool:
    """Whether a ``HOST:PORT`` endpoint is on this machine (localhost, 127.0.0.0/8, ::1)."""
    host = endpoint.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gcp_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Google Cloud KMS keys (credentials: Application Default Credentials, e.g. "
        "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`)"
    )
    group.add_argument(
        "--gcp-key",
        action="append",
        type=_gcp_key,
        default=[],
        metavar="NAME",
        help="a Cloud KMS key, projects/P/locations/L/keyRings/R/cryptoKeys/K (repeatable; "
        "the first generates the data key unless a branch key, --kms-key or --vault-key "
        "comes first; Encrypt uses its primary version, Decrypt any version)",
    )
    group.add_argument(
        "--gcp-endpoint",
        type=gcp_endpoint,
        metavar="HOST:PORT",
        help="the Cloud KMS API endpoint (default cloudkms.googleapis.com:443), e.g. a "
        "Private Service Connect endpoint; for every --gcp-key and --to-gcp-key. On this "
        "machine (localhost, 127.0.0.1, [::1]: an emulator or test server) the channel is "
        "plaintext gRPC and no credentials are looked up or sent",
    )


def _azure_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Azure Key Vault keys (credentials: azure-identity's DefaultAzureCredential: "
        "AZURE_* environment variables, workload or managed identity, `az login`)"
    )
    group.add_argument(
        "--azure-key",
        action="append",
        type=_azure_key,
        default=[],
        metavar="URL",
        help="a Key Vault (or Managed HSM) RSA key, wrapping with RSA-OAEP-256 in the vault: "
        "https://VAULT.vault.azure.net/keys/KEY "
        "(its current version) or .../keys/KEY/VERSION (repeatable; the first generates "
        "the data key unless a branch key, --kms-key, --vault-key or --gcp-key comes first)",
    )
    group.add_argument(
        "--azure-ca-file",
        metavar="FILE",
        help="trust the CA certificates in FILE (PEM) instead of the system's for the "
        "vaults, e.g. behind a TLS-inspecting proxy; for every --azure-key and "
        "--to-azure-key",
    )
    group.add_argument(
        "--azure-no-challenge-resource-check",
        dest="azure_challenge_resource_check",
        action="store_false",
        help="accept a vault's authentication challenge whose resource is not the vault's "
        "own domain (*.vault.azure.net, *.managedhsm.azure.net): needed for a vault reached "
        "under another host name (a private endpoint's custom DNS name, a proxy, a test "
        "server)",
    )


def _aws_options(parser: argparse.ArgumentParser) -> None:
    aws = parser.add_argument_group("AWS connection (KMS, and DynamoDB for a key store)")
    aws.add_argument(
        "--region",
        help="AWS region for key IDs and aliases that are not ARNs, and of a key store's "
        "table (default: the profile's, or AWS_REGION or AWS_DEFAULT_REGION, else the key "
        "store's KMS key's)",
    )
    aws.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="KMS endpoint (a VPC endpoint, or a test server); a key store's DynamoDB "
        "calls use it too",
    )
    aws.add_argument("--profile", help="AWS profile (from ~/.aws/config)")


def _check_keys_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-check-keys",
        dest="check_keys",
        action="store_false",
        help="skip the check each key gets before use: DescribeKey for a --kms-key, a "
        "read of the key for a --vault-key or --azure-key, GetCryptoKey for a --gcp-key "
        "(for a caller allowed to encrypt or decrypt under a key but not to describe or "
        "read it; a wrong key then fails at its first use)",
    )


def _reading() -> argparse.ArgumentParser:
    """Options for commands that read messages."""
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument(
        "--commitment-policy",
        type=_policy,
        default=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT,
        metavar="POLICY",
        help="require-encrypt-require-decrypt (default) or require-encrypt-allow-decrypt "
        "to also read legacy non-committing messages",
    )
    return reading


def _writing() -> argparse.ArgumentParser:
    writing = argparse.ArgumentParser(add_help=False)
    writing.add_argument(
        "--frame-length",
        type=_bounded_int(1, MAX_FRAME_LENGTH),
        default=None,
        metavar="BYTES",
        help="plaintext bytes per frame (default 65536)",
    )
    writing.add_argument(
        "--suite",
        type=_suite,
        default=None,
        metavar="NAME",
        help="algorithm suite: AES_256_GCM_HKDF_SHA512_COMMIT_KEY (default) or "
        "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384 (signed)",
    )
    return writing


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and each subcommand's parser by name (to attach handlers)."""
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, io = _common(), _io()
    encrypt_keys, decrypt_keys = _keys(discovery=False), _keys(discovery=True)
    commands = {
        "encrypt": sub.add_parser(
            "encrypt",
            parents=[common, io, encrypt_keys, _writing()],
            help="encrypt files, a directory or stdin",
        ),
        "decrypt": sub.add_parser(
            "decrypt",
            parents=[common, io, decrypt_keys, _reading()],
            help="decrypt files, a directory or stdin",
        ),
        "reencrypt": sub.add_parser(
            "reencrypt",
            parents=[common, io, decrypt_keys, _reading()],
            help="decrypt messages and encrypt them again under new keys (key rotation)",
        ),
        "inspect": sub.add_parser(
            "inspect", parents=[common], help="print a message's header as JSON (no key needed)"
        ),
        "keygen": sub.add_parser(
            "keygen", parents=[common], help="make a raw AES-256 key file (mode 0600)"
        ),
        "demo": sub.add_parser(
            "demo", parents=[common], help="the quickstart, end to end, on an embedded KMS"
        ),
    }
    _decrypt_options(commands["decrypt"])
    _reencrypt_options(commands["reencrypt"])
    commands["inspect"].add_argument("input", metavar="INPUT", help="a message file or - for stdin")
    _keygen_options(commands["keygen"])
    commands.update(_branch_key_commands(sub, common))
    return parser, commands


def _decrypt_options(decrypt: argparse.ArgumentParser) -> None:
    signed = decrypt.add_mutually_exclusive_group()
    signed.add_argument(
        "--allow-signed",
        dest="allow_signed",
        action="store_true",
        default=True,
        help="accept signed messages (default; the last frame waits for the signature)",
    )
    signed.add_argument(
        "--unsigned-only",
        dest="allow_signed",
        action="store_false",
        help="refuse signed messages, whose earlier frames stream out before the "
        "signature is checked",
    )


def _reencrypt_options(reencrypt: argparse.ArgumentParser) -> None:
    to = reencrypt.add_argument_group("new keys (the new message is readable with these only)")
    to.add_argument("--to-kms-key", action="append", default=[], metavar="ID", help="repeatable")
    to.add_argument(
        "--to-raw-key-file", action="append", default=[], metavar="FILE", help="repeatable"
    )
    to.add_argument(
        "--to-gcp-key",
        action="append",
        type=_gcp_key,
        default=[],
        metavar="NAME",
        help="a Cloud KMS key name (repeatable; reached as --gcp-key's, through --gcp-endpoint)",
    )
    to.add_argument(
        "--to-azure-key",
        action="append",
        type=_azure_key,
        default=[],
        metavar="URL",
        help="a Key Vault key URL (repeatable; reached as --azure-key's, with --azure-ca-file "
        "and --azure-no-challenge-resource-check)",
    )
    _hierarchy_options(reencrypt, "to-")
    _vault_options(reencrypt, "to-")


def _keygen_options(keygen: argparse.ArgumentParser) -> None:
    keygen.add_argument("-o", "--output", required=True, metavar="FILE", help="the key file")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.add_argument("--namespace", default="aioenvelope", help="key namespace (provider ID)")
    keygen.add_argument("--name", default=None, help="key name (default: 16 random hex digits)")


def _key_store(*, name_required: bool) -> argparse.ArgumentParser:
    """The key store every ``branch-key`` action works on, and how AWS is reached."""
    store = argparse.ArgumentParser(add_help=False)
    group = store.add_argument_group("key store")
    group.add_argument(
        "--key-store-table", required=True, metavar="TABLE", help="the DynamoDB table"
    )
    group.add_argument(
        "--key-store-name",
        required=name_required,
        metavar="NAME",
        help="the logical key store name, bound into every branch key's KMS encryption "
        "context: the same for every reader and writer of the table"
        + ("" if name_required else " (not needed here)"),
    )
    group.add_argument(
        "--key-store-kms-key",
        "--kms-key",
        dest="key_store_kms_key",
        required=True,
        metavar="ARN",
        help="the KMS key ARN branch keys are encrypted under (its region is the table's "
        "unless --region or the profile says otherwise)",
    )
    _aws_options(store)
    return store


def _branch_key_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> dict[str, argparse.ArgumentParser]:
    """``branch-key create-table|create|rotate|show``: administer the key store of a
    hierarchical keyring. Keyed ``"branch-key ACTION"`` for usage messages."""
    group = sub.add_parser(
        "branch-key",
        parents=[common],
        help="administer the DynamoDB key store of a hierarchical keyring",
        description="Branch keys for --branch-key-id, in a DynamoDB table, each encrypted "
        "under a KMS key (items as the AWS Cryptographic Material Providers Library's key "
        "store writes them: either tool administers a table the other reads).",
    )
    actions = group.add_subparsers(dest="branch_key_command", required=True, metavar="ACTION")
    named, unnamed = _key_store(name_required=True), _key_store(name_required=False)
    parsers = {
        "create-table": actions.add_parser(
            "create-table",
            parents=[common, unnamed],
            help="create the table (on-demand capacity), or accept an existing key store "
            "table; prints its ARN",
        ),
        "create": actions.add_parser(
            "create",
            parents=[common, named],
            help="create a branch key (never overwrites one); prints its ID",
        ),
        "rotate": actions.add_parser(
            "rotate",
            parents=[common, named],
            help="make a new version of a branch key active (old ones keep decrypting); "
            "prints the new version",
        ),
        "show": actions.add_parser(
            "show",
            parents=[common, named],
            help="print a branch key's active version and encryption context as JSON "
            "(KMS checks the item; no key material is printed)",
        ),
    }
    parsers["create"].add_argument(
        "--branch-key-id", metavar="ID", help="the new branch key's ID (default: a random UUID)"
    )
    parsers["create"].add_argument(
        "-c",
        "--encryption-context",
        dest="context",
        action="append",
        type=_context_pair,
        default=[],
        metavar="KEY=VALUE",
        help="a pair bound into every version of the branch key (repeatable)",
    )
    for action in ("rotate", "show"):
        parsers[action].add_argument("--branch-key-id", required=True, metavar="ID")
    parsers["show"].add_argument(
        "--branch-key-version",
        metavar="UUID",
        help="also check that this version exists and decrypts, and show it",
    )
    return {"branch-key": group} | {f"branch-key {name}": p for name, p in parsers.items()}
