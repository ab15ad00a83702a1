"""What a file output may never do: be left half-written when the process is stopped
(SIGTERM, or SIGKILL for the library's ``*_file`` methods), or be written through a
symbolic link planted in a directory tree; and an input tree's links are not followed
unless asked.

The command line runs as users run it (the console script in a subprocess, see
test_cli.py); keys are raw AES key files, so no KMS server is needed. Attacks on the
output tree are planted as an attacker with write access to it would plant them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from cli_runner import COMMAND, ERROR_PREFIX, Cli, RawKeyFile, clean_env, keygen, listing

from aioenvelope import EnvelopeClient, RawAesKeyring

MIB = 1 << 20


@pytest.fixture(scope="module")
def cli() -> Cli:
    return Cli(clean_env())


@pytest.fixture(scope="module")
def raw_key(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> RawKeyFile:
    return keygen(cli, tmp_path_factory.mktemp("keys") / "key.json")


def run(cli: Cli, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``cli`` with its output as text."""
    result = cli(*args)
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def encrypt(key: RawKeyFile, data: bytes) -> bytes:
    async with EnvelopeClient(key.keyring()) as client:
        return await client.encrypt(data)


def open_files_under(pid: int | str, directory: Path) -> list[int]:
    """Sizes of the files process ``pid`` holds open in ``directory``, named or not
    (an unnamed O_TMPFILE shows as ``DIR/#INODE (deleted)``)."""
    sizes = []
    fds = Path(f"/proc/{pid}/fd")
    prefix = f"{directory.resolve()}/"
    for fd in os.listdir(fds):
        try:
            if os.readlink(fds / fd).startswith(prefix):
                sizes.append(os.stat(fds / fd).st_size)
        except OSError:
            continue  # closed meanwhile
    return sizes


# -- SIGTERM ---------------------------------------------------------------------------


def test_sigterm_during_a_decrypt_to_a_file_leaves_nothing_and_exits_143(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """The decrypt reads stdin, which the test keeps open, so the process is certainly
    mid-write (plaintext in its output file) when the signal arrives."""
    key_file, key = raw_key.path, raw_key
    blob = anyio.run(encrypt, key, os.urandom(4 * MIB))
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen(
        [*COMMAND, "decrypt", "-", "-o", out / "plain", "--raw-key-file", key_file],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env,
    )
    try:
        assert child.stdin is not None
        child.stdin.write(blob[: 3 * MIB])  # the rest, and the end of input, never come
        child.stdin.flush()
        deadline = time.monotonic() + 30
        while not any(open_files_under(child.pid, out)):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "no plaintext was written within 30 s"
            time.sleep(0.01)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.decode().splitlines() == [f"{ERROR_PREFIX}terminated"]
    assert listing(out) == set()  # no output, and no hidden temporary file


# -- symbolic links in the output tree -------------------------------------------------


def test_output_tree_symlinks_with_force_never_write_outside_the_output_root(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """Planted: a directory link ``out/sub -> elsewhere`` and a file link
    ``out/c.txt.encrypted -> elsewhere/victim``. Neither the file the links reach nor
    the directory they point to changes; the file link itself is replaced (--force
    asked for that name), the files below the directory link fail, one line each."""
    key_file, key = raw_key.path, raw_key
    tree = tmp_path / "in"
    for name in ("c.txt", "sub/b.txt", "sub/new.txt", "sub/deeper/d.txt"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(name.encode())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.txt.encrypted").write_bytes(b"precious b")
    (elsewhere / "victim").write_bytes(b"precious victim")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)
    (out / "c.txt.encrypted").symlink_to(elsewhere / "victim")

    result = run(cli, "encrypt", tree, "-o", out, "--raw-key-file", key_file, "--force")

    assert result.returncode == 1, result.stderr
    errors = result.stderr.splitlines()
    assert errors[-1] == f"{ERROR_PREFIX}3 of 4 files failed"
    assert len(errors) == 4
    for line in errors[:3]:
        assert line.startswith(f"{ERROR_PREFIX}{tree / 'sub'}/")
        assert f"{out / 'sub'} is a symbolic link or not a directory" in line
    assert listing(elsewhere) == {"b.txt.encrypted", "victim"}
    assert (elsewhere / "b.txt.encrypted").read_bytes() == b"precious b"
    assert (elsewhere / "victim").read_bytes() == b"precious victim"
    assert (out / "sub").is_symlink()
    replaced = out / "c.txt.encrypted"
    assert not replaced.is_symlink()
    plaintext = anyio.run(_decrypt, key, replaced.read_bytes())
    assert plaintext == b"c.txt"


async def _decrypt(key: RawKeyFile, blob: bytes) -> bytes:
    async with EnvelopeClient(key.keyring()) as client:
        return await client.decrypt(blob)


def test_an_output_file_symlink_without_force_is_an_existing_file(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    """Even dangling: a link is never written through, whether or not it leads anywhere."""
    key_file = raw_key.path
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a").write_bytes(b"a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.encrypted").symlink_to(tmp_path / "planted")

    result = run(cli, "encrypt", tmp_path / "in", "-o", out, "--raw-key-file", key_file)

    assert result.returncode == 1
    assert f"{out / 'a.encrypted'} already exists; pass --force" in result.stderr
    assert not (tmp_path / "planted").exists()
    assert (out / "a.encrypted").is_symlink()


# -- symbolic links in the input tree --------------------------------------------------


def test_input_tree_symlinks_are_skipped_and_reported_unless_follow_symlinks(
    cli: Cli, raw_key: RawKeyFile, tmp_path: Path
) -> None:
    key_file, key = raw_key.path, raw_key
    (tmp_path / "secret.txt").write_bytes(b"outside the tree")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "s.txt").write_bytes(b"outside too")
    tree = tmp_path / "in"
    tree.mkdir()
    (tree / "a.txt").write_bytes(b"inside")
    (tree / "link.txt").symlink_to(tmp_path / "secret.txt")
    (tree / "linkdir").symlink_to(tmp_path / "secrets", target_is_directory=True)
    (tree / "loop").symlink_to(".", target_is_directory=True)

    out = tmp_path / "out"
    skipped = run(cli, "encrypt", tree, "-o", out, "--raw-key-file", key_file)
    assert skipped.returncode == 0, skipped.stderr  # skipping is the default, not a failure
    assert skipped.stderr.splitlines() == [
        f"aioenvelope: skipped symbolic link {tree / name} (see --follow-symlinks)"
        for name in ("link.txt", "linkdir", "loop")
    ]
    assert listing(out) == {"a.txt.encrypted"}

    followed_out = tmp_path / "followed"
    followed = run(
        cli, "encrypt", tree, "-o", followed_out, "--raw-key-file", key_file, "--follow-symlinks"
    )
    assert followed.returncode == 0, followed.stderr
    # A link back to a directory being walked is still skipped: it would never end.
    assert followed.stderr.splitlines() == [
        f"aioenvelope: skipped symbolic link {tree / 'loop'} (see --follow-symlinks)"
    ]
    assert listing(followed_out) == {
        "a.txt.encrypted",
        "link.txt.encrypted",
        "linkdir",
        "linkdir/s.txt.encrypted",
    }
    link_blob = (followed_out / "link.txt.encrypted").read_bytes()
    assert anyio.run(_decrypt, key, link_blob) == b"outside the tree"


# -- the library: SIGKILL mid-write ----------------------------------------------------

_KILLED_MID_WRITE = """
import asyncio, os, signal, sys
from pathlib import Path
from aioenvelope import EnvelopeClient, RawAesKeyring

method, source, destination = sys.argv[1:]
out = f"{Path(destination).parent.resolve()}/"

def writing() -> bool:
    for fd in os.listdir("/proc/self/fd"):
        try:
            path = f"/proc/self/fd/{fd}"
            if os.readlink(path).startswith(out) and os.stat(path).st_size > 0:
                return True
        except OSError:
            pass
    return False

async def kill_once_writing() -> None:
    while not writing():
        await asyncio.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)

async def main() -> None:
    async with EnvelopeClient(RawAesKeyring("ns", "k", bytes(32))) as client:
        killer = asyncio.create_task(kill_once_writing())
        await getattr(client, method)(source, destination)
        killer.cancel()

asyncio.run(main())
"""


@pytest.mark.parametrize("method", ["encrypt_file", "decrypt_file"])
def test_file_methods_killed_mid_write_leave_nothing(method: str, tmp_path: Path) -> None:
    """The child kills itself (SIGKILL: no cleanup can run) once its output file holds
    bytes; the output directory must still be empty. Only an unnamed file (O_TMPFILE)
    can promise that."""
    plaintext = os.urandom(32 * MIB)
    source = tmp_path / "source"
    if method == "encrypt_file":
        source.write_bytes(plaintext)
    else:

        async def seal() -> bytes:
            async with EnvelopeClient(RawAesKeyring("ns", "k", bytes(32))) as client:
                return await client.encrypt(plaintext)

        source.write_bytes(anyio.run(seal))
    out = tmp_path / "out"
    out.mkdir()

    child = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_WRITE, method, str(source), str(out / "result")],
        capture_output=True,
        timeout=120,
        check=False,
    )

    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert listing(out) == set()
