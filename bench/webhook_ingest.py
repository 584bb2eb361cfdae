"""Webhook ingest: verified, durably stored webhooks per second through the real listener,
as a ratio to the same hypercorn-on-trio stack answering 200 with no work (the ceiling).

Processes, all on loopback: the daemon (``python -m daemon run``, only the webhook layer
enabled, log level info as shipped), the ceiling server (``bench/_ceiling_server.py``, the
daemon's ``serve_asgi`` with an app that reads the body and answers 200), a tiny JWKS server
(``python -m http.server`` serving the public half of a key this script signs with), and the
load: ``wrk`` (closed loop, ``-t2 -c50``) with a Lua script cycling through pre-signed
requests, each a distinct FAL webhook for a distinct training that the database holds as
IN_PROGRESS, so every request is verified, stored, and applied as a real result; then
``bench/_loadgen.py`` (open loop, fixed 200 requests/s) for the latency at that rate.

Afterwards the database is read: every webhook answered 2xx must be a verified receipt there
and its training COMPLETED by the webhook layer. Also measured (diagnostic): the same listener
with ``[log] level = "warning"``, to show what per-webhook logging costs.

Targets (issue 4): listener/ceiling >= 0.8; p99 < 50 ms at 200 webhooks/s offered.

``--database`` picks the daemon's database: sqlite (the default, as before), postgresql (a
throwaway server, fsync on, as SQLite's synchronous=FULL; its CPU, the postmaster and every
backend, is reported beside the daemon's) or both: the ceiling once, then the listener on
each, with the ratios PostgreSQL / SQLite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import trio
from _common import (
    PYTHON,
    RATIOS_KEY,
    ROOT,
    Children,
    Databases,
    ForeignLoad,
    add_database_option,
    count_rows,
    cpu_seconds,
    daemon_args,
    database_kinds,
    fake_submission,
    free_port,
    lora_result,
    metrics,
    parse_args,
    print_profile,
    profile_rows,
    report_per_database,
    say,
    seed_database,
    start_profile,
    training_row,
    wait_http,
    wait_quiet,
    work_directory,
    write_config,
    write_json,
)

from trainguard import signing
from trainguard.testing.postgres import INSTALL_HINT, find_binaries

WEBHOOK_PATH = "/fal/webhook"
LUA = ROOT / "bench" / "_wrk_signed.lua"
USER_ID = "bench-user"


def webhook_body(sub: dict[str, str]) -> bytes:
    body = {
        "request_id": sub["request_id"],
        "gateway_request_id": sub["request_id"],
        "status": "OK",
        "payload": lora_result(sub["response_url"]),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def sign_file(path: Path, subs: list[dict[str, str]], private_key: Any) -> None:
    """One pre-signed webhook a line, timestamped now (valid for the 300 s tolerance)."""
    stamp = int(time.time())
    with path.open("w", encoding="utf-8") as f:
        for sub in subs:
            body = webhook_body(sub)
            h = signing.sign_webhook(private_key, sub["request_id"], USER_ID, stamp, body)
            f.write(
                f"{h[signing.HEADER_REQUEST_ID]}\t{USER_ID}\t{stamp}\t"
                f"{h[signing.HEADER_SIGNATURE]}\t{body.decode()}\n"
            )


async def run_wrk(
    url: str,
    file: Path,
    pid: int,
    args: argparse.Namespace,
    databases: Databases | None = None,
) -> dict[str, Any]:
    """One wrk run (``--threads``, ``--connections``, ``--duration`` from ``args``); its
    figures plus the server's CPU over the run (and the database server's, if any)."""
    await wait_quiet()
    foreign = ForeignLoad()
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    db0 = databases.server_cpu_seconds() if databases else 0.0
    result = await trio.run_process(
        [
            "wrk",
            f"-t{args.threads}",
            f"-c{args.connections}",
            f"-d{args.duration}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            url,
            "--",
            WEBHOOK_PATH,
            str(file),
            str(args.threads),
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    lines = result.stdout.decode().splitlines()
    data = next(json.loads(line[9:]) for line in lines if line.startswith("WRK_JSON "))
    ok = data["requests"] - data["status_errors"]
    data["ok_per_second"] = ok / (data["duration_us"] / 1e6)
    data["ok"] = ok
    data["server_cpu_share"] = cpu / wall  # of one core
    if databases is not None and databases.kind == "postgresql":  # SQLite: inside the daemon
        data["database_server_cpu_share"] = (databases.server_cpu_seconds() - db0) / wall
    data["foreign_cores"] = foreign.cores()
    return data


async def run_loadgen(url: str, file: Path, *, rate: float, duration: float) -> dict[str, Any]:
    await wait_quiet()
    foreign = ForeignLoad()
    result = await trio.run_process(
        [
            PYTHON,
            str(ROOT / "bench" / "_loadgen.py"),
            "--url",
            url,
            "--file",
            str(file),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
        ],
        capture_stdout=True,
    )
    data: dict[str, Any] = json.loads(result.stdout)
    data["foreign_cores"] = foreign.cores()
    return data


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    shared: dict[str, Any] = {
        "command": f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s (pre-signed, distinct webhooks); loadgen {args.rate}/s x {args.duration}s"
    }
    private_key, jwk = signing.generate_keypair()
    jwks_dir = workdir / "jwks" / ".well-known"
    jwks_dir.mkdir(parents=True)
    (jwks_dir / "jwks.json").write_text(json.dumps(signing.jwks_document([jwk])))
    per_kind: dict[str, Any] = {}
    with Children(workdir) as children:
        jwks_port = free_port()
        jwks = children.spawn(
            [
                PYTHON,
                "-m",
                "http.server",
                str(jwks_port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(workdir / "jwks"),
            ],
            "jwks",
        )
        jwks_url = f"http://127.0.0.1:{jwks_port}/.well-known/jwks.json"
        await wait_http(jwks_url, jwks)

        ceiling_port = free_port()
        ceiling = children.spawn(
            [
                PYTHON,
                str(ROOT / "bench" / "_ceiling_server.py"),
                "--listen",
                f"127.0.0.1:{ceiling_port}",
            ],
            "ceiling",
        )
        ceiling_url = f"http://127.0.0.1:{ceiling_port}{WEBHOOK_PATH}"
        await wait_http(ceiling_url, ceiling)
        for kind in database_kinds(args.database):
            with Databases(kind, workdir) as databases:
                per_kind[kind] = await listener_runs(
                    children,
                    databases,
                    args,
                    workdir,
                    shared,
                    jwks_url=jwks_url,
                    private_key=private_key,
                    ceiling=(ceiling_url, ceiling.pid),
                )
    if len(per_kind) == 1:
        return next(iter(per_kind.values()))
    lite, pg = per_kind["sqlite"], per_kind["postgresql"]
    return {
        **per_kind,
        RATIOS_KEY: {
            "listener_ok_per_second": pg["listener_wrk_log_info"]["ok_per_second"]
            / lite["listener_wrk_log_info"]["ok_per_second"],
            "p99_ms_at_fixed_rate": pg["listener_fixed_rate"]["p99_ms"]
            / lite["listener_fixed_rate"]["p99_ms"],
        },
    }


async def listener_runs(
    children: Children,
    databases: Databases,
    args: argparse.Namespace,
    workdir: Path,
    shared: dict[str, Any],
    *,
    jwks_url: str,
    private_key: Any,
    ceiling: tuple[str, int],
) -> dict[str, Any]:
    """The real listener on one kind of database (and the ceiling the first time, kept in
    ``shared``); the figures of this database, with the ceiling's."""
    kind = databases.kind
    ceiling_url, ceiling_pid = ceiling
    n_load = int(args.rate * args.duration) + 10
    runs = ["info", "warning"] if args.quiet_logs_too else ["info"]
    subs = {
        level: (
            [fake_submission() for _ in range(args.requests)],
            [fake_submission() for _ in range(n_load)],
        )
        for level in runs
    }
    now = time.time()
    rows = [
        training_row(sub, i, now=now)
        for i, sub in enumerate(s for level in runs for part in subs[level] for s in part)
    ]
    db_path = databases.fresh("trainguard")
    say(f"seeding {len(rows)} IN_PROGRESS trainings on {kind} (one per webhook to be sent)")
    seed_database(db_path, rows, events=False)
    figures: dict[str, Any] = {"database": kind}
    for level in runs:
        wrk_subs, load_subs = subs[level]
        webhook_port, metrics_port = free_port(), free_port()
        config = write_config(
            workdir,
            db_path=db_path,
            queue_url="http://127.0.0.1:9",
            jwks_url=jwks_url,
            webhook_port=webhook_port,
            metrics_port=metrics_port,
            enabled=("webhook",),
            log_level=level,
            name=f"config-{kind}-{level}.toml",
        )
        daemon = children.spawn(daemon_args(config), f"daemon-{kind}-{level}")
        await wait_http(f"http://127.0.0.1:{metrics_port}/readyz", daemon)
        url = f"http://127.0.0.1:{webhook_port}{WEBHOOK_PATH}"
        say(f"daemon (webhook layer only, log level {level}, {kind}) ready on {url}")

        wrk_file = workdir / f"wrk-{kind}-{level}.txt"
        load_file = workdir / f"load-{kind}-{level}.txt"
        say(f"pre-signing {len(wrk_subs) + len(load_subs)} webhooks")
        sign_file(wrk_file, wrk_subs, private_key)
        sign_file(load_file, load_subs, private_key)

        if level == "info" and "ceiling_wrk" not in shared:
            say(f"wrk against the ceiling for {args.duration} s")
            shared["ceiling_wrk"] = await run_wrk(ceiling_url, wrk_file, ceiling_pid, args)
            say(f"  ceiling: {shared['ceiling_wrk']['ok_per_second']:.0f} requests/s")

        before = await metrics(metrics_port)
        say(f"wrk against the real listener (log level {level}) for {args.duration} s")
        profile = workdir / f"profile-{level}.txt"
        spy = (
            start_profile(children, daemon.pid, args.duration - 1, profile)
            if args.profile
            else None
        )
        real = await run_wrk(url, wrk_file, daemon.pid, args, databases)
        await trio.sleep(1.0)  # let requests still in flight when wrk stopped finish
        if spy is not None:
            spy.wait(30)
            figures[f"profile_log_{level}"] = profile_rows(profile, args.profile_top)
            say(f"  profile (py-spy, collapsed stacks) in {profile}")
        after = await metrics(metrics_port)
        outcomes = {
            key.split('outcome="')[1].rstrip('"}'): after[key] - before.get(key, 0.0)
            for key in after
            if key.startswith("trainguard_webhooks_received_total{")
            and after[key] - before.get(key, 0.0)
        }
        real["outcomes"] = outcomes
        commits = after["trainguard_db_commits_total"] - before["trainguard_db_commits_total"]
        written = (
            after["trainguard_db_commit_batch_size_sum"]
            - before["trainguard_db_commit_batch_size_sum"]
        )
        real["db_commits"] = commits
        real["mean_rows_per_commit"] = written / commits if commits else 0.0
        figures[f"listener_wrk_log_{level}"] = real
        say(
            f"  listener: {real['ok_per_second']:.0f} requests/s; outcomes {outcomes}; "
            f"{real['mean_rows_per_commit']:.1f} writes per commit"
        )
        if outcomes.get("duplicate"):
            say(
                f"  NOTE: {outcomes['duplicate']:.0f} duplicates: wrk ran out of distinct "
                "webhooks (raise --requests)"
            )

        if level == "info" and "ceiling_fixed_rate" not in shared:
            say(f"open-loop {args.rate:.0f} requests/s against the ceiling")
            shared["ceiling_fixed_rate"] = await run_loadgen(
                ceiling_url, load_file, rate=args.rate, duration=args.duration
            )
            say(f"  ceiling p99 {shared['ceiling_fixed_rate']['p99_ms']:.1f} ms")
        if level == "info":
            say(f"open-loop {args.rate:.0f} requests/s against the real listener")
            fixed = await run_loadgen(url, load_file, rate=args.rate, duration=args.duration)
            figures["listener_fixed_rate"] = fixed
            say(f"  listener p99 {fixed['p99_ms']:.1f} ms, {fixed['statuses']}")
        await trio.sleep(0.5)
        children.stop(daemon)

        sent = {s["request_id"] for s in wrk_subs}
        if level == "info":
            sent |= {s["request_id"] for s in load_subs}
        stored = count_rows(db_path, "webhook_receipts WHERE verification = 'verified'")
        completed = count_rows(
            db_path, "trainings WHERE status = 'COMPLETED' AND result_layer = 'webhook'"
        )
        figures[f"db_after_log_{level}"] = {
            "verified_receipts_total": stored,
            "trainings_completed_by_webhook_total": completed,
        }

    figures = {**shared, **figures}
    info = figures["listener_wrk_log_info"]
    ceiling_ok = figures["ceiling_wrk"]["ok_per_second"]
    figures["ratio_listener_to_ceiling"] = info["ok_per_second"] / ceiling_ok
    if "listener_wrk_log_warning" in figures:
        figures["ratio_listener_quiet_logs_to_ceiling"] = (
            figures["listener_wrk_log_warning"]["ok_per_second"] / ceiling_ok
        )
    figures["targets"] = {
        "ratio_listener_to_ceiling_at_least": 0.8,
        "ratio_met": figures["ratio_listener_to_ceiling"] >= 0.8,
        "p99_ms_at_fixed_rate_below": 50.0,
        "p99_met": figures["listener_fixed_rate"]["p99_ms"] < 50.0,
    }
    answered_ok = info["ok"] + figures["listener_fixed_rate"]["statuses"].get("200", 0)
    figures["answered_2xx_log_info"] = answered_ok
    db = figures["db_after_log_info"]
    figures["all_2xx_stored"] = db["verified_receipts_total"] >= answered_ok and (
        db["trainings_completed_by_webhook_total"] >= answered_ok
    )
    return figures


def report(f: dict[str, Any]) -> None:
    r = report_per_database(f, report_one)
    if r is None:
        return
    print()
    print(
        f"webhook ingest, PostgreSQL / SQLite: {r['listener_ok_per_second']:.2f} x the webhooks "
        f"per second; {r['p99_ms_at_fixed_rate']:.2f} x the p99 at the fixed rate"
    )


def report_one(f: dict[str, Any]) -> None:
    ceiling, real = f["ceiling_wrk"], f["listener_wrk_log_info"]
    print()
    print(f"webhook ingest on {f.get('database', 'sqlite')} (" + f["command"] + ")")
    print(
        f"  ceiling (serve_asgi, 200, no work)   {ceiling['ok_per_second']:8.0f} req/s   "
        f"wrk p99 {ceiling['latency_p99_us'] / 1000:6.1f} ms   server CPU {ceiling['server_cpu_share']:.0%} of a core"
    )
    print(
        f"  real listener (verify+store+apply)   {real['ok_per_second']:8.0f} req/s   "
        f"wrk p99 {real['latency_p99_us'] / 1000:6.1f} ms   daemon CPU {real['server_cpu_share']:.0%} of a core"
        + (
            f", database server {real['database_server_cpu_share']:.0%}"
            if "database_server_cpu_share" in real
            else ""
        )
    )
    print(
        f"  ratio listener/ceiling               {f['ratio_listener_to_ceiling']:8.2f}          (target >= 0.80)"
    )
    if "listener_wrk_log_warning" in f:
        quiet = f["listener_wrk_log_warning"]
        print(
            f"  diagnostic: same, log level warning  {quiet['ok_per_second']:8.0f} req/s   "
            f"ratio {f['ratio_listener_quiet_logs_to_ceiling']:.2f}"
        )
    fixed, cfixed = f["listener_fixed_rate"], f["ceiling_fixed_rate"]
    print(
        f"  at {fixed['offered_rate']:.0f}/s offered: listener p50 {fixed['p50_ms']:.1f} ms, "
        f"p99 {fixed['p99_ms']:.1f} ms, max {fixed['max_ms']:.1f} ms (target p99 < 50 ms); "
        f"ceiling p99 {cfixed['p99_ms']:.1f} ms; errors {fixed['errors']}"
    )
    for key in ("profile_log_info", "profile_log_warning"):
        if key in f:
            print(f"  {key}: inclusive% self% frame")
            print_profile(f[key])
    db = f["db_after_log_info"]
    print(
        f"  database afterwards: {db['verified_receipts_total']} verified receipts, "
        f"{db['trainings_completed_by_webhook_total']} trainings completed by the webhook; "
        f"{f['answered_2xx_log_info']} answered 2xx -> all stored: {f['all_2xx_stored']}"
    )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk/loadgen run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rate", type=float, default=200.0, help="fixed rate for the p99 run")
    parser.add_argument(
        "--requests", type=int, default=40_000, help="distinct pre-signed webhooks for wrk"
    )
    parser.add_argument(
        "--no-quiet-logs",
        dest="quiet_logs_too",
        action="store_false",
        help="skip the diagnostic run with log level warning",
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample the daemon with py-spy during wrk"
    )
    parser.add_argument("--profile-top", type=int, default=40, help="frames to list")
    add_database_option(parser)


def main() -> None:
    args = parse_args(__doc__, options, keep_what="logs, database")
    if shutil.which("wrk") is None:
        print("webhook_ingest SKIPPED: wrk is not installed (Debian: apt-get install -y wrk)")
        write_json(args.out, {"skipped": "wrk is not installed"})
        return
    if args.database != "sqlite" and find_binaries() is None:
        print(f"webhook_ingest SKIPPED: {INSTALL_HINT}")
        write_json(args.out, {"skipped": "PostgreSQL's server binaries are not installed"})
        return
    with work_directory(args.keep, "bench-webhook-") as workdir:
        try:
            figures = trio.run(bench, args, workdir)
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            raise SystemExit(f"webhook_ingest failed: {exc}; logs in {workdir}") from exc
    report(figures)
    write_json(args.out, figures)


if __name__ == "__main__":
    main()
