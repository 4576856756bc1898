"""Developer tasks: ``nox -s tests`` (the CI gate), ``tests_all``, ``lint``, ``typecheck``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
# ``tests_all`` runs on every supported Python that is installed and skips the others; ``.ci/run``
# checks beforehand that at least two of them are there.
nox.options.error_on_missing_interpreters = False

#: The CPython versions p2ppay supports (keep in step with pyproject's classifiers).
PYTHONS = ["3.11", "3.12", "3.13"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (unit, in-memory, loopback, subprocess, property)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHONS)
def tests_all(session: nox.Session) -> None:
    """The whole test suite on each supported Python found on PATH (missing ones are skipped)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def coverage(session: nox.Session) -> None:
    """The suite under coverage.py: branches, and the CLI subprocesses the tests start."""
    session.install("-e", ".[dev]")
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine", "--quiet")
    session.run("coverage", "report")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The fuzz tests with many more examples than the normal suite runs."""
    session.install("-e", ".[test]")
    session.run(
        "pytest", "tests/test_fuzz.py", *session.posargs, env={"HYPOTHESIS_PROFILE": "fuzz"}
    )


@nox.session
def soak(session: nox.Session) -> None:
    """The long bank test: many clients, many SIGKILLs and restarts."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/test_bank.py", *session.posargs, env={"P2PPAY_SOAK": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark against a same-run baseline; pass --full for 10,000 sessions."""
    session.install("-e", ".")
    session.run("python", "-m", "benchmarks.bench", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, with flake8-async's ASYNC rules among the selected ones."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and this file."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict")
