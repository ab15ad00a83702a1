"""Running a measurement in a child Python under CPU and address-space caps (Linux).

The hostile-input and fuzzing tests use it so that a quadratic path or an allocation
sized by a hostile length shows up as SIGXCPU or a MemoryError in the child, never as a
hung or swapping test run."""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import aioenvelope

linux_only = pytest.mark.skipif(
    sys.platform != "linux", reason="reads /proc/self/status and relies on Linux RLIMIT_AS"
)


def cpu_seconds() -> float:
    """This process's CPU time so far, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _vm_size() -> int:
    """The process's address space now, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def cap(cpu_budget: float, address_space: int | None, *, grace: int = 0) -> None:
    """In the child: allow ``cpu_budget`` more seconds of CPU (plus ``grace``) and, if
    given, ``address_space`` more bytes of address space than it holds now."""
    if address_space is not None:
        limit = _vm_size() + address_space
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    soft = math.ceil(cpu_seconds() + cpu_budget) + grace
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 5))


def run_child(
    what: str,
    code: str,
    *,
    cpu_budget: float,
    extra_env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stderr_tail: int = 3000,
) -> str:
    """Run ``code`` in a child Python that imports the tests and the code under test;
    its stdout. Fails the test if the child went over its CPU cap (SIGXCPU) or failed."""
    tests = Path(__file__).parent
    package_root = Path(aioenvelope.__file__).parent.parent  # the code under test
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tests), str(package_root), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.update(extra_env or {})
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=cpu_budget + 120,
        check=False,
    )
    if proc.returncode == -signal.SIGXCPU:
        pytest.fail(f"{what}: more than {cpu_budget} s of CPU (killed by SIGXCPU)")
    assert proc.returncode == 0, f"{what} failed:\n{proc.stderr[-stderr_tail:]}"
    return proc.stdout
