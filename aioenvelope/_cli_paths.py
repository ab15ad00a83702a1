"""What the command line reads and writes: one file, stdin/stdout, or a directory tree
mirrored into another, planned in full before any key is touched."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ENCRYPTED_SUFFIX",
    "STDIO",
    "CliError",
    "Job",
    "Plan",
    "UsageError",
    "check_destination",
    "decrypted_name",
    "encrypted_name",
    "make_dirs",
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
class Job:
    """One message to write: ``source`` None is stdin, ``destination`` None is stdout."""

    source: Path | None
    destination: Path | None

    @property
    def label(self) -> str:
        return str(self.source) if self.source is not None else "<stdin>"


@dataclass(frozen=True)
class Plan:
    """Every job of a command. ``batch`` (a directory) reports failures per file and
    goes on; ``new_dirs`` are the output directories to create first (and to remove
    again if they end up empty)."""

    jobs: tuple[Job, ...]
    batch: bool
    new_dirs: tuple[Path, ...] = ()


def plan_jobs(input_arg: str, output_arg: str, rename: Callable[[str], str]) -> Plan:
    """Map INPUT and ``-o OUTPUT`` to jobs. An existing OUTPUT directory receives the
    input's name (renamed), as with the AWS Encryption CLI."""
    if input_arg == STDIO:
        return Plan((Job(None, _file_destination(output_arg, None, rename)),), batch=False)
    source = Path(input_arg)
    if source.is_dir():
        return _plan_tree(source, output_arg, rename)
    if not source.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), input_arg)
    return Plan((Job(source, _file_destination(output_arg, source.name, rename)),), batch=False)


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


def _plan_tree(root: Path, output_arg: str, rename: Callable[[str], str]) -> Plan:
    if output_arg == STDIO:
        raise UsageError("a directory input needs -o DIRECTORY, not -")
    out = Path(output_arg)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is not a directory, and the input {root} is one")
    jobs = tuple(
        Job(path, out / path.relative_to(root).parent / rename(path.name))
        for path in _files(root, out)
    )
    return Plan(jobs, batch=True, new_dirs=_missing_dirs(jobs))


def _files(root: Path, out: Path) -> Iterator[Path]:
    """Regular files under ``root`` in a stable order, skipping ``out`` when it lies
    inside ``root`` (else a second run would process its own output)."""
    skip = out.resolve()
    root_resolved = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        resolved = here.resolve()
        if skip != root_resolved and (resolved == skip or skip in resolved.parents):
            dirnames.clear()
            continue
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            if path.is_file():  # not sockets, FIFOs or dangling links
                yield path


def _missing_dirs(jobs: tuple[Job, ...]) -> tuple[Path, ...]:
    missing: set[Path] = set()
    for job in jobs:
        assert job.destination is not None
        parent = job.destination.parent
        while parent not in missing and not parent.exists():
            missing.add(parent)
            parent = parent.parent
    return tuple(sorted(missing))  # parents sort before their children


def make_dirs(dirs: tuple[Path, ...]) -> None:
    for path in dirs:
        path.mkdir(exist_ok=True)


def remove_empty_dirs(dirs: tuple[Path, ...]) -> None:
    """Remove the directories we created that no output landed in, so a failed run
    leaves nothing behind."""
    for path in reversed(dirs):
        try:
            path.rmdir()
        except OSError:
            continue  # not empty (or gone): keep it


def check_destination(destination: Path, overwrite: bool) -> None:
    """Fail before any key is used if the output cannot be written (write_atomically
    checks again at the end, so a file appearing meanwhile is still never clobbered)."""
    if not overwrite and destination.exists():
        raise CliError(f"{destination} already exists; pass --force to replace it")
    if not destination.parent.is_dir():
        raise CliError(f"{destination.parent} is not a directory")
