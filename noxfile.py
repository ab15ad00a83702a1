"""Developer and CI entry points: ``nox -s tests|lint|typecheck|bench|demo``."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]

PYTHON = "3"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite: sans-I/O core, conformance vectors, ESDK interop."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")  # pinned: new releases format more (0.17 formats Markdown code)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test,typecheck]", "nox")
    session.run("mypy", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Throughput next to raw AES-GCM and the AWS Encryption SDK, as ratios."""
    session.install("-e", ".[bench]")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: the quickstart, end to end (embedded KMS unless a key is given);
    then per-record encryption contexts, hierarchical keyring vs KMS keyring, with the
    KMS and DynamoDB calls each made (always embedded: it creates a DynamoDB table)."""
    session.install("-e", ".[demo]")
    session.run("python", "examples/quickstart.py", *session.posargs)
    session.run("python", "-m", "aioenvelope._demo")
