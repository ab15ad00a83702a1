"""The ``aioenvelope`` command: parse, run one command, map failures to exit statuses.

``encrypt``, ``decrypt`` and ``reencrypt`` stream files, directory trees and pipes through
the library at constant memory; ``inspect`` prints a header as JSON; ``keygen`` makes a
raw AES key file; ``demo`` runs the quickstart against an embedded KMS.

The contract scripts rely on: exit status 0 on success, 1 when an operation failed, 2 for
a usage error; a failure is one line on stderr (``--debug`` adds the traceback), in the
command line's words (flags, not the library's parameters); a file output appears whole
or not at all, and is never replaced without ``--force``. When the reader of stdout stops
early (``aioenvelope decrypt ... -o - | head``), the command ends quietly with status 0,
as ``gzip -dc | head`` does: the reader chose to stop.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn

import anyio
import anyio.abc

from ..batch import BatchProgress, run_batch
from ..client import DEFAULT_FRAME_LENGTH, EnvelopeClient
from ..errors import EnvelopeError
from ..keyrings import Keyring
from ..keyrings.key_file import RawKey, write_raw_key
from ..streams import DecryptingStream, EncryptingStream, StreamSource
from ._args import PROG, build_parser
from ._branch_key import branch_key_command
from ._inspect import header_json, read_header
from ._io import MessageStream, Transform, progress_bar, run_job
from ._keys import (
    CloudOptions,
    HierarchyOptions,
    KeyOptions,
    KmsOptions,
    VaultOptions,
    build_keyring,
    is_key_arn,
    read_token_file,
)
from ._messages import in_cli_words
from ._paths import (
    STDIO,
    CliError,
    Plan,
    UsageError,
    check_destination,
    decrypted_name,
    encrypted_name,
    make_dirs,
    plan_jobs,
    remove_empty_dirs,
    same_name,
)

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], Awaitable[int]]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser, commands = build_parser()
    handlers: dict[str, Handler] = {
        "encrypt": _encrypt,
        "decrypt": _decrypt,
        "reencrypt": _reencrypt,
        "inspect": _inspect,
        "keygen": _keygen,
        "demo": _demo,
        "branch-key": branch_key_command,
    }
    args, extra = parser.parse_known_args(argv)
    action = getattr(args, "branch_key_command", None)  # branch-key's own actions
    command = commands[f"{args.command} {action}" if action else args.command]
    _take_inputs(command, args, extra)
    debug = bool(args.debug)
    _quiet_libraries(debug)
    try:
        status = anyio.run(_terminable, handlers[args.command], args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then handled below
        return status
    except UsageError as exc:
        command.print_usage(sys.stderr)
        print(f"{command.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        _exit_now(130)
    except _Terminated:
        _error("terminated")
        _exit_now(128 + signal.SIGTERM)
    except Exception as exc:
        if _reader_stopped(exc):
            _silence_stdout()
            return 0
        if debug:
            traceback.print_exc()
        _error(_describe(exc))
        return 1


def _take_inputs(
    command: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]
) -> None:
    """INPUTs after an option (``encrypt a -o DIR/ b``) are INPUTs too, as with ``cp``;
    anything else left over is the subcommand's usage error (with its usage, not the
    top level's)."""
    inputs = getattr(args, "input", None)
    if isinstance(inputs, list) and all(
        word == STDIO or not word.startswith("-") for word in extra
    ):
        inputs.extend(extra)
        extra = []
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")


def _reader_stopped(exc: BaseException) -> bool:
    """Whether ``exc`` is stdout's reader having closed the pipe (EPIPE): only stdout is
    ever a pipe we write to (files are written whole, KMS errors are botocore's)."""
    while (inner := getattr(exc, "exceptions", None)) and len(inner) == 1:
        exc = inner[0]
    return isinstance(exc, BrokenPipeError)


def _quiet_libraries(debug: bool) -> None:
    """Stderr carries one line per failure, so library logs and warnings (a retried KMS
    call, a deprecation) stay off it unless --debug asks for them."""
    if debug:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("aioenvelope").setLevel(logging.DEBUG)
        return
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _describe(exc: BaseException) -> str:
    """One readable line for ``exc``; the type is named only for unexpected errors."""
    while (inner := getattr(exc, "exceptions", None)) and len(inner) == 1:
        exc = inner[0]  # an exception group around one error: report that error
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split())
    if isinstance(exc, EnvelopeError):
        return in_cli_words(text)
    if isinstance(exc, CliError) or type(exc).__module__.startswith("botocore"):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Terminated(BaseException):
    """SIGTERM arrived, and the command was cancelled as Ctrl-C cancels it."""


async def _terminable(handler: Handler, args: argparse.Namespace) -> int:
    """Run ``handler`` with SIGTERM handled like SIGINT: the work is cancelled, so an
    output file being written is discarded and the directories made for it removed,
    instead of the default action killing the process mid-write. The status, then, is
    143 (128 + SIGTERM). The receiver is in place before the handler starts."""
    terminated = False
    status = 0
    failure: Exception | None = None
    async with anyio.create_task_group() as group:

        async def watch(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            nonlocal terminated
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                task_status.started()
                async for _ in signals:
                    terminated = True
                    group.cancel_scope.cancel()
                    return

        await group.start(watch)
        try:
            status = await handler(args)
        except Exception as exc:  # raised below, outside the group (not as a group)
            failure = exc
        finally:
            group.cancel_scope.cancel()
    if terminated:
        raise _Terminated
    if failure is not None:
        raise failure
    return status


def _exit_now(status: int) -> NoReturn:
    """Exit without joining worker threads: one may be blocked reading stdin from a
    pipe that never closes, and the interpreter's normal exit would wait for it. Output
    files are safe: write_atomically discarded its unfinished file when interrupted."""
    sys.stderr.flush()
    os._exit(status)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into the closed pipe
    does not print an error (the Python docs' note on SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


# -- encrypt, decrypt, reencrypt ---------------------------------------------------------


def _context(args: argparse.Namespace) -> dict[str, str]:
    context: dict[str, str] = {}
    for key, value in args.context:
        if key in context:
            raise UsageError(f"encryption context key {key!r} given twice")
        context[key] = value
    return context


def _hierarchy(
    args: argparse.Namespace, prefix: str = ""
) -> tuple[HierarchyOptions | None, tuple[str, ...]]:
    """The branch key options of one side (``prefix`` ``to_`` for reencrypt's new keys)
    and the KMS keys left for KMS keyrings.

    The key store's KMS key is ``--key-store-kms-key``; without it, as the issue's
    ``--branch-key-id ID --key-store-table T --key-store-name N --kms-key K`` reads, a
    single ``--kms-key`` names it and adds no KMS keyring. Never both meanings at once:
    several ``--kms-key`` with a branch key and no ``--key-store-kms-key`` are refused."""
    flag = "--" + prefix.replace("_", "-")
    kms_keys = tuple(getattr(args, f"{prefix}kms_key"))
    branch_key_id: str | None = getattr(args, f"{prefix}branch_key_id")
    store = {
        "key-store-table": getattr(args, f"{prefix}key_store_table"),
        "key-store-name": getattr(args, f"{prefix}key_store_name"),
        "key-store-kms-key": getattr(args, f"{prefix}key_store_kms_key"),
    }
    if branch_key_id is None:
        given = [f"{flag}{option}" for option, value in store.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} is for a branch key: give {flag}branch-key-id ID")
        return None, kms_keys
    table, name, kms_key = store.values()
    source = f"{flag}key-store-kms-key"
    if kms_key is None and len(kms_keys) == 1:
        (kms_key,), kms_keys, source = kms_keys, (), f"{flag}kms-key (with {flag}branch-key-id)"
    elif kms_key is None and kms_keys:
        raise UsageError(
            f"with {flag}branch-key-id, {flag}kms-key names the key store's KMS key, and "
            f"{len(kms_keys)} were given: name the key store's key with "
            f"{flag}key-store-kms-key ARN; each {flag}kms-key then adds a KMS keyring"
        )
    missing = [
        text
        for value, text in (
            (table, f"{flag}key-store-table TABLE"),
            (name, f"{flag}key-store-name NAME"),
            (kms_key, f"the key store's KMS key ({flag}key-store-kms-key ARN)"),
        )
        if value is None
    ]
    if missing:
        raise UsageError(f"{flag}branch-key-id needs " + ", ".join(missing))
    if not is_key_arn(kms_key):
        raise UsageError(
            f"{source} must be the key store's KMS key ARN "
            f"(arn:aws:kms:REGION:ACCOUNT:key/ID), not {kms_key!r}"
        )
    return HierarchyOptions(branch_key_id, table, name, kms_key), kms_keys


def _environment(*names: str) -> str | None:
    """The first of ``names`` set (and not empty) in the environment, as the Vault
    keyring reads its address and token."""
    return next((value for name in names if (value := os.environ.get(name))), None)


def _vault(
    args: argparse.Namespace, prefix: str = "", *, serves_target: bool = False
) -> VaultOptions | None:
    """The Vault transit keys of one side (``prefix`` ``to_`` for reencrypt's new keys,
    whose connection options default to the source side's).

    The server and a token are required here, before any file is opened: a usage error
    naming this side's flags. The token file is read here; a token from the environment
    is left to the keyring to read. ``serves_target``: the source side's connection
    options may be given for the new keys alone (reencrypt from KMS to Vault)."""
    flag = "--" + prefix.replace("_", "-")
    names = tuple(getattr(args, f"{prefix}vault_key"))
    own = {
        option: getattr(args, f"{prefix}vault_{option}")
        for option in ("url", "mount", "token_file")
    }
    if not names:
        given = [option for option, value in own.items() if value is not None]
        if given and not serves_target:
            option = f"{flag}vault-{given[0].replace('_', '-')}"
            raise UsageError(f"{option} is for a Vault key: give {flag}vault-key NAME")
        return None
    url, mount, token_file = (
        value if value is not None or not prefix else getattr(args, f"vault_{option}")
        for option, value in own.items()
    )
    fallback = " (or --vault-url)" if prefix else ""
    url = url or _environment("VAULT_ADDR", "BAO_ADDR")
    if not url:
        raise UsageError(
            f"{flag}vault-key needs the Vault server's address: give {flag}vault-url URL"
            f"{fallback} or set VAULT_ADDR (or BAO_ADDR)"
        )
    token: str | None = None
    if token_file is not None:
        source = f"{flag}vault-token-file" if own["token_file"] else "--vault-token-file"
        try:
            token = read_token_file(Path(token_file), source)
        except OSError as exc:
            raise CliError(f"{source} {token_file}: {exc.strerror}") from None
    elif not _environment("VAULT_TOKEN", "BAO_TOKEN"):
        fallback = " (or --vault-token-file)" if prefix else ""
        raise UsageError(
            f"{flag}vault-key needs a Vault token: set VAULT_TOKEN (or BAO_TOKEN), or give "
            f"{flag}vault-token-file FILE{fallback}"
        )
    return VaultOptions(names, url=url, mount=mount or "transit", token=token)


def _key_options(args: argparse.Namespace, *, vault_serves_target: bool = False) -> KeyOptions:
    hierarchy, kms_keys = _hierarchy(args)
    keys = KeyOptions(
        kms_keys=kms_keys,
        raw_key_files=tuple(Path(p) for p in args.raw_key_file),
        discovery=bool(getattr(args, "discovery", False)),
        discovery_accounts=tuple(getattr(args, "discovery_account", ())),
        discovery_partition=str(getattr(args, "discovery_partition", "aws")),
        hierarchy=hierarchy,
        vault=_vault(args, serves_target=vault_serves_target),
        gcp_keys=tuple(args.gcp_key),
        azure_keys=tuple(args.azure_key),
    )
    if keys.discovery_accounts and not keys.discovery:
        raise UsageError("--discovery-account needs --discovery")
    if not keys:
        extra = ", --discovery" if hasattr(args, "discovery") else ""
        raise UsageError(
            "give a key: --kms-key ID, --branch-key-id ID, --vault-key NAME, "
            f"--gcp-key NAME, --azure-key URL, --raw-key-file FILE{extra}"
        )
    return keys


def _cloud(args: argparse.Namespace, *sides: KeyOptions) -> CloudOptions:
    """How Cloud KMS and Key Vault are reached, for both sides. Their options without a
    key of theirs on either side are usage errors (a mistyped flag would otherwise be
    ignored), and a CA file must be readable before any file is opened."""
    gcp = any(side.gcp_keys for side in sides)
    azure = any(side.azure_keys for side in sides)
    if args.gcp_endpoint is not None and not gcp:
        raise UsageError("--gcp-endpoint is for a Cloud KMS key: give --gcp-key NAME")
    azure_options = [
        flag
        for flag, given in (
            ("--azure-ca-file", args.azure_ca_file is not None),
            ("--azure-no-challenge-resource-check", not args.azure_challenge_resource_check),
        )
        if given
    ]
    if azure_options and not azure:
        raise UsageError(f"{azure_options[0]} is for a Key Vault key: give --azure-key URL")
    if args.azure_ca_file is not None:
        try:
            with open(args.azure_ca_file, "rb"):
                pass
        except OSError as exc:
            raise CliError(f"--azure-ca-file {args.azure_ca_file}: {exc.strerror}") from None
    return CloudOptions(
        gcp_endpoint=args.gcp_endpoint,
        azure_ca_file=args.azure_ca_file,
        azure_challenge_resource_check=args.azure_challenge_resource_check,
    )


def _keyrings(args: argparse.Namespace, *sides: KeyOptions) -> list[Keyring]:
    """One keyring per side, sharing one AWS session (for --profile)."""
    cloud = _cloud(args, *sides)
    kms = KmsOptions(
        region=args.region,
        endpoint_url=args.endpoint_url,
        profile=args.profile,
        check_keys=args.check_keys,
    )
    uses_kms = any(side.kms_keys or side.discovery or side.hierarchy for side in sides)
    session = kms.session() if uses_kms else None
    return [build_keyring(side, kms, session, cloud) for side in sides]


def _plan(
    args: argparse.Namespace,
    rename: Callable[[str], str],
    *,
    skip_encrypted: bool = False,
    ciphertext: bool = False,
) -> Plan:
    """The jobs, with a single output checked before any key is used. ``skip_encrypted``
    (encrypt): files found in a directory that are already messages are left alone.
    ``ciphertext`` (encrypt, reencrypt): binary output is not written to a terminal
    unless ``--force``, as age and gpg refuse to."""
    plan = plan_jobs(
        args.input,
        args.output,
        rename,
        follow_symlinks=args.follow_symlinks,
        skip_encrypted=skip_encrypted,
    )
    if not plan.batch and plan.jobs[0].destination is not None:
        check_destination(plan.jobs[0].destination, args.force)
    to_stdout = not plan.batch and plan.jobs[0].destination is None
    if ciphertext and to_stdout and not args.force and sys.stdout.isatty():
        raise UsageError(
            "refusing to write binary ciphertext to a terminal: redirect stdout "
            "(> FILE, or | into a command), or pass --force to write it anyway"
        )
    return plan


async def _run(plan: Plan, transform: Transform, args: argparse.Namespace) -> int:
    progress = not args.quiet
    if not plan.batch:
        await run_job(plan.jobs[0], transform, overwrite=args.force, progress=progress)
        return 0
    return await _run_tree(
        plan,
        transform,
        overwrite=args.force,
        concurrency=args.concurrency,
        progress=progress,
        debug=bool(args.debug),
    )


async def _run_tree(
    plan: Plan,
    transform: Transform,
    *,
    overwrite: bool,
    concurrency: int,
    progress: bool,
    debug: bool,
) -> int:
    """Every file of a directory, ``concurrency`` at once; a failure is reported (one
    line per file) and the others still finish."""
    for link in plan.skipped:  # reported, but not a failure: skipping is the default
        print(f"{PROG}: skipped symbolic link {link} (see --follow-symlinks)", file=sys.stderr)
    for path in plan.already_encrypted:  # a second run over its own output
        print(f"{PROG}: skipped {path} (already encrypted)", file=sys.stderr)
    make_dirs(plan)
    bar = progress_bar(len(plan.jobs), unit="file") if progress else None

    def advance(_: BatchProgress) -> None:
        if bar is not None:
            bar.update(1)

    try:
        results = await run_batch(
            plan.jobs,
            lambda job: run_job(job, transform, overwrite=overwrite, progress=False),
            concurrency=concurrency,
            on_progress=advance,
        )
    finally:
        if bar is not None:
            bar.close()
        remove_empty_dirs(plan)
    failed = [result for result in results if result.error is not None]
    for result in failed:
        assert result.error is not None
        if debug:
            traceback.print_exception(result.error)
        _error(f"{result.item.label}: {_describe(result.error)}")
    if failed:
        _error(f"{len(failed)} of {len(results)} files failed")
        return 1
    return 0


async def _encrypt(args: argparse.Namespace) -> int:
    context = _context(args)
    keys = _key_options(args)
    plan = _plan(args, encrypted_name, skip_encrypted=True, ciphertext=True)
    (keyring,) = _keyrings(args, keys)
    frame_length: int = args.frame_length or DEFAULT_FRAME_LENGTH
    async with EnvelopeClient(
        keyring, algorithm_suite=args.suite, frame_length=frame_length
    ) as client:

        def transform(source: StreamSource, length: int | None) -> EncryptingStream:
            return client.encrypt_stream(
                source, encryption_context=context, plaintext_length=length
            )

        return await _run(plan, transform, args)


async def _decrypt(args: argparse.Namespace) -> int:
    context = _context(args)
    keys = _key_options(args)
    plan = _plan(args, decrypted_name)
    (keyring,) = _keyrings(args, keys)
    allow_signed: bool = args.allow_signed
    async with EnvelopeClient(keyring, commitment_policy=args.commitment_policy) as client:

        def transform(source: StreamSource, length: int | None) -> DecryptingStream:
            return client.decrypt_stream(
                source, encryption_context=context, allow_signed=allow_signed
            )

        return await _run(plan, transform, args)


async def _reencrypt(args: argparse.Namespace) -> int:
    context = _context(args)
    to_hierarchy, to_kms_keys = _hierarchy(args, "to_")
    to_keys = KeyOptions(
        kms_keys=to_kms_keys,
        raw_key_files=tuple(Path(p) for p in args.to_raw_key_file),
        hierarchy=to_hierarchy,
        vault=_vault(args, "to_"),
        gcp_keys=tuple(args.to_gcp_key),
        azure_keys=tuple(args.to_azure_key),
    )
    if not to_keys:
        raise UsageError(
            "give the new keys: --to-kms-key ID, --to-raw-key-file FILE, "
            "--to-vault-key NAME, --to-gcp-key NAME, --to-azure-key URL and/or "
            "--to-branch-key-id ID"
        )
    keys = _key_options(args, vault_serves_target=to_keys.vault is not None)
    plan = _plan(args, same_name, ciphertext=True)
    keyring, to_keyring = _keyrings(args, keys, to_keys)
    async with EnvelopeClient(keyring, commitment_policy=args.commitment_policy) as client:

        def transform(source: StreamSource, length: int | None) -> MessageStream:
            # ``length`` (the input file's size) bounds the plaintext's, which lets a
            # directory's files share cached data keys of the new keys.
            return client._reencrypt_stream(
                source,
                to_keyring=to_keyring,
                encryption_context=context,
                algorithm_suite=None,
                frame_length=None,
                length_bound=length,
            )

        return await _run(plan, transform, args)


# -- inspect, keygen, demo ------------------------------------------------------------------


async def _inspect(args: argparse.Namespace) -> int:
    header = await read_header(None if args.input == STDIO else Path(args.input))
    print(json.dumps(header_json(header), indent=2, ensure_ascii=False))
    return 0


async def _keygen(args: argparse.Namespace) -> int:
    if args.output == STDIO:
        raise UsageError(
            "a key is never written to stdout (-): on a terminal or down a pipe it leaks. "
            "Give a file name (-o key.json); for a file named -, write -o ./-"
        )
    key = RawKey.generate(args.namespace, args.name)
    key.keyring()  # refuse names the format cannot carry before writing anything
    path = Path(args.output)
    write_raw_key(path, key, force=args.force)
    print(f"wrote raw AES-256 key {key.namespace}/{key.name} to {path} (mode 0600)")
    return 0


async def _demo(args: argparse.Namespace) -> int:
    try:
        import moto.server  # noqa: F401  (the embedded KMS; imported only here)
    except ImportError:
        raise CliError(
            "the demo runs on an embedded KMS, which needs moto's server: "
            "pip install 'aioenvelope[cli]'"
        ) from None
    from .._demo import run_demo

    await run_demo()
    return 0
