"""The command line's grammar: subcommands, options and their checks.

Values are checked here, at parse time, whenever they can be, so a typo is a usage error
(exit status 2) before any key is touched or any file opened.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from . import __version__
from .format.header import MAX_FRAME_LENGTH
from .format.suites import AlgorithmSuite, CommitmentPolicy
from .materials import WRITABLE_SUITES

__all__ = ["PROG", "build_parser"]

PROG = "aioenvelope"

_DESCRIPTION = (
    "Envelope encryption in the AWS Encryption SDK message format: files, directories "
    "and pipes, under AWS KMS keys and/or raw AES key files."
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
    io.add_argument("input", metavar="INPUT", help="a file, a directory (recursive) or - for stdin")
    io.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTPUT",
        help="a file, a directory (for a directory INPUT, or to keep INPUT's name) or - for stdout",
    )
    io.add_argument("--force", action="store_true", help="replace existing output files")
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
    kms = keys.add_argument_group("AWS KMS connection")
    kms.add_argument("--region", help="AWS region for key IDs and aliases that are not ARNs")
    kms.add_argument(
        "--endpoint-url", metavar="URL", help="KMS endpoint (a VPC endpoint, or a test server)"
    )
    kms.add_argument("--profile", help="AWS profile (from ~/.aws/config)")
    return keys


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


def _keygen_options(keygen: argparse.ArgumentParser) -> None:
    keygen.add_argument("-o", "--output", required=True, metavar="FILE", help="the key file")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.add_argument("--namespace", default="aioenvelope", help="key namespace (provider ID)")
    keygen.add_argument("--name", default=None, help="key name (default: 16 random hex digits)")
