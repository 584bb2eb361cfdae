"""systemd/trainguard.service: the operator contract, `verify` clean, hardening exposure."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from trainguard import config

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "trainguard.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, values in order of appearance."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists on this machine."""
    text = re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text())
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def test_contract_directives() -> None:
    found = directives()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "DynamicUser": "yes",
        "StateDirectory": "trainguard",
        "ConfigurationDirectory": "trainguard",
        "ExecStart": "/opt/trainguard/.venv/bin/trainguard run",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "TimeoutStopSec": "30",
        "KillSignal": "SIGTERM",
        "EnvironmentFile": "-/etc/trainguard/secrets.env",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }
    assert {key: found[key][-1] for key in expected} == expected
    assert "TRAINGUARD_CONFIG=/etc/trainguard/config.toml" in found["Environment"]
    assert found["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


@needs_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "verify", str(runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "trainguard" not in result.stdout + result.stderr


@needs_analyze
def test_security_exposure_below_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for trainguard\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < 2.0, result.stdout


def test_fd_limit_covers_both_listeners_bounds() -> None:
    """issue 9 item 11: the unit set no LimitNOFILE (systemd's soft default is 1,024), and
    1,500 held connections ran it out."""
    defaults = config.parse({}, env={})
    (limit,) = directives()["LimitNOFILE"]
    connections = defaults.webhook["max_connections"] + defaults.metrics["max_connections"]
    assert limit.isdigit() and int(limit) >= 2 * connections, (limit, connections)
