"""A network partition between an instance and PostgreSQL (issue 11): packets dropped
without a reset, so no error comes by itself. libpq's defaults would hang the call for TCP's
~15 minutes of retransmissions; with the store's ``tcp_user_timeout`` and keepalives
(``trainguard.dialect.LIBPQ_DEFAULTS``) the write fails as a StoreError within the bound,
and writes work again once the network is back. The partition is real: the probe
(``tests/pg_partition_probe.py``) runs in a network namespace of its own (``unshare -n``)
and takes that namespace's loopback down."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.dialect import TCP_USER_TIMEOUT_MS, PostgresDialect
from trainguard.testing.postgres import INSTALL_HINT, find_binaries

pytestmark = pytest.mark.postgresql

PROBE = Path(__file__).with_name("pg_partition_probe.py")


def _namespaces_unavailable() -> str | None:
    """Why a network namespace cannot be made here (None: it can)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare and ip (util-linux, iproute2) are needed for a network namespace"
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"no network namespace here (unshare -n: {done.stderr.strip()})"
    return None


def test_a_partition_fails_a_write_within_the_bound_and_writes_work_after() -> None:
    if find_binaries() is None:
        pytest.skip(INSTALL_HINT)
    reason = _namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    done = subprocess.run(
        ["unshare", "-n", sys.executable, str(PROBE)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    bound = TCP_USER_TIMEOUT_MS / 1000
    assert result["failed"], result
    # Not before the timeout (nothing else could fail it) and not long after it.
    assert bound * 0.8 <= result["failed_after"] <= bound + 10, result
    assert result["back_after"] is not None, result
    assert result["rows"] == 2, result  # the write before and the one after; not the lost one


def test_the_libpq_defaults_apply_unless_the_url_names_its_own() -> None:
    params = PostgresDialect().open("postgresql://tg@127.0.0.1:5/db").connect_params
    assert params["tcp_user_timeout"] == TCP_USER_TIMEOUT_MS
    assert (params["keepalives"], params["keepalives_idle"]) == (1, 10)
    mine = PostgresDialect().open("postgresql://tg@127.0.0.1:5/db?tcp_user_timeout=500")
    assert mine.connect_params["tcp_user_timeout"] == 500
