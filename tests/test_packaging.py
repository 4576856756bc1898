"""What operators and packagers rely on: one version, the license, the systemd unit's flags."""

from __future__ import annotations

import configparser
import importlib.metadata
import shlex
from pathlib import Path

import p2ppay
from p2ppay.cli.main import STATE_ENV, build_parser, server_options

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_is_declared_once() -> None:
    assert importlib.metadata.version("p2ppay") == p2ppay.__version__
    metadata = importlib.metadata.metadata("p2ppay")
    assert metadata["License-Expression"] == "MIT"
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_the_systemd_unit_runs_a_server_this_version_understands() -> None:
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "contrib" / "p2ppay.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    state = service["StateDirectory"]
    assert service["Environment"] == f"{STATE_ENV}=/var/lib/{state}"
    assert "User" in service or service.get("DynamicUser") == "yes"
    program, *args = shlex.split(service["ExecStart"])
    assert program.endswith("/p2ppay")
    parsed = build_parser().parse_args(args)  # exits (fails the test) on a flag it lacks
    options = server_options(parsed)
    assert (parsed.command, options.config.deposits, parsed.log_format) == (
        "server",
        "operator",
        "json",
    )
