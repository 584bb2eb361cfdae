"""`trainguard demo --instances 3`: the demo's table and verdict on three instances behind a
balancer on a temporary PostgreSQL, the sweeps leader killed; without PostgreSQL's binaries,
one line saying how to install them and exit status 2."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from trainguard import cli
from trainguard.testing import postgres


def test_without_postgres_binaries_it_says_how_to_install_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(postgres, "find_binaries", lambda: None)
    assert cli.main(["demo", "--instances", "3"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert "apt-get install -y postgresql" in err and "/usr/lib/postgresql/*/bin" in err


@pytest.mark.postgresql
@pytest.mark.slow  # ~40 s: the one training that never finishes waits for its deadline
async def test_three_instances_pass_with_the_leader_killed() -> None:
    if postgres.find_binaries() is None:  # as tests/conftest.py's throwaway_postgres
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {postgres.INSTALL_HINT}")
        pytest.skip(postgres.INSTALL_HINT)
    done = await trio.run_process(
        [sys.executable, "-m", "trainguard", "demo", "--instances", "3", "--trainings", "8"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    lines = out.splitlines()
    led = next(line for line in lines if "leads the sweeps" in line)
    leader = led.split("#")[1].split(" ")[0]
    assert f"instance #{leader}, the sweeps leader, killed with SIGKILL" in out
    took = next(line for line in lines if "took the sweeps lead" in line)
    assert took.split("#")[1].split(" ")[0] != leader
    assert f"instance #{leader} restarted" in out
    assert "exit statuses [0, 0, 0]" in out
    table = [line for line in lines if line.startswith("user0")]
    assert len(table) == 8 and all(line.endswith(" yes") for line in table)
    verdict = lines[-1]
    assert verdict.startswith("verdict: PASS: 8/8 trainings accounted for"), verdict
    assert verdict.endswith("daemon restarts: 1"), verdict
