"""What a new user of the ``aioenvelope`` command line trips over (issue 14), pinned as
the installed console script behaves in a subprocess against the moto server: a pipe
whose reader stops early, errors in the tool's own flags, a key or ciphertext kept off
terminals and pipes, a second run over its own output, several INPUTs, and extras that
give what the README promises.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from cli_runner import (
    COMMAND,
    ERROR_PREFIX,
    Cli,
    RawKeyFile,
    failed,
    keygen,
    kms_cli,
    listing,
    ok,
    on_a_terminal,
    terminal,
    without,
)
from esdk_peer import esdk_encrypt
from kms_server import REGION, KmsKey, MotoKms

import aioenvelope

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent

# Python advice a library message may carry, which must never reach the command line:
# keyword arguments, calls, class and method names.
PYTHON_ADVICE = re.compile(
    r"\b\w+=(?:True|False|None|\[|\.\.\.)|\b\w+\(\)|\b(?:region_name|endpoint_url|"
    r"check_keys|allow_signed|table_name|max_encrypted_data_keys|decrypt_stream|"
    r"reencrypt_stream|EnvelopeClient|CommitmentPolicy|KmsKeyring|KmsDiscoveryKeyring)\b"
)


@pytest.fixture(scope="module")
def cli(moto_kms: MotoKms) -> Cli:
    return kms_cli(moto_kms)


@pytest.fixture(scope="module")
def raw_key(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> RawKeyFile:
    return keygen(cli, tmp_path_factory.mktemp("keys") / "key.json")


def in_cli_words(line: str) -> str:
    """``line``, a failure's one line, checked to carry no Python advice."""
    assert line.startswith(ERROR_PREFIX), line
    assert not PYTHON_ADVICE.search(line), line
    return line.removeprefix(ERROR_PREFIX)


def usage_error(result: subprocess.CompletedProcess[bytes], command: str) -> str:
    """Exit status 2, the subcommand's usage (not the top level's) and one error line
    naming the subcommand; returns what the error says."""
    shown = result.stderr.decode().splitlines()
    assert result.returncode == 2, shown
    assert shown[0].startswith(f"usage: aioenvelope {command} "), shown
    prefix = f"aioenvelope {command}: error: "
    assert shown[-1].startswith(prefix), shown
    return shown[-1].removeprefix(prefix)


# -- a reader that stops early -------------------------------------------------------------


def piped_into_head(cli: Cli, *args: str | Path) -> tuple[int, bytes, bytes]:
    """``aioenvelope ARGS | head -c 10``, a real pipe whose reader stops after 10 bytes:
    the command's exit status and stderr, and what head printed."""
    writer = subprocess.Popen(
        [*COMMAND, *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env,
    )
    assert writer.stdout is not None
    assert writer.stderr is not None
    try:
        head = subprocess.run(
            ["head", "-c", "10"], stdin=writer.stdout, capture_output=True, timeout=60, check=True
        )
        writer.stdout.close()  # head is the only reader left, and it is gone
        stderr = writer.stderr.read()
        status = writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stderr.close()
    return status, stderr, head.stdout


def test_a_reader_that_stops_early_ends_the_command_quietly_with_status_0(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """``decrypt ... -o - | head`` as the README shows it, and encrypt to stdout the
    same: 4 MiB cannot fit in a pipe's buffer, so the command is still writing when head
    exits, and must end like ``gzip -dc | head``: status 0, nothing on stderr (no error
    line, no traceback, no BrokenPipeError noise at interpreter exit)."""
    plaintext = os.urandom(4 * MIB)
    source, message = tmp_path / "big", tmp_path / "big.encrypted"
    source.write_bytes(plaintext)
    ok(cli("encrypt", source, "-o", message, "--raw-key-file", raw_key.path, "-q"))
    key = ("--raw-key-file", raw_key.path)

    assert piped_into_head(cli, "decrypt", message, "-o", "-", *key) == (0, b"", plaintext[:10])
    status, stderr, shown = piped_into_head(cli, "encrypt", source, "-o", "-", *key)
    assert (status, stderr) == (0, b"")
    assert len(shown) == 10
    assert shown[:1] == b"\x02"  # a message's version byte


def test_inspect_into_a_pipe_already_closed_ends_quietly_with_status_0(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """The header's JSON fits in a pipe's buffer, so the reader is gone before the
    command writes (its read end closed at once): the write and the final flush both
    meet EPIPE, and neither may show."""
    message = tmp_path / "m.encrypted"
    ok(cli("encrypt", "-", "-o", message, "--raw-key-file", raw_key.path, stdin=b"x"))
    read, write = os.pipe()
    os.close(read)
    try:
        result = cli("inspect", message, stdout=write)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (0, b"")


# -- errors in the command line's words ------------------------------------------------------


def test_a_kms_key_failing_the_start_up_check_points_to_no_check_keys(
    cli: Cli, kms_key: KmsKey
) -> None:
    """A key that does not exist fails DescribeKey, and the advice is the flag that skips
    that check; with --no-check-keys the same key fails later, at GenerateDataKey, which
    is what the flag is for (a caller allowed to use a key but not to describe it)."""
    account_and_region = kms_key.arn.rsplit(":", 1)[0]
    missing = f"{account_and_region}:key/{uuid.uuid4()}"
    encrypt = ("encrypt", "-", "-o", "-", "--kms-key", missing, *cli.kms)
    said = in_cli_words(failed(cli(*encrypt, stdin=b"x"))[0])
    assert said.startswith(f"KMS key {missing!r} failed the start-up check"), said
    assert "--no-check-keys" in said

    unchecked = in_cli_words(failed(cli(*encrypt, "--no-check-keys", stdin=b"x"))[0])
    assert "GenerateDataKey" in unchecked
    assert "start-up check" not in unchecked


def test_no_check_keys_skips_describe_key_on_encrypt_and_decrypt(cli: Cli, kms_key: KmsKey) -> None:
    """By alias, with --no-check-keys: the library's debug log shows GenerateDataKey and
    Decrypt, and no DescribeKey; the alias still decrypts (KMS checks the key)."""
    key = ("--kms-key", kms_key.alias_name, "--no-check-keys", *cli.kms, "--debug")
    sealed = cli("encrypt", "-", "-o", "-", *key, stdin=b"unchecked")
    assert sealed.returncode == 0, sealed.stderr.decode()
    opened = cli("decrypt", "-", "-o", "-", *key, stdin=sealed.stdout)
    assert (opened.returncode, opened.stdout) == (0, b"unchecked"), opened.stderr.decode()
    calls = [
        line.split(" with key ")[0]
        for result in (sealed, opened)
        for line in result.stderr.decode().splitlines()
        if line.startswith("aioenvelope.kms: KMS ")
    ]
    assert calls == ["aioenvelope.kms: KMS GenerateDataKey", "aioenvelope.kms: KMS Decrypt"]


def test_a_key_without_a_region_names_region_and_both_environment_variables(
    cli: Cli, moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """An alias needs a region: the advice is --region, AWS_REGION or AWS_DEFAULT_REGION,
    and AWS_DEFAULT_REGION alone indeed serves."""
    by_alias = ("encrypt", "-", "-o", "-", "--kms-key", kms_key.alias_name)
    endpoint = ("--endpoint-url", moto_kms.endpoint_url)
    unset = ("AWS_REGION", "AWS_DEFAULT_REGION")
    nowhere = Cli({name: value for name, value in cli.env.items() if name not in unset})
    said = in_cli_words(failed(nowhere(*by_alias, *endpoint, stdin=b"x"))[0])
    assert "--region" in said
    assert "AWS_REGION" in said
    assert "AWS_DEFAULT_REGION" in said
    regional = Cli({**nowhere.env, "AWS_DEFAULT_REGION": REGION})
    blob = ok(regional(*by_alias, *endpoint, stdin=b"x")).stdout
    assert aioenvelope.inspect(blob).encrypted_data_keys[0].provider_info.decode() == kms_key.arn


def test_a_signed_message_refused_by_unsigned_only_says_to_leave_the_flag_out(
    cli: Cli, raw_key: RawKeyFile
) -> None:
    signed = ok(
        cli(
            "encrypt",
            "-",
            "-o",
            "-",
            "--raw-key-file",
            raw_key.path,
            "--suite",
            "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384",
            stdin=b"signed",
        )
    ).stdout
    decrypt = ("decrypt", "-", "-o", "-", "--raw-key-file", raw_key.path)
    said = in_cli_words(failed(cli(*decrypt, "--unsigned-only", stdin=signed))[0])
    assert said.startswith("the message is signed (AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384)")
    assert "--unsigned-only refuses signed messages" in said
    assert "Leave out --unsigned-only" in said
    assert ok(cli(*decrypt, stdin=signed)).stdout == b"signed"


def test_a_legacy_message_points_to_the_commitment_policy_flag(
    cli: Cli, raw_key: RawKeyFile
) -> None:
    """A message the ESDK wrote under a suite that does not commit to its key (version
    1): refused by default, in flags; read with the flag the advice names."""
    legacy, _ = esdk_encrypt(
        raw_key.esdk(), b"legacy", suite_id=0x0178, encryption_context={}, frame_length=4096
    )
    decrypt = ("decrypt", "-", "-o", "-", "--raw-key-file", raw_key.path)
    said = in_cli_words(failed(cli(*decrypt, stdin=legacy))[0])
    assert "--commitment-policy require-encrypt-allow-decrypt" in said
    policy = ("--commitment-policy", "require-encrypt-allow-decrypt")
    assert ok(cli(*decrypt, *policy, stdin=legacy)).stdout == b"legacy"


def test_a_missing_key_store_table_points_to_branch_key_create_table(
    cli: Cli, kms_key: KmsKey
) -> None:
    table = f"no-such-table-{uuid.uuid4().hex[:8]}"
    said = in_cli_words(
        failed(
            cli(
                "encrypt",
                "-",
                "-o",
                "-",
                "--branch-key-id",
                "tenant-a",
                "--key-store-table",
                table,
                "--key-store-name",
                "store",
                "--key-store-kms-key",
                kms_key.arn,
                *cli.kms,
                stdin=b"x",
            )
        )[0]
    )
    assert table in said
    assert "`aioenvelope branch-key create-table`" in said
    assert "--key-store-table" in said


# -- keys and ciphertext kept off terminals and pipes ----------------------------------------


def test_keygen_refuses_stdout_and_makes_no_file_named_dash(cli: Cli, tmp_path: Path) -> None:
    """``-`` is stdout everywhere else; a key written there lands on a terminal or in a
    pipe, so it is refused (usage error, exit 2) and no file named ``-`` appears."""
    said = usage_error(cli("keygen", "-o", "-", cwd=tmp_path), "keygen")
    assert said.startswith("a key is never written to stdout (-)")
    assert listing(tmp_path) == set()
    ok(cli("keygen", "-o", "./-", cwd=tmp_path))  # a file named -, asked for plainly
    assert listing(tmp_path) == {"-"}


def test_ciphertext_is_not_written_to_a_terminal_unless_forced(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """As age and gpg do: encrypt (and reencrypt) to stdout on a terminal is a usage
    error saying to redirect or pass --force, and nothing reaches the terminal; --force
    writes it; decrypt's plaintext is shown."""
    source = tmp_path / "plain"
    source.write_bytes(b"hello terminal\n")
    key = ("--raw-key-file", raw_key.path)
    message = tmp_path / "plain.encrypted"
    ok(cli("encrypt", source, "-o", message, *key))
    for args in (("encrypt", source), ("reencrypt", message, "--to-raw-key-file", raw_key.path)):
        with terminal() as tty:
            said = usage_error(cli(*args, "-o", "-", *key, stdout=tty.fd), args[0])
            assert tty.shown() == b""
        assert "terminal" in said
        assert "redirect stdout" in said
        assert "--force" in said
    with terminal() as tty:
        forced = cli("encrypt", source, "-o", "-", *key, "--force", stdout=tty.fd)
        assert forced.returncode == 0, forced.stderr.decode()
        assert tty.shown()[:1] == b"\x02"
    with terminal() as tty:
        shown = cli("decrypt", message, "-o", "-", *key, stdout=tty.fd)
        assert shown.returncode == 0, shown.stderr.decode()
        assert tty.shown() == b"hello terminal\r\n"  # the terminal's own line ending


# -- a second run over its own output ---------------------------------------------------------


def test_encrypting_a_directory_skips_messages_and_encrypted_files_and_says_so(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """A directory holding earlier output: files named ``*.encrypted``, a message of
    ours under another name, and an ESDK version 1 message are each skipped with one
    line, and that is no failure; a plaintext that merely starts with byte 0x02 is
    encrypted. Run over its own directory twice, nothing is encrypted twice."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.csv").write_bytes(b"id\n1\n")
    (tree / "starts-like-v2").write_bytes(b"\x02\x00\x00 not a suite")
    key = ("--raw-key-file", raw_key.path)
    renamed = ok(cli("encrypt", "-", "-o", "-", *key, stdin=b"earlier")).stdout
    (tree / "earlier.bin").write_bytes(renamed)
    (tree / "b.csv.encrypted").write_bytes(b"named as our output")
    legacy, _ = esdk_encrypt(
        raw_key.esdk(), b"v1", suite_id=0x0178, encryption_context={}, frame_length=4096
    )
    (tree / "legacy.msg").write_bytes(legacy)

    out = tmp_path / "out"
    result = cli("encrypt", tree, "-o", out, *key)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode().splitlines() == [
        f"aioenvelope: skipped {tree / name} (already encrypted)"
        for name in ("b.csv.encrypted", "earlier.bin", "legacy.msg")
    ]
    assert listing(out) == {"a.csv.encrypted", "starts-like-v2.encrypted"}

    # In place, twice (the second time --force, as outputs exist): never .encrypted twice.
    for extra in ((), ("--force",)):
        again = cli("encrypt", tree, "-o", tree, *key, *extra)
        assert again.returncode == 0, again.stderr.decode()
    assert not any(name.endswith(".encrypted.encrypted") for name in listing(tree))
    assert "a.csv.encrypted" in listing(tree)


# -- several INPUTs ---------------------------------------------------------------------------


def test_several_inputs_go_into_one_output_directory_like_cp(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """Files keep their names, a directory becomes a subdirectory of the same name;
    ``-o DIR/`` creates the directory; INPUTs after the options count too."""
    (tmp_path / "a.txt").write_bytes(b"alpha")
    (tmp_path / "b.txt").write_bytes(b"beta")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "c.txt").write_bytes(b"gamma")
    key = ("--raw-key-file", raw_key.path)
    out = tmp_path / "out"
    encrypt = ("encrypt", "a.txt", tmp_path / "tree", "-o", f"{out}/", *key, "b.txt")
    ok(cli(*encrypt, cwd=tmp_path))
    assert listing(out) == {
        "a.txt.encrypted",
        "b.txt.encrypted",
        "tree",
        "tree/sub",
        "tree/sub/c.txt.encrypted",
    }
    back = tmp_path / "back"
    back.mkdir()
    ok(cli("decrypt", out / "a.txt.encrypted", out / "b.txt.encrypted", "-o", back, *key))
    assert {p.name: p.read_bytes() for p in back.iterdir()} == {"a.txt": b"alpha", "b.txt": b"beta"}


def test_several_inputs_without_an_output_directory_are_usage_errors(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """Each a usage error of the subcommand, with its usage, before anything is written:
    an output that is a file, or missing without a trailing slash; stdout; stdin among
    several; two inputs of one name; and an unknown option."""
    for name in ("x/same", "y/same", "file"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"data")
    key = ("--raw-key-file", raw_key.path)
    x, y = tmp_path / "x/same", tmp_path / "y/same"
    before = listing(tmp_path)
    file, new_dir = tmp_path / "file", f"{tmp_path}/o/"
    cases: list[tuple[tuple[str | Path, ...], str]] = [
        ((x, file, "-o", file), "-o must be a directory"),
        ((x, file, "-o", tmp_path / "missing"), f"write -o {tmp_path / 'missing'}/ to create"),
        ((x, file, "-o", "-"), "-o must be a directory"),
        (("-", x, "-o", new_dir), "stdin (-) can only be the one INPUT"),
        ((x, y, "-o", new_dir), f"{x} and {y} would both be written to"),
        ((x, "-o", new_dir, "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
    ]
    for args, expected in cases:
        said = usage_error(cli("encrypt", *args, *key), "encrypt")
        assert expected in said, (args, said)
    assert listing(tmp_path) == before


# -- extras: what pip install 'aioenvelope[cli]' gives -----------------------------------------


def test_the_cli_extra_holds_the_progress_bar_and_the_demo_server() -> None:
    """The README promises the progress bar and ``aioenvelope demo`` with the extra."""
    # The extra's one line, read as the list it is (tomllib is 3.11+, we support 3.10).
    (line,) = [
        line
        for line in (ROOT / "pyproject.toml").read_text().splitlines()
        if line.startswith("cli = [")
    ]
    cli_extra = ast.literal_eval(line.removeprefix("cli = "))
    assert any(requirement.startswith("tqdm") for requirement in cli_extra)
    assert any(requirement.startswith("moto[server]") for requirement in cli_extra)


def test_demo_without_moto_names_the_extra_to_install(cli: Cli, tmp_path: Path) -> None:
    said = failed(without(cli, ("moto",), tmp_path / "site")("demo"))[0]
    assert said == (
        f"{ERROR_PREFIX}the demo runs on an embedded KMS, which needs moto's server: "
        "pip install 'aioenvelope[cli]'"
    )


def test_without_tqdm_a_terminal_is_told_once_where_the_progress_bar_is(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """On a terminal, where the bar would be drawn, one line says which extra draws it
    (a pipe gets nothing, and -q silences it); the command still succeeds."""
    bare = without(cli, ("tqdm",), tmp_path / "site")
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(os.urandom(2 * MIB))
    key = ("--raw-key-file", raw_key.path)
    inputs = (tmp_path / "a", tmp_path / "b")
    status, shown = on_a_terminal(bare, "encrypt", *inputs, "-o", f"{tmp_path}/out/", *key)
    assert status == 0
    assert shown.decode().splitlines() == [
        "aioenvelope: no progress bar: it needs tqdm, pip install 'aioenvelope[cli]' "
        "(-q hides this note)"
    ]
    quiet = on_a_terminal(bare, "encrypt", *inputs, "-o", f"{tmp_path}/quiet/", *key, "-q")
    assert quiet == (0, b"")
    ok(bare("encrypt", *inputs, "-o", f"{tmp_path}/piped/", *key))
    assert listing(tmp_path / "piped") == {"a.encrypted", "b.encrypted"}
