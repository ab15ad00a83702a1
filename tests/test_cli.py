"""The ``aioenvelope`` command line, run as users run it: the installed console script in a
subprocess, talking to the moto KMS server.

Each subprocess costs most of a second (interpreter and imports), so fixtures share the
expensive artefacts (a key file, a KMS message) across tests, and each test checks as
much as its runs allow. What the tool promises, and so what is checked: round trips for
files, trees and pipes; the ESDK reads what it wrote; a failure is exit status 1, one
line on stderr and no output file (not even a temporary one); usage errors exit 2.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

import anyio
import aws_encryption_sdk
import pytest
from cli_runner import (
    ERROR_PREFIX,
    Cli,
    RawKeyFile,
    clean_env,
    failed,
    keygen,
    kms_cli,
    listing,
    ok,
    on_a_terminal,
)
from esdk_peer import esdk_decrypt
from kms_server import REGION, KmsKey, MotoKms

import aioenvelope


@dataclass(frozen=True)
class KmsMessage:
    path: Path
    plaintext: bytes
    context: tuple[str, ...] = ("-c", "tenant=t1", "-c", "table=cards")


@pytest.fixture(scope="module")
def cli(moto_kms: MotoKms) -> Cli:
    return kms_cli(moto_kms)


@pytest.fixture(scope="module")
def raw_key(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> RawKeyFile:
    return keygen(cli, tmp_path_factory.mktemp("keys") / "key.json")


@pytest.fixture(scope="module")
def kms_message(cli: Cli, kms_key: KmsKey, tmp_path_factory: pytest.TempPathFactory) -> KmsMessage:
    """A file encrypted under key A (by alias), in 4 KiB frames: ten frames and a bit."""
    root = tmp_path_factory.mktemp("kms")
    plaintext = os.urandom(41_000)
    (root / "report.bin").write_bytes(plaintext)
    message = KmsMessage(root / "report.bin.encrypted", plaintext)
    ok(
        cli(
            "encrypt",
            root / "report.bin",
            "-o",
            root,  # an existing directory: the output keeps the name, plus .encrypted
            "--kms-key",
            kms_key.alias_name,
            "--frame-length",
            "4096",
            *message.context,
            *cli.kms,
        )
    )
    return message


def assert_no_usable_key(line: str, tried: str, carried: str) -> None:
    """The one line of a decrypt under the wrong KMS key: it names the key tried and the
    key the message does carry, in words (the library owns the exact wording)."""
    assert line.startswith(ERROR_PREFIX), line
    assert "could not decrypt any of the message's 1 encrypted data keys" in line, line
    assert tried in line, line
    assert carried in line, line
    assert "KmsKeyring(" not in line, line  # no Python repr


def truncated_inside_frame(number: int) -> str:
    return (
        f"the message is truncated: it ends inside frame {number}. Check that the whole "
        "ciphertext was stored and read back"
    )


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def reencrypt(
    cli: Cli,
    message: KmsMessage,
    key: KmsKey,
    output: Path,
    *to_keys: str | Path,
    context: bool = True,
) -> None:
    """``message`` (read with ``key``, and its context checked unless ``context`` is
    false) re-encrypted under ``to_keys`` (``--to-...`` options) into ``output``."""
    checked = message.context if context else ()
    ok(
        cli(
            "reencrypt",
            message.path,
            "-o",
            output,
            "--kms-key",
            key.arn,
            *to_keys,
            *checked,
            *cli.kms,
        )
    )


def test_keygen_writes_a_private_key_file_and_never_overwrites_without_force(
    cli: Cli, tmp_path: Path
) -> None:
    path = tmp_path / "k.json"
    ok(cli("keygen", "-o", path, "--name", "backup-key"))
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_bytes()
    assert json.loads(first)["name"] == "backup-key"
    assert len(base64.b64decode(json.loads(first)["key"])) == 32

    assert failed(cli("keygen", "-o", path)) == [
        f"{ERROR_PREFIX}{path} already exists; pass --force to replace it (messages wrapped "
        "under the old key can then no longer be decrypted)"
    ]
    assert path.read_bytes() == first

    ok(cli("keygen", "-o", path, "--force"))
    assert path.read_bytes() != first
    assert path.stat().st_mode & 0o777 == 0o600
    assert listing(tmp_path) == {"k.json"}


def test_kms_file_round_trip_inspect_and_the_esdk_reads_it(
    cli: Cli, kms_message: KmsMessage, kms_key: KmsKey, tmp_path: Path, esdk_kms: MotoKms
) -> None:
    header = json.loads(ok(cli("inspect", kms_message.path)).stdout)
    assert header["algorithm_suite"] == {
        "name": "AES_256_GCM_HKDF_SHA512_COMMIT_KEY",
        "id": "0x0478",
    }
    assert header["message_version"] == 2
    assert len(bytes.fromhex(header["message_id"])) == 32
    assert header["encryption_context"] == {"tenant": "t1", "table": "cards"}
    [edk] = header["encrypted_data_keys"]
    assert (edk["provider_id"], edk["provider_info"]) == ("aws-kms", kms_key.arn)
    assert (header["content_type"], header["frame_length"]) == ("framed", 4096)

    # Discovery, limited to the key's account: the message names its key.
    out = tmp_path / "report.bin"
    ok(
        cli(
            "decrypt",
            kms_message.path,
            "-o",
            out,
            "--discovery",
            "--discovery-account",
            kms_key.account,
            *kms_message.context,
            *cli.kms,
        )
    )
    assert out.read_bytes() == kms_message.plaintext
    assert out.stat().st_mode & 0o777 == 0o600

    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[kms_key.arn])
    plaintext, peer = esdk_decrypt(provider, kms_message.path.read_bytes())
    assert plaintext == kms_message.plaintext
    assert peer.encryption_context == {"tenant": "t1", "table": "cards"}


def test_directory_tree_round_trip_and_per_file_failures(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    files = {
        "a.txt": b"alpha\n",
        "empty": b"",
        "sub/b.bin": os.urandom(70_000),  # more than one 64 KiB frame
        "sub/deeper/c.csv": b"id,amount\n1,7\n",
    }
    write_tree(tree, files)

    encrypted = tmp_path / "encrypted"
    ok(cli("encrypt", tree, "-o", encrypted, "--raw-key-file", raw_key.path, "-c", "app=cli"))
    assert listing(encrypted) == {"sub", "sub/deeper"} | {f"{n}.encrypted" for n in files}
    # The ESDK, given the key file's namespace, name and key, reads what the CLI wrote.
    blob = (encrypted / "sub/b.bin.encrypted").read_bytes()
    plaintext, peer = esdk_decrypt(raw_key.esdk(), blob)
    assert plaintext == files["sub/b.bin"]
    assert peer.encryption_context == {"app": "cli"}

    decrypted = tmp_path / "decrypted"
    ok(cli("decrypt", encrypted, "-o", decrypted, "--raw-key-file", raw_key.path, "-c", "app=cli"))
    assert {n: (decrypted / n).read_bytes() for n in files} == files
    assert listing(decrypted) == listing(tree)

    # One bad file is reported on its own line; the others are still decrypted.
    (encrypted / "sub/bad.encrypted").write_bytes(b"not a message")
    again = tmp_path / "again"
    errors = failed(
        cli(
            "decrypt", encrypted, "-o", again, "--raw-key-file", raw_key.path, "--concurrency", "2"
        ),
        lines=2,
    )
    assert errors[0].startswith(f"{ERROR_PREFIX}{encrypted / 'sub/bad.encrypted'}: ")
    assert errors[1] == f"{ERROR_PREFIX}1 of 5 files failed"
    assert listing(again) == listing(tree)


def test_pipes_round_trip_with_kms_and_raw_keys_combined(
    cli: Cli, raw_key: RawKeyFile, kms_key: KmsKey
) -> None:
    """stdin to stdout both ways; a KMS key and a raw key make a MultiKeyring, so the raw
    key alone decrypts. Signed, with small frames, so many frames stream through."""
    plaintext = os.urandom(300_000)
    blob = ok(
        cli(
            "encrypt",
            "-",
            "-o",
            "-",
            "--kms-key",
            kms_key.arn,
            "--raw-key-file",
            raw_key.path,
            "--suite",
            "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384",
            "--frame-length",
            "1000",
            *cli.kms,
            stdin=plaintext,
        )
    ).stdout
    # inspect reads a header from stdin, from only the first bytes of the message.
    header = json.loads(ok(cli("inspect", "-", stdin=blob[:2000])).stdout)
    assert header["algorithm_suite"]["id"] == "0x0578"
    assert header["frame_length"] == 1000
    kms_edk, raw_edk = header["encrypted_data_keys"]
    assert (kms_edk["provider_id"], kms_edk["provider_info"]) == ("aws-kms", kms_key.arn)
    assert (raw_edk["provider_id"], raw_edk["key_name"]) == ("aioenvelope", raw_key.name)

    result = ok(cli("decrypt", "-", "-o", "-", "--raw-key-file", raw_key.path, stdin=blob))
    assert result.stdout == plaintext
    assert esdk_decrypt(raw_key.esdk(), blob)[0] == plaintext

    refused = cli(
        "decrypt", "-", "-o", "-", "--raw-key-file", raw_key.path, "--unsigned-only", stdin=blob
    )
    assert failed(refused)[0].startswith(
        f"{ERROR_PREFIX}the message is signed (AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384);"
    )
    assert refused.stdout == b""


def test_reencrypt_from_key_a_to_key_b(
    cli: Cli, kms_message: KmsMessage, kms_key: KmsKey, kms_key_2: KmsKey, tmp_path: Path
) -> None:
    rotated = tmp_path / "rotated"
    reencrypt(cli, kms_message, kms_key, rotated, "--to-kms-key", kms_key_2.alias_name)
    assert rotated.stat().st_mode & 0o777 == 0o600
    old_bytes, new_bytes = kms_message.path.read_bytes(), rotated.read_bytes()
    old, new = aioenvelope.inspect(old_bytes), aioenvelope.inspect(new_bytes)
    # A new message: new message ID, new frames; same context and suite.
    assert new.message_id != old.message_id
    assert new_bytes[-1000:] != old_bytes[-1000:]
    assert [edk.provider_info.decode() for edk in new.encrypted_data_keys] == [kms_key_2.arn]
    assert dict(new.encryption_context) == {"tenant": "t1", "table": "cards"}
    assert new.algorithm_suite is old.algorithm_suite

    out = tmp_path / "plain"
    ok(
        cli(
            "decrypt",
            rotated,
            "-o",
            out,
            "--kms-key",
            kms_key_2.arn,
            *kms_message.context,
            *cli.kms,
        )
    )
    assert out.read_bytes() == kms_message.plaintext

    error = failed(
        cli("decrypt", rotated, "-o", out.with_name("nope"), "--kms-key", kms_key.arn, *cli.kms)
    )
    assert_no_usable_key(error[0], tried=kms_key.arn, carried=kms_key_2.arn)
    assert listing(tmp_path) == {"rotated", "plain"}


def test_reencrypt_to_a_raw_key_file_which_the_esdk_reads(
    cli: Cli, kms_message: KmsMessage, kms_key: KmsKey, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    rotated = tmp_path / "rotated"
    reencrypt(cli, kms_message, kms_key, rotated, "--to-raw-key-file", raw_key.path, context=False)
    plaintext, peer = esdk_decrypt(raw_key.esdk(), rotated.read_bytes())
    assert plaintext == kms_message.plaintext
    assert {edk[0] for edk in peer.encrypted_data_keys} == {"aioenvelope"}
    assert peer.message_id != aioenvelope.inspect(kms_message.path.read_bytes()).message_id


def test_reencrypt_of_a_directory_rotates_every_file_and_reports_a_truncated_one(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """A tree encrypted under key A is re-encrypted (same names) under key B: B reads
    every file, A none. A truncated file in the tree is one error line and no output
    (the others are still done); exit status 1."""
    new_key = tmp_path / "new-key.json"
    ok(cli("keygen", "-o", new_key))
    tree = tmp_path / "tree"
    files = {"a.txt": b"alpha\n", "empty": b"", "sub/b.bin": os.urandom(70_000)}
    write_tree(tree, files)
    encrypted = tmp_path / "encrypted"
    ok(cli("encrypt", tree, "-o", encrypted, "--raw-key-file", raw_key.path, "-c", "app=cli"))

    rotated = tmp_path / "rotated"
    ok(
        cli(
            "reencrypt",
            encrypted,
            "-o",
            rotated,
            "--raw-key-file",
            raw_key.path,
            "--to-raw-key-file",
            new_key,
            "-c",
            "app=cli",
        )
    )
    assert listing(rotated) == listing(encrypted)
    for name in files:
        old = aioenvelope.inspect((encrypted / f"{name}.encrypted").read_bytes())
        new = aioenvelope.inspect((rotated / f"{name}.encrypted").read_bytes())
        assert new.message_id != old.message_id
    decrypted = tmp_path / "decrypted"
    ok(cli("decrypt", rotated, "-o", decrypted, "--raw-key-file", new_key, "-c", "app=cli"))
    assert {n: (decrypted / n).read_bytes() for n in files} == files
    refused = tmp_path / "refused"
    failed(cli("decrypt", rotated, "-o", refused, "--raw-key-file", raw_key.path), lines=4)
    assert not refused.exists() or listing(refused) == set()

    # A truncated file: its frames were already being sealed anew when the cut was found.
    big = encrypted / "sub/b.bin.encrypted"
    big.write_bytes(big.read_bytes()[:-5000])
    again = tmp_path / "again"
    errors = failed(
        cli(
            "reencrypt",
            encrypted,
            "-o",
            again,
            "--raw-key-file",
            raw_key.path,
            "--to-raw-key-file",
            new_key,
        ),
        lines=2,
    )
    # 70,000 bytes in 64 KiB frames: the cut ends inside frame 1 of 1 (and the final).
    assert errors[0] == f"{ERROR_PREFIX}{big}: {truncated_inside_frame(1)}"
    assert errors[1] == f"{ERROR_PREFIX}1 of 3 files failed"
    assert listing(again) == {"a.txt.encrypted", "empty.encrypted"}


def test_reencrypt_of_a_truncated_message_exits_1_and_leaves_no_output(
    cli: Cli, kms_message: KmsMessage, kms_key: KmsKey, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """Cut inside the ninth of ten 4 KiB frames: eight frames of the new message were
    already sealed when the cut was found; none of it may be left behind."""
    source = tmp_path / "truncated.encrypted"
    source.write_bytes(kms_message.path.read_bytes()[:-5000])
    before = listing(tmp_path)
    result = cli(
        "reencrypt",
        source,
        "-o",
        tmp_path / "rotated",
        "--kms-key",
        kms_key.arn,
        "--to-raw-key-file",
        raw_key.path,
        *kms_message.context,
        *cli.kms,
    )
    assert failed(result) == [f"{ERROR_PREFIX}{truncated_inside_frame(9)}"]
    assert listing(tmp_path) == before  # no output, and no temporary file either
    piped = cli(
        "reencrypt",
        "-",
        "-o",
        "-",
        "--kms-key",
        kms_key.arn,
        "--to-raw-key-file",
        raw_key.path,
        *cli.kms,
        stdin=source.read_bytes(),
    )
    assert failed(piped) == [f"{ERROR_PREFIX}{truncated_inside_frame(9)}"]
    # On a pipe, new frames may go out before the cut is found (here the input arrives
    # in one read and nothing does), but never the final one: no reader takes what came
    # out for a whole message.
    if piped.stdout:
        with pytest.raises(aioenvelope.errors.TruncatedMessageError):
            decrypt_in_process(piped.stdout, raw_key)


def decrypt_in_process(message: bytes, raw_key: RawKeyFile) -> bytes:
    """Decrypt ``message`` with the raw key file's key, with the library in process."""

    async def run() -> bytes:
        async with aioenvelope.EnvelopeClient(raw_key.keyring()) as client:
            return await client.decrypt(message)

    return anyio.run(run)


@pytest.mark.parametrize("case", ["wrong-context", "wrong-key", "truncated", "existing-output"])
def test_a_failure_is_one_line_and_leaves_no_output(
    cli: Cli,
    kms_message: KmsMessage,
    kms_key: KmsKey,
    kms_key_2: KmsKey,
    tmp_path: Path,
    case: str,
) -> None:
    source, key, context = kms_message.path, kms_key.arn, kms_message.context
    output = tmp_path / "report.bin"
    if case == "wrong-context":
        context = ("-c", "tenant=t2")
    elif case == "wrong-key":
        key = kms_key_2.arn
    elif case == "truncated":
        # Ends inside the ninth frame: eight frames were already written to the temp file.
        source = tmp_path / "truncated.encrypted"
        source.write_bytes(kms_message.path.read_bytes()[:-5000])
    else:
        output.write_bytes(b"precious")
    before = listing(tmp_path)

    result = cli("decrypt", source, "-o", output, "--kms-key", key, *context, *cli.kms)
    error = failed(result)[0]
    assert listing(tmp_path) == before  # no output, and no temporary file either
    if case == "wrong-key":
        assert_no_usable_key(error, tried=key, carried=kms_key.arn)
        return
    expected = {
        "wrong-context": "encryption context value for key 'tenant' does not match the message",
        "truncated": truncated_inside_frame(9),
        "existing-output": f"{output} already exists; pass --force to replace it",
    }[case]
    assert error == f"{ERROR_PREFIX}{expected}"
    if case == "existing-output":
        assert output.read_bytes() == b"precious"


def test_usage_errors_exit_2(cli: Cli, tmp_path: Path) -> None:
    source = tmp_path / "a"
    source.write_bytes(b"x")
    result = cli("encrypt", source, "-o", tmp_path / "b")  # no key
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        "aioenvelope encrypt: error: give a key: --kms-key ID, --branch-key-id ID, "
        "--vault-key NAME, --gcp-key NAME, --azure-key URL, --raw-key-file FILE"
    )
    assert result.stderr.startswith(b"usage: aioenvelope encrypt ")
    assert listing(tmp_path) == {"a"}


def test_progress_bar_appears_on_a_terminal(cli: Cli, raw_key: RawKeyFile, tmp_path: Path) -> None:
    """On a pipe stderr stays empty (checked by every ``ok``); on a terminal, a bar."""
    source = tmp_path / "big"
    source.write_bytes(os.urandom(3 << 20))
    status, shown = on_a_terminal(
        cli, "encrypt", source, "-o", tmp_path / "big.enc", "--raw-key-file", raw_key.path
    )
    assert status == 0
    assert b"%|" in shown  # tqdm's bar


def test_demo_runs_the_quickstart_on_an_embedded_kms(cli: Cli) -> None:
    out = ok(cli("demo")).stdout.decode()
    assert "started an embedded KMS (moto) at http://127.0.0.1:" in out
    assert "encrypted and decrypted 200 records" in out
    assert "tampered record refused" in out
    assert "wrong tenant refused" in out
    assert "KMS calls made: 5 (Decrypt 2, DescribeKey 1, GenerateDataKey 2)" in out


# -- global flags and --force, -q, --profile -----------------------------------------------


def test_version_prints_the_package_version(cli: Cli) -> None:
    result = ok(cli("--version"))
    assert result.stdout.decode() == f"aioenvelope {aioenvelope.__version__}\n"
    assert aioenvelope.__version__ == "0.1.0"


def test_force_replaces_an_existing_output_file_that_is_refused_without_it(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """encrypt and decrypt alike: without --force the old file stays, byte for byte; with
    it the file is the new output, whole (mode 0600, no temporary file left)."""
    source = tmp_path / "plain"
    source.write_bytes(os.urandom(70_000))
    sealed, opened = tmp_path / "sealed", tmp_path / "opened"
    for path in (sealed, opened):
        path.write_bytes(b"precious")
    key = ("--raw-key-file", raw_key.path)
    for args, output in (
        (("encrypt", source, "-o", sealed, *key), sealed),
        (("decrypt", sealed, "-o", opened, *key), opened),
    ):
        error = failed(cli(*args))[0]
        assert error == f"{ERROR_PREFIX}{output} already exists; pass --force to replace it"
        assert output.read_bytes() == b"precious"
        ok(cli(*args, "--force"))
        assert output.stat().st_mode & 0o777 == 0o600
    assert opened.read_bytes() == source.read_bytes()
    assert decrypt_in_process(sealed.read_bytes(), raw_key) == source.read_bytes()
    assert listing(tmp_path) == {"plain", "sealed", "opened"}


def test_an_existing_output_is_refused_before_any_key_is_used(
    cli: Cli, kms_key: KmsKey, tmp_path: Path
) -> None:
    """A single output is checked before the keyring is opened: encrypting under a KMS
    key into an existing file is refused for the output, and the library's debug log
    shows no KMS client opened and no call (with --force the same run calls KMS)."""
    output = tmp_path / "output"
    output.write_bytes(b"precious")
    args: tuple[str | Path, ...] = (
        "encrypt",
        "-",
        "-o",
        output,
        "--kms-key",
        kms_key.arn,
        *cli.kms,
        "--debug",
    )
    result = cli(*args, stdin=b"x")
    assert result.returncode == 1
    shown = result.stderr.decode().splitlines()
    assert shown[-1] == f"{ERROR_PREFIX}{output} already exists; pass --force to replace it"
    assert [line for line in shown if line.startswith("aioenvelope.kms:")] == []
    assert output.read_bytes() == b"precious"
    forced = cli(*args, "--force", stdin=b"x")
    assert forced.returncode == 0
    assert f"aioenvelope.kms: KMS DescribeKey with key {kms_key.arn} in {REGION}" in (
        forced.stderr.decode().splitlines()
    )
    assert output.read_bytes()[:1] == b"\x02"


def test_debug_adds_the_traceback_to_a_failure_and_the_library_logs_to_a_success(
    cli: Cli, kms_key: KmsKey, raw_key: RawKeyFile
) -> None:
    """Without --debug a failure is one line and a success prints nothing on stderr
    (``failed`` and ``ok`` check that); --debug, before or after the command, adds the
    traceback above that line, and the library's debug log (here its KMS calls)."""
    garbage = ("decrypt", "-", "-o", "-", "--raw-key-file", raw_key.path)
    line = f"{ERROR_PREFIX}not an AWS Encryption SDK message: unknown version byte 0x67"
    assert failed(cli(*garbage, stdin=b"garbage")) == [line]
    for debug in (("--debug", *garbage), (*garbage, "--debug")):
        result = cli(*debug, stdin=b"garbage")
        assert result.returncode == 1
        shown = result.stderr.decode().splitlines()
        assert shown[0] == "Traceback (most recent call last):"
        assert shown[-2:] == [
            f"aioenvelope.errors.MalformedMessageError: {line.removeprefix(ERROR_PREFIX)}",
            line,
        ]

    encrypt = ("encrypt", "-", "-o", "-", "--kms-key", kms_key.arn, *cli.kms)
    assert ok(cli(*encrypt, stdin=b"x")).stdout[:1] == b"\x02"
    logged = cli(*encrypt, "--debug", stdin=b"x")
    assert logged.returncode == 0
    assert logged.stdout[:1] == b"\x02"
    assert logged.stderr.decode().splitlines() == [
        f"aioenvelope.kms: opening a KMS client for region {REGION}",
        f"aioenvelope.kms: KMS DescribeKey with key {kms_key.arn} in {REGION}",
        f"aioenvelope.kms: KMS GenerateDataKey with key {kms_key.arn} in {REGION}",
        f"aioenvelope.kms: closing the KMS client for region {REGION}",
    ]


def test_quiet_draws_no_progress_bar_on_a_terminal(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """The same run that draws a bar (see above) shows nothing at all with -q."""
    source = tmp_path / "big"
    source.write_bytes(os.urandom(3 << 20))
    for quiet in ("-q", "--quiet"):
        out = tmp_path / f"big{quiet}.enc"
        status, shown = on_a_terminal(
            cli, "encrypt", source, "-o", out, "--raw-key-file", raw_key.path, quiet
        )
        assert (status, shown) == (0, b"")
        assert decrypt_in_process(out.read_bytes(), raw_key) == source.read_bytes()


def test_quiet_and_debug_apply_to_each_file_of_a_directory(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """A directory is its own code path (a per-file bar, one error line per file): on a
    terminal it draws a bar, and nothing with -q; a failing tree's lines are the same
    with --debug, each file's line now below that file's traceback."""
    tree = tmp_path / "tree"
    write_tree(tree, {"a.txt": b"alpha\n", "b.txt": b"beta\n"})
    key = ("--raw-key-file", raw_key.path)
    status, shown = on_a_terminal(cli, "encrypt", tree, "-o", tmp_path / "drawn", *key)
    assert status == 0
    assert b"%|" in shown  # tqdm's bar
    status, shown = on_a_terminal(cli, "encrypt", tree, "-o", tmp_path / "quiet", *key, "-q")
    assert (status, shown) == (0, b"")
    assert listing(tmp_path / "quiet") == {"a.txt.encrypted", "b.txt.encrypted"}

    plain = ("decrypt", tree, "-o", tmp_path / "opened", *key)
    lines = failed(cli(*plain), lines=3)
    assert lines == [
        f"{ERROR_PREFIX}{tree / 'a.txt'}: not an AWS Encryption SDK message: "
        "unknown version byte 0x61",
        f"{ERROR_PREFIX}{tree / 'b.txt'}: not an AWS Encryption SDK message: "
        "unknown version byte 0x62",
        f"{ERROR_PREFIX}2 of 2 files failed",
    ]
    result = cli(*plain, "--debug")
    assert result.returncode == 1
    shown_lines = result.stderr.decode().splitlines()
    assert [line for line in shown_lines if line.startswith(ERROR_PREFIX)] == lines
    assert shown_lines.count("Traceback (most recent call last):") == 2
    assert shown_lines[0] == "Traceback (most recent call last):"
    for name, line in zip(("a.txt", "b.txt"), lines, strict=False):
        said = line.removeprefix(f"{ERROR_PREFIX}{tree / name}: ")
        at = shown_lines.index(line)
        assert shown_lines[at - 1] == f"aioenvelope.errors.MalformedMessageError: {said}"


def test_profile_is_the_aws_profile_botocore_reads(
    cli: Cli, moto_kms: MotoKms, kms_key: KmsKey, tmp_path: Path
) -> None:
    """The profile's region (from AWS_CONFIG_FILE) locates a key given by alias; without
    --profile there is no region, and a profile that does not exist is botocore's error,
    naming it, as the one line of a failure."""
    config = tmp_path / "aws-config"
    config.write_text(
        f"[profile moto]\nregion = {REGION}\n"
        "aws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    env = clean_env()  # no AWS_* credentials or region: only the profile gives them
    env.update(AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    by_alias = ("encrypt", "-", "-o", "-", "--kms-key", kms_key.alias_name)
    endpoint = ("--endpoint-url", moto_kms.endpoint_url)
    profiled = Cli(env)

    blob = ok(profiled(*by_alias, *endpoint, "--profile", "moto", stdin=b"profiled")).stdout
    wrapped_by = aioenvelope.inspect(blob).encrypted_data_keys[0].provider_info.decode()
    assert wrapped_by == kms_key.arn
    assert failed(profiled(*by_alias, *endpoint, stdin=b"x")) == [
        f"{ERROR_PREFIX}no AWS region for KMS key {kms_key.alias_name!r}: give a key ARN, "
        "--region, or set AWS_REGION or AWS_DEFAULT_REGION"
    ]
    assert failed(profiled(*by_alias, *endpoint, "--profile", "no-such-profile")) == [
        f"{ERROR_PREFIX}The config profile (no-such-profile) could not be found"
    ]
