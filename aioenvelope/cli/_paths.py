"""What the command line reads and writes: one file, stdin/stdout, or a directory tree
mirrored into another, planned in full before any key is touched.

In a directory tree, symbolic links are not traversed. Below the input directory a link
is skipped (and reported) unless ``--follow-symlinks``; below the output directory
nothing is ever written through one: each job opens its directories one component at
a time from the output root with ``O_NOFOLLOW`` and writes into the directory it holds
open, so a link planted there (``out/sub -> /etc``, or a file ``out/a -> /etc/passwd``
with ``--force``) can neither redirect a write nor be raced into doing so between a
check and the write. The roots themselves are what the user named, and are followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..format.suites import AlgorithmSuite

__all__ = [
    "ENCRYPTED_SUFFIX",
    "STDIO",
    "CliError",
    "Job",
    "Plan",
    "Tree",
    "UsageError",
    "check_destination",
    "decrypted_name",
    "encrypted_name",
    "is_message",
    "make_dirs",
    "open_directory",
    "open_source",
    "plan_jobs",
    "remove_empty_dirs",
    "same_name",
]

STDIO = "-"
ENCRYPTED_SUFFIX = ".encrypted"
DECRYPTED_SUFFIX = ".decrypted"


class UsageError(Exception):
    """The arguments do not fit together: exit status 2, like an argparse error."""


class CliError(Exception):
    """An operation failed for a reason its message explains: exit status 1."""


def encrypted_name(name: str) -> str:
    return name + ENCRYPTED_SUFFIX


def decrypted_name(name: str) -> str:
    """Strip ``.encrypted``; a name without it gets ``.decrypted`` rather than clobbering
    a plaintext of the same name."""
    stem = name.removesuffix(ENCRYPTED_SUFFIX)
    return stem if stem and stem != name else name + DECRYPTED_SUFFIX


def same_name(name: str) -> str:
    return name


@dataclass(frozen=True)
class Tree:
    """Where a directory tree's job reads and writes: ``parts`` is the input file's
    directory relative to ``input_root`` and the output's relative to ``output_root``."""

    input_root: Path
    output_root: Path
    parts: tuple[str, ...]
    input_name: str
    output_name: str
    follow_symlinks: bool


@dataclass(frozen=True)
class Job:
    """One message to write: ``source`` None is stdin, ``destination`` None is stdout;
    ``tree`` for a file of a directory tree (opened without following links)."""

    source: Path | None
    destination: Path | None
    tree: Tree | None = None

    @property
    def label(self) -> str:
        return str(self.source) if self.source is not None else "<stdin>"


@dataclass(frozen=True)
class Plan:
    """Every job of a command. ``batch`` (a directory, or several inputs) reports
    failures per file and goes on; ``new_dirs`` are the output directories to create
    (the output root and its missing parents first; those below the root as jobs reach
    them) and to remove again if they end up empty; ``skipped`` are the symbolic links
    not followed, ``already_encrypted`` the files an encrypt leaves alone."""

    jobs: tuple[Job, ...]
    batch: bool
    new_dirs: tuple[Path, ...] = ()
    output_root: Path | None = None
    skipped: tuple[Path, ...] = ()
    already_encrypted: tuple[Path, ...] = ()


def plan_jobs(
    inputs: Sequence[str],
    output_arg: str,
    rename: Callable[[str], str],
    *,
    follow_symlinks: bool = False,
    skip_encrypted: bool = False,
) -> Plan:
    """Map the INPUTs and ``-o OUTPUT`` to jobs. An existing OUTPUT directory receives
    the input's name (renamed), as with the AWS Encryption CLI; several INPUTs need one,
    as with ``cp``. With ``skip_encrypted`` (encrypt), files found in a directory that
    are already messages, or carry the ``.encrypted`` suffix, are left out (and listed),
    so a second run never encrypts its own output again."""
    if len(inputs) > 1:
        return _plan_several(inputs, output_arg, rename, follow_symlinks, skip_encrypted)
    (input_arg,) = inputs
    if input_arg == STDIO:
        return Plan((Job(None, _file_destination(output_arg, None, rename)),), batch=False)
    source = Path(input_arg)
    if source.is_dir():
        return _plan_tree(source, output_arg, rename, follow_symlinks, skip_encrypted)
    _check_exists(source)
    return Plan((Job(source, _file_destination(output_arg, source.name, rename)),), batch=False)


def _check_exists(source: Path) -> None:
    if not source.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(source))


def _file_destination(
    output_arg: str, name: str | None, rename: Callable[[str], str]
) -> Path | None:
    if output_arg == STDIO:
        return None
    destination = Path(output_arg)
    if destination.is_dir():
        if name is None:
            raise UsageError("with input from stdin, -o must name a file, not a directory")
        return destination / rename(name)
    return destination


def _plan_tree(
    root: Path,
    output_arg: str,
    rename: Callable[[str], str],
    follow_symlinks: bool,
    skip_encrypted: bool,
) -> Plan:
    if output_arg == STDIO:
        raise UsageError("a directory input needs -o DIRECTORY, not -")
    out = Path(output_arg)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is not a directory, and the input {root} is one")
    jobs, skipped, encrypted = _tree_jobs(root, out, (), rename, follow_symlinks, skip_encrypted)
    return Plan(
        tuple(jobs),
        batch=True,
        new_dirs=_missing_dirs(jobs),
        output_root=out,
        skipped=tuple(skipped),
        already_encrypted=tuple(encrypted),
    )


def _tree_jobs(
    root: Path,
    out: Path,
    prefix: tuple[str, ...],
    rename: Callable[[str], str],
    follow_symlinks: bool,
    skip_encrypted: bool,
) -> tuple[list[Job], list[Path], list[Path]]:
    """The jobs for the files under ``root``, written below ``out/prefix...``; the links
    skipped; the files left alone as already encrypted. With a ``prefix`` (the
    directory's own name, for several INPUTs) the input side is read the same way,
    from the directory's parent: every job's ``parts`` then name the same directories
    below both roots."""
    files, skipped = _walk(root, out, follow_symlinks)
    input_root = root.resolve().parent if prefix else root
    jobs: list[Job] = []
    encrypted: list[Path] = []
    for path in files:
        if skip_encrypted and (path.name.endswith(ENCRYPTED_SUFFIX) or is_message(path)):
            encrypted.append(path)
            continue
        parts = (*prefix, *path.relative_to(root).parent.parts)
        name = rename(path.name)
        tree = Tree(input_root, out, parts, path.name, name, follow_symlinks)
        jobs.append(Job(path, out.joinpath(*parts, name), tree))
    return jobs, skipped, encrypted


def _plan_several(
    inputs: Sequence[str],
    output_arg: str,
    rename: Callable[[str], str],
    follow_symlinks: bool,
    skip_encrypted: bool,
) -> Plan:
    """Several INPUTs, like ``cp``: each file is written into the OUTPUT directory under
    its own name (renamed), each directory as a subdirectory of the same name."""
    if STDIO in inputs:
        raise UsageError("stdin (-) can only be the one INPUT")
    out = Path(output_arg)
    if output_arg == STDIO or (out.exists() and not out.is_dir()):
        raise UsageError(
            f"with {len(inputs)} INPUTs, -o must be a directory (-o DIR/), not {output_arg}"
        )
    if not out.exists() and not output_arg.endswith("/"):
        raise UsageError(
            f"with {len(inputs)} INPUTs, -o must be a directory: {out} does not exist "
            f"(write -o {output_arg}/ to create it)"
        )
    jobs: list[Job] = []
    skipped: list[Path] = []
    encrypted: list[Path] = []
    for input_arg in inputs:
        source = Path(input_arg)
        if source.is_dir():
            name = source.resolve().name
            if not name:
                raise UsageError(f"{source} has no name to give its copy in {out}")
            more, links, sealed = _tree_jobs(
                source, out, (name,), rename, follow_symlinks, skip_encrypted
            )
            jobs += more
            skipped += links
            encrypted += sealed
        else:
            _check_exists(source)
            jobs.append(Job(source, out / rename(source.name)))
    _refuse_collisions(jobs)
    return Plan(
        tuple(jobs),
        batch=True,
        new_dirs=_missing_dirs(jobs),
        output_root=out,
        skipped=tuple(skipped),
        already_encrypted=tuple(encrypted),
    )


def _refuse_collisions(jobs: Sequence[Job]) -> None:
    """Two inputs of the same name would write one output: refused before anything."""
    seen: dict[Path, Job] = {}
    for job in jobs:
        assert job.destination is not None
        other = seen.setdefault(job.destination, job)
        if other is not job:
            raise UsageError(
                f"{other.label} and {job.label} would both be written to {job.destination}"
            )


_V1_TYPE = 0x80  # the only message type of version 1: customer authenticated encrypted data


def is_message(path: Path) -> bool:
    """Whether the file starts as our messages do: version 2 and a suite we know, or
    version 1, type 0x80 and a suite we know (a plaintext that happens to start so is
    skipped too; it is reported, so nothing goes unnoticed). ``O_NONBLOCK``: a FIFO
    swapped in cannot block the planning; unreadable files are left for the job to
    report."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        start = os.read(fd, 4)
    except OSError:
        return False
    finally:
        os.close(fd)
    if len(start) >= 3 and start[0] == 2:
        suite = AlgorithmSuite.from_id(int.from_bytes(start[1:3], "big"))
        return suite is not None and suite.message_version == 2
    if len(start) == 4 and start[0] == 1 and start[1] == _V1_TYPE:
        suite = AlgorithmSuite.from_id(int.from_bytes(start[2:4], "big"))
        return suite is not None and suite.message_version == 1
    return False


def _walk(root: Path, out: Path, follow_symlinks: bool) -> tuple[list[Path], list[Path]]:
    """Regular files under ``root`` in a stable order (a directory's files, then its
    subdirectories), and the symbolic links skipped. Skips ``out`` when it lies inside
    ``root`` (else a second run would process its own output). Following links, a link
    back to a directory being walked is skipped too (it would never end)."""
    skip = out.resolve()
    root_resolved = root.resolve()
    files: list[Path] = []
    skipped: list[Path] = []
    root_info = root.stat()
    stack: list[tuple[Path, frozenset[tuple[int, int]]]] = [
        (root, frozenset({(root_info.st_dev, root_info.st_ino)}))
    ]
    while stack:
        here, ancestors = stack.pop()
        with os.scandir(here) as entries:
            listed = sorted(entries, key=lambda entry: entry.name)
        subdirs: list[tuple[Path, frozenset[tuple[int, int]]]] = []
        for entry in listed:
            path = here / entry.name
            if entry.is_symlink() and not follow_symlinks:
                skipped.append(path)
                continue
            try:
                info = os.stat(path)  # through a link only when following them
            except OSError:
                continue  # a dangling link, or gone since listed
            if stat.S_ISREG(info.st_mode):
                files.append(path)
            elif stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                resolved = path.resolve()
                if skip != root_resolved and (resolved == skip or skip in resolved.parents):
                    continue
                if key in ancestors:
                    skipped.append(path)
                    continue
                subdirs.append((path, ancestors | {key}))
            # not sockets, FIFOs or devices
        stack.extend(reversed(subdirs))
    return files, skipped


def _missing_dirs(jobs: list[Job]) -> tuple[Path, ...]:
    """Output directories that do not exist yet (a link counts as existing: it is
    refused when reached, never replaced or followed)."""
    missing: set[Path] = set()
    for job in jobs:
        assert job.destination is not None
        parent = job.destination.parent
        while parent not in missing and not os.path.lexists(parent):
            missing.add(parent)
            parent = parent.parent
    return tuple(sorted(missing))  # parents sort before their children


def _below(root: Path, path: Path) -> tuple[str, ...] | None:
    """``path``'s components below ``root``, or None if it is not below it."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    return parts or None


def make_dirs(plan: Plan) -> None:
    """Create the output root and its missing parents (the user's path, links in it
    followed). Directories below the root are made by the jobs that need them (see
    :func:`open_directory`)."""
    for path in plan.new_dirs:
        if plan.output_root is None or _below(plan.output_root, path) is None:
            path.mkdir(exist_ok=True)


def remove_empty_dirs(plan: Plan) -> None:
    """Remove the directories we created that no output landed in, so a failed run
    leaves nothing behind (below the root, without following links either)."""
    for path in reversed(plan.new_dirs):
        parts = _below(plan.output_root, path) if plan.output_root is not None else None
        try:
            if parts is None:
                path.rmdir()
                continue
            assert plan.output_root is not None
            parent = open_directory(plan.output_root, parts[:-1], create=False)
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            finally:
                os.close(parent)
        except (OSError, CliError):
            continue  # not empty, gone, or reached through a link: keep it


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_directory(root: Path, parts: Sequence[str], *, create: bool) -> int:
    """An open descriptor of ``root/parts...``: ``root`` as the user named it, each
    part below it with ``O_NOFOLLOW``, so a symbolic link there is refused (CliError),
    never followed. With ``create``, missing directories are made. The caller closes it.

    No race remains with a link planted meanwhile: each step holds the directory it
    opened. (A directory moved elsewhere after it was opened is written into where it
    now is; moving it needs write access to both places.)"""
    fd = os.open(root, _DIRECTORY)
    try:
        for depth, part in enumerate(parts):
            try:
                child = _open_child(fd, part, create)
            except OSError as exc:
                where = root.joinpath(*parts[: depth + 1])
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CliError(
                        f"{where} is a symbolic link or not a directory; nothing is "
                        f"written through links below {root}"
                    ) from None
                exc.filename = str(where)
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child(fd: int, part: str, create: bool) -> int:
    flags = _DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(part, flags, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    # Another job may have made it meanwhile (or a link was planted: refused below).
    with contextlib.suppress(FileExistsError):
        os.mkdir(part, 0o777, dir_fd=fd)
    return os.open(part, flags, dir_fd=fd)


def open_source(job: Job) -> int:
    """An open descriptor of the job's input file. In a tree not following links, every
    directory below the input root and the file itself are opened with ``O_NOFOLLOW``,
    so a link swapped in after planning is refused, never read through; and it must
    still be a regular file (``O_NONBLOCK``: a FIFO swapped in cannot block the open)."""
    assert job.source is not None
    tree = job.tree
    if tree is None or tree.follow_symlinks:
        fd = os.open(job.source, os.O_RDONLY | os.O_CLOEXEC)
    else:
        parent = open_directory(tree.input_root, tree.parts, create=False)
        try:
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = os.open(tree.input_name, flags, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CliError(f"{job.source} is a symbolic link; not followed") from None
            exc.filename = str(job.source)
            raise
        finally:
            os.close(parent)
    try:
        if job.tree is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CliError(f"{job.source} is no longer a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_destination(destination: Path, overwrite: bool) -> None:
    """Fail before any key is used if the output cannot be written (write_atomically
    checks again at the end, so a file appearing meanwhile is still never clobbered)."""
    if not overwrite and os.path.lexists(destination):
        raise CliError(f"{destination} already exists; pass --force to replace it")
    if not destination.parent.is_dir():
        raise CliError(f"{destination.parent} is not a directory")
