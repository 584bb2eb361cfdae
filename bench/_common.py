"""Shared pieces of the benchmarks: child processes, configs, /proc readings, seeding.

Every benchmark runs the real daemon as a subprocess (``python -m daemon run``) against a
simulator or a tiny JWKS server in their own processes, on loopback only, and kills whatever
it started when it ends, however it ends (``Children``). The database is seeded directly
through the daemon's own models before the daemon starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FAL_KEY = "bench-key-not-secret"
ENDPOINT = "fal-ai/flux-lora-portrait-trainer"
LAYERS = ("webhook", "poller", "delayed", "startup", "completeness", "emergency")
CLK_TCK = os.sysconf("SC_CLK_TCK")
_T0 = time.monotonic()


def say(text: str) -> None:
    """A progress line, stamped with seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def write_json(out: str | None, figures: Mapping[str, Any]) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    say(f"figures written to {path}")


# -- command line ----------------------------------------------------------------------------
def parse_args(
    description: str | None,
    options: Callable[[argparse.ArgumentParser], None],
    *,
    keep_what: str = "logs, databases",
) -> argparse.Namespace:
    """The command line: the benchmark's own ``options``, then the two every benchmark
    ends with (``--keep``, ``--out``)."""
    parser = argparse.ArgumentParser(description=description)
    options(parser)
    parser.add_argument("--keep", metavar="DIR", help=f"keep the work directory ({keep_what})")
    parser.add_argument("--out", help="write the figures as JSON to this file")
    return parser.parse_args()


@contextmanager
def work_directory(keep: str | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created if need be) or a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(keep) if keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir


def run_main(
    description: str | None,
    options: Callable[[argparse.ArgumentParser], None],
    bench: Callable[[argparse.Namespace, Path], Awaitable[dict[str, Any]]],
    report: Callable[[dict[str, Any]], None],
    prefix: str,
    *,
    needs_postgresql: Callable[[argparse.Namespace], bool] = lambda args: False,
) -> None:
    """A benchmark's main: parse the arguments, run ``bench`` in a work directory, print
    ``report`` and write the figures to ``--out``. When ``needs_postgresql`` says so for
    these arguments and its server binaries are absent, the benchmark is skipped (said and
    written to ``--out``), as webhook_ingest is without wrk: ``make bench`` goes on."""
    args = parse_args(description, options)
    if needs_postgresql(args):
        from trainguard.testing.postgres import INSTALL_HINT, find_binaries

        if find_binaries() is None:
            print(f"{Path(sys.argv[0]).stem} SKIPPED: {INSTALL_HINT}")
            write_json(args.out, {"skipped": "PostgreSQL's server binaries are not installed"})
            return
    with work_directory(args.keep, prefix) as workdir:
        figures = trio.run(bench, args, workdir)
    report(figures)
    write_json(args.out, figures)


# -- /proc ---------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        raw = f.read()
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon and VmSize of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmSize"):
                out[key] = int(value.split()[0])
    return out


# -- child processes -------------------------------------------------------------------------
class Children:
    """The processes a benchmark started; all of them are stopped when the block ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)

    def spawn(
        self,
        args: Sequence[str],
        name: str,
        *,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            list(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "FAL_KEY": FAL_KEY, **(env or {})},
        )
        log.close()
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"


def daemon_args(config_path: Path) -> list[str]:
    return [PYTHON, "-m", "trainguard", "run", "--config", str(config_path)]


def simulator_args(port: int, *, run_seconds: float, faults: Iterable[str] = ()) -> list[str]:
    args = [
        PYTHON,
        "-m",
        "trainguard",
        "simulate",
        "--port",
        str(port),
        "--queue-seconds",
        "0",
        "--run-seconds",
        str(run_seconds),
        "--log-level",
        "warning",
    ]
    for fault in faults:
        args += ["--fault", fault]
    return args


async def wait_http(
    url: str, proc: subprocess.Popen[bytes], *, timeout: float = 60.0, want: int = 200
) -> float:
    """Poll ``url`` until it answers ``want``; returns the seconds waited. Raises if the
    process exits first or the time runs out."""
    start = trio.current_time()
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
        with trio.fail_after(timeout):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
                try:
                    if (await client.get(url)).status_code == want:
                        return trio.current_time() - start
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.02)


async def metrics(port: int) -> dict[str, float]:
    """The daemon's /metrics as {"name{labels}": value}."""
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def start_simulator(
    children: Children, *, run_seconds: float, faults: Iterable[str] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    """The simulator in its own process, answering; the process and its base URL."""
    port = free_port()
    sim = children.spawn(simulator_args(port, run_seconds=run_seconds, faults=faults), "simulator")
    sim_url = f"http://127.0.0.1:{port}"
    await wait_http(f"{sim_url}/.well-known/jwks.json", sim)
    return sim, sim_url


async def start_daemon(
    children: Children, config: Path, name: str, metrics_port: int, *, timeout: float = 60.0
) -> tuple[subprocess.Popen[bytes], float]:
    """Wait for a quiet machine, then start ``daemon-{name}``; the process and the seconds
    to its /readyz answering 200."""
    await wait_quiet()
    daemon = children.spawn(daemon_args(config), f"daemon-{name}")
    ready = await wait_http(f"http://127.0.0.1:{metrics_port}/readyz", daemon, timeout=timeout)
    return daemon, ready


# -- databases -------------------------------------------------------------------------------
#: A daemon's database: a SQLite file, or a database URL (``sqlite:///...`` or PostgreSQL).
Db = Path | str
DATABASES = ("sqlite", "postgresql")


def db_url(db: Db) -> str:
    """The ``[database] url`` of ``db``."""
    return f"sqlite:///{db}" if isinstance(db, Path) else db


def database_kinds(choice: str) -> list[str]:
    """The backends a ``--database`` choice (sqlite, postgresql or both) runs, in order."""
    return list(DATABASES) if choice == "both" else [choice]


#: The key under which a ``--database both`` run keeps its PostgreSQL / SQLite ratios.
RATIOS_KEY = "ratio_postgresql_to_sqlite"


def report_per_database(
    figures: dict[str, Any], report_one: Callable[[dict[str, Any]], None]
) -> dict[str, Any] | None:
    """Print the figures of a one-database run, or both databases' of a ``both`` run with
    ``report_one``; the ratios of a ``both`` run (None for one database)."""
    if RATIOS_KEY not in figures:
        report_one(figures)
        return None
    report_one(figures["sqlite"])
    report_one(figures["postgresql"])
    return dict(figures[RATIOS_KEY])


def add_database_option(parser: argparse.ArgumentParser, default: str = "sqlite") -> None:
    parser.add_argument(
        "--database",
        choices=(*DATABASES, "both"),
        default=default,
        help="the daemon's database: a SQLite file, a throwaway PostgreSQL server (fsync on, "
        "as SQLite's synchronous=FULL), or both in one run, with the ratio",
    )


class Databases:
    """Fresh databases of one kind for a benchmark: SQLite files in the work directory, or
    databases on one throwaway PostgreSQL server started on first use (fsync on, so that its
    figures are durable ones like SQLite's) and removed when the ``with`` block ends."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self._server: Any = None
        self._postmaster = 0

    def fresh(self, name: str) -> Db:
        """A new, empty database for ``name``."""
        if self.kind == "sqlite":
            return self.workdir / f"{name}.db"
        if self._server is None:
            from trainguard.testing.postgres import PostgresServer

            say("starting a throwaway PostgreSQL server (fsync on)")
            self._server = PostgresServer(fsync=True).start()
            self._postmaster = int((self._server.data / "postmaster.pid").read_text().split()[0])
            _OWN_ROOTS.add(self._postmaster)
        return str(self._server.database())

    def server_cpu_seconds(self) -> float:
        """CPU seconds the PostgreSQL server has used so far (the postmaster, its live
        backends and those that ended); 0 for SQLite, which works inside the daemon."""
        if self._server is None:
            return 0.0
        return _tree_jiffies(self._postmaster) / CLK_TCK

    def __enter__(self) -> Databases:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            _OWN_ROOTS.discard(self._postmaster)


# -- configuration ---------------------------------------------------------------------------
_installed: tuple[str, ...] | None = None


def installed_layers() -> tuple[str, ...]:
    """Every layer the installed plugins offer (built-in ones and third-party ones)."""
    global _installed
    if _installed is None:
        out = subprocess.run(
            [PYTHON, "-m", "trainguard", "plugins", "--json"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            env={k: v for k, v in os.environ.items() if k != "TRAINGUARD_CONFIG"},
        ).stdout
        _installed = tuple(row["layer"] for row in json.loads(out))
    return _installed


def write_config(
    workdir: Path,
    *,
    db_path: Db,
    queue_url: str,
    jwks_url: str,
    webhook_port: int,
    metrics_port: int,
    enabled: Iterable[str] = LAYERS,
    layers: Mapping[str, Mapping[str, Any]] | None = None,
    fal: Mapping[str, Any] | None = None,
    log_level: str = "info",
    name: str = "config.toml",
    extra_tables: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A config.toml for the daemon; every installed layer not in ``enabled`` (third-party
    ones too: the benchmarks measure trainguard's own layers) gets ``enabled = false``.
    ``db_path`` is a SQLite file or a database URL (``db_url``); ``extra_tables`` adds or
    overrides top-level tables (e.g. ``cluster``)."""
    fal_table = {
        "queue_url": queue_url,
        "jwks_url": jwks_url,
        "max_requests_per_second": 10_000.0,
        "timeout_seconds": 10.0,
        "backup_queue_url": "",  # loopback only: never the shipped backup host
        **(fal or {}),
    }
    tables: dict[str, dict[str, Any]] = {
        "database": {"url": db_url(db_path)},
        "fal": fal_table,
        "webhook": {
            "listen": f"127.0.0.1:{webhook_port}",
            "public_url": f"http://127.0.0.1:{webhook_port}/fal/webhook",
        },
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "log": {"level": log_level},
    }
    for table, values in (extra_tables or {}).items():
        tables[table] = {**tables.get(table, {}), **values}
    chosen = set(enabled)
    for layer in dict.fromkeys((*LAYERS, *installed_layers())):
        tables[f"layers.{layer}"] = {"enabled": layer in chosen, **(layers or {}).get(layer, {})}
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = workdir / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def simulator_config(
    workdir: Path, name: str, *, db_path: Db, sim_url: str, **options: Any
) -> tuple[Path, int]:
    """``{name}.toml`` for a daemon on ``db_path`` talking to the simulator at ``sim_url``,
    on free ports (``options``: more ``write_config`` keywords, e.g. ``enabled``,
    ``layers``); the config's path and the daemon's metrics port."""
    metrics_port = free_port()
    config = write_config(
        workdir,
        db_path=db_path,
        queue_url=sim_url,
        jwks_url=f"{sim_url}/.well-known/jwks.json",
        webhook_port=free_port(),
        metrics_port=metrics_port,
        name=f"{name}.toml",
        **options,
    )
    return config, metrics_port


def seeded_config(
    workdir: Path,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    sim_url: str,
    db: Db | None = None,
    **options: Any,
) -> tuple[Db, Path, int]:
    """A fresh database (``db``, by default ``{name}.db`` in ``workdir``) seeded with
    ``rows``, and ``simulator_config`` for a daemon on it; the database, the config's path
    and the daemon's metrics port."""
    db_path = workdir / f"{name}.db" if db is None else db
    seed_database(db_path, rows)
    config, metrics_port = simulator_config(
        workdir, name, db_path=db_path, sim_url=sim_url, **options
    )
    return db_path, config, metrics_port


# -- seeding ---------------------------------------------------------------------------------
async def submit_to_simulator(
    base_url: str, n: int, *, concurrency: int = 16, webhook_url: str | None = None
) -> list[dict[str, str]]:
    """Submit ``n`` trainings to the simulator over HTTP; their request ids and URLs."""
    results: list[dict[str, str]] = []
    params = {"fal_webhook": webhook_url} if webhook_url else None
    headers = {"Authorization": f"Key {FAL_KEY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=30.0, limits=limits, trust_env=False) as client:

        async def worker(indexes: range) -> None:
            for i in indexes:
                body = {
                    "images_data_url": f"https://example.invalid/bench/{i}.zip",
                    "trigger_phrase": f"bench{i} person",
                }
                for _attempt in range(5):  # bounded: the simulator injects no API faults here
                    reply = await client.post(
                        f"{base_url}/{ENDPOINT}", json=body, params=params, headers=headers
                    )
                    if reply.status_code == 200:
                        break
                    await trio.sleep(0.1)
                reply.raise_for_status()
                data = reply.json()
                results.append(
                    {k: data[k] for k in ("request_id", "status_url", "response_url", "cancel_url")}
                )

        async with trio.open_nursery() as nursery:
            for w in range(concurrency):
                nursery.start_soon(worker, range(w, n, concurrency))
    return results


def fake_submission(base_url: str = "http://127.0.0.1:9") -> dict[str, str]:
    """A request id and URLs for a training the simulator does not need to know."""
    request_id = str(uuid.uuid4())
    response_url = f"{base_url}/{ENDPOINT}/requests/{request_id}"
    return {
        "request_id": request_id,
        "status_url": f"{response_url}/status",
        "response_url": response_url,
        "cancel_url": f"{response_url}/cancel",
    }


def lora_result(response_url: str) -> dict[str, dict[str, Any]]:
    """The result FAL gives for a finished LoRA training at ``response_url``."""
    files = f"{response_url}/files"
    return {
        "diffusers_lora_file": {
            "url": f"{files}/pytorch_lora_weights.safetensors",
            "content_type": "application/octet-stream",
            "file_name": "pytorch_lora_weights.safetensors",
            "file_size": 4096,
        },
        "config_file": {
            "url": f"{files}/config.json",
            "content_type": "application/json",
            "file_name": "config.json",
            "file_size": 300,
        },
    }


def training_row(
    sub: Mapping[str, str],
    i: int,
    *,
    now: float,
    finished: bool = False,
    next_check_at: float | None = None,
    submitted_ago: float = 3600.0,
) -> dict[str, Any]:
    """A trainings row as the daemon would hold it: running, or finished with a real result
    already verified (no delayed check, LoRA URL probed), so that it needs no more work."""
    submitted = now - submitted_ago
    row: dict[str, Any] = {
        "name": f"user{i:06d}",
        "training_type": "portrait",
        "endpoint": ENDPOINT,
        "request_id": sub["request_id"],
        "status_url": sub["status_url"],
        "response_url": sub["response_url"],
        "cancel_url": sub["cancel_url"],
        "input_json": json.dumps(
            {
                "images_data_url": f"https://example.invalid/bench/{i}.zip",
                "trigger_phrase": f"user{i:06d} person",
            }
        ),
        "status": "IN_PROGRESS",
        "progress": 50,
        "trigger_phrase": f"user{i:06d} person",
        "submitted_at": submitted,
        "started_at": submitted + 10,
        "next_check_at": next_check_at,
        "delayed_check_at": None,
        "deadline_at": now + 10 * 86400,
        "updated_at": now,
        "last_checked_at": now - 30,
    }
    if finished:
        output = lora_result(sub["response_url"])
        row.update(
            status="COMPLETED",
            progress=100,
            lora_url=output["diffusers_lora_file"]["url"],
            config_url=output["config_file"]["url"],
            result_json=json.dumps(output, sort_keys=True),
            result_layer="webhook",
            fal_completed_at=submitted + 600,
            completed_at=submitted + 601,
            next_check_at=None,
            lora_checked_at=now - 60,
            lora_available=True,
        )
    return row


def seed_database(db_path: Db, rows: Sequence[Mapping[str, Any]], *, events: bool = True) -> None:
    """Create the schema with the daemon's own migrations, then insert ``rows`` (and one
    "registered" event each, as the daemon would have written) in one transaction."""
    from trainguard.dialect import SqliteDialect
    from trainguard.store import Training, bound, migrate, open_database

    db = open_database(db_url(db_path))
    with bound(db):
        try:
            db.connect()
            migrate(db, SqliteDialect())
            with db.atomic():
                for start in range(0, len(rows), 400):
                    Training.insert_many(rows[start : start + 400]).execute()
            if events:
                with db.atomic():
                    db.execute_sql(
                        "INSERT INTO events (training_id, request_id, at, layer, kind, from_status, "
                        "to_status, detail) SELECT id, request_id, submitted_at, 'cli', 'registered', "
                        "NULL, 'SUBMITTED', NULL FROM trainings"
                    )
        finally:
            db.close()


def query(db_path: Db, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read-only SQL on the daemon's database (SQLite in WAL mode, or PostgreSQL: safe while
    the daemon runs); ``?`` placeholders on both."""
    if isinstance(db_path, str) and not db_path.startswith("sqlite:"):
        import psycopg

        with psycopg.connect(db_path, autocommit=True) as conn:
            return list(conn.execute(sql.replace("?", "%s"), args).fetchall())
    if isinstance(db_path, str):
        db_path = Path(db_path.removeprefix("sqlite:///"))
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as db:
        return db.execute(sql, args).fetchall()


def count_rows(db_path: Db, table_where: str, *args: Any) -> int:
    """``SELECT COUNT(*) FROM {table_where}`` on the daemon's database (read-only)."""
    return int(query(db_path, f"SELECT COUNT(*) FROM {table_where}", *args)[0][0])


# -- profiling (optional: py-spy is not a project dependency) ------------------------------
def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH."""
    import shutil

    beside = Path(PYTHON).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_profile(
    children: Children, pid: int, seconds: float, out: Path
) -> subprocess.Popen[bytes] | None:
    """Sample ``pid`` with py-spy for ``seconds`` into collapsed stacks at ``out``; only the
    thread holding the GIL is sampled, so the shares are shares of the one GIL."""
    exe = py_spy()
    if exe is None:
        say("py-spy not found: no profile (pip install py-spy into the venv to get one)")
        return None
    args = [exe, "record", "--gil", "--nonblocking", "--format", "raw", "--rate", "100"]
    args += ["--duration", str(int(seconds)), "--output", str(out), "--pid", str(pid)]
    return children.spawn(args, out.stem)


def profile_rows(path: Path, top: int) -> list[dict[str, Any]]:
    """``profile_summary`` as JSON rows (percentages rounded to 0.1)."""
    return [
        {"inclusive_pct": round(i, 1), "self_pct": round(o, 1), "frame": frame}
        for i, o, frame in profile_summary(path, top)
    ]


def print_profile(rows: Iterable[Mapping[str, Any]]) -> None:
    """The rows of ``profile_rows``, one a line: inclusive %, self %, frame."""
    for row in rows:
        print(f"    {row['inclusive_pct']:5.1f} {row['self_pct']:5.1f}  {row['frame']}")


def profile_summary(path: Path, top: int = 30) -> list[tuple[float, float, str]]:
    """(inclusive %, self %, frame) of the hottest frames of a collapsed-stack profile."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    ranked = sorted(inclusive, key=lambda f: inclusive[f], reverse=True)[:top]
    return [(100 * inclusive[f] / total, 100 * own.get(f, 0) / total, f) for f in ranked]


# -- other people's load on this machine ------------------------------------------------------
def _busy_jiffies() -> int:
    """CPU time spent by the whole machine (all cores, not idle or iowait), in jiffies."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


#: Processes this benchmark started that are not its children (a PostgreSQL server, which
#: daemonizes): their CPU is the benchmark's own, never "other processes'".
_OWN_ROOTS: set[int] = set()


def _stat(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        raw = f.read()
    return raw[raw.rindex(")") + 2 :].split()


def _tree_jiffies(root: int, listing: list[str] | None = None) -> int:
    """CPU time of ``root``, of its children already waited for, and of its live children
    (and their waited-for children), in jiffies."""

    def cpu(fields: list[str]) -> int:
        return sum(int(x) for x in fields[11:15])  # utime stime cutime cstime

    try:
        total = cpu(_stat(root))
    except (OSError, ValueError):
        return 0
    for entry in listing if listing is not None else os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == root:
            continue
        try:
            fields = _stat(entry)
        except (OSError, ValueError):
            continue
        if int(fields[1]) == root:
            total += cpu(fields)
    return total


def _own_jiffies() -> int:
    """CPU time of this process and its children (``_tree_jiffies``), and of the trees of
    ``_OWN_ROOTS``, in jiffies."""
    listing = os.listdir("/proc")
    return sum(_tree_jiffies(root, listing) for root in (os.getpid(), *_OWN_ROOTS))


class ForeignLoad:
    """How many cores processes that are not this benchmark's kept busy over a window
    (other people's tests on a shared machine skew every figure; this says by how much)."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._t = time.monotonic()
        self._busy = _busy_jiffies()
        self._own = _own_jiffies()

    def cores(self) -> float:
        wall = time.monotonic() - self._t
        busy, own = _busy_jiffies() - self._busy, _own_jiffies() - self._own
        return max(0.0, (busy - own) / CLK_TCK / wall) if wall > 0 else 0.0


async def wait_quiet(limit: float = 0.25, patience: float | None = None) -> float:
    """Wait (at most ``patience`` s, default $BENCH_QUIET_PATIENCE or 30) until other
    processes use under ``limit`` cores over 2 s; returns the last reading. A busy shared
    machine is reported, never a reason to fail."""
    if patience is None:
        patience = float(os.environ.get("BENCH_QUIET_PATIENCE", "30"))
    deadline = time.monotonic() + patience
    said = False
    while True:
        meter = ForeignLoad()
        await trio.sleep(2.0)
        load = meter.cores()
        if load < limit or time.monotonic() > deadline:
            if said or load >= limit:
                say(f"other processes now use {load:.2f} cores")
            return load
        if not said:
            say(f"other processes use {load:.2f} cores; waiting up to {patience:.0f} s for quiet")
            said = True
