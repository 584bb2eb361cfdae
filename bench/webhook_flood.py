"""Webhook flood: what garbage costs the genuine path, and what it leaves in the database.

Processes, all on loopback: the daemon (``python -m daemon run``, only the webhook layer),
a tiny JWKS server (``python -m http.server`` serving the public half of a key this script
signs with) and, in this process, the load. Two phases, each on a fresh database of
``--trainings`` IN_PROGRESS trainings:

1. **refused flood** (keys reachable): ``--flood-connections`` senders POST well-formed FAL
   webhooks of ``--flood-kib`` KiB signed with a foreign key (each refused, 401) as fast as
   they can for ``--duration`` s, while one sender delivers genuine signed webhooks at
   ``--rate`` per second (open loop: latency counted from each one's due time). The same
   genuine load runs first without the flood, as the baseline.
2. **forged flood, key server down** (the JWKS URL points at a closed port): the same flood
   of forged webhooks while no key can be fetched; what the daemon answered and how many
   bytes it kept unverified.

Printed: genuine-webhook latency p50/p99/max (ms) and statuses with and without the flood,
the flood's rate (requests/s, MB/s) and statuses, and what the database keeps: refused and
unverified rows and their body bytes, and the database file's size (with its WAL) before
and after. Figures, not pass/fail: a shared 2-core machine moves them.

Run: ``.venv/bin/python bench/webhook_flood.py [--duration 20] [--flood-kib 256]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from _common import (
    PYTHON,
    Children,
    ForeignLoad,
    daemon_args,
    fake_submission,
    free_port,
    lora_result,
    metrics,
    percentile,
    query,
    run_main,
    say,
    seed_database,
    training_row,
    wait_http,
    wait_quiet,
    write_config,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trainguard import signing

WEBHOOK_PATH = "/fal/webhook"
USER_ID = "bench-user"


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--rate", type=float, default=20.0, help="genuine webhooks per second")
    parser.add_argument("--flood-connections", type=int, default=8)
    parser.add_argument("--flood-kib", type=int, default=256, help="size of a flood body")
    parser.add_argument("--trainings", type=int, default=2000, help="seeded, one per webhook")


def body_for(request_id: str, response_url: str, padding: int = 0) -> bytes:
    payload: dict[str, Any] = lora_result(response_url)
    if padding:
        payload["padding"] = "p" * padding
    data = {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "OK",
        "payload": payload,
    }
    return json.dumps(data, separators=(",", ":")).encode()


def db_bytes(db_path: Path) -> int:
    return sum(p.stat().st_size for p in (db_path, Path(f"{db_path}-wal")) if p.exists())


async def genuine(
    url: str, subs: list[dict[str, str]], key: Ed25519PrivateKey, rate: float, duration: float
) -> dict[str, Any]:
    """Open loop at ``rate``: webhook ``i`` is due at ``start + i / rate``; its latency is
    measured from that time. Several in flight at once when answers are slow."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    count = min(len(subs), int(rate * duration))
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
        start = trio.current_time()

        async def one(i: int) -> None:
            due = start + i / rate
            await trio.sleep_until(due)
            sub = subs[i]
            body = body_for(sub["request_id"], sub["response_url"])
            headers = signing.sign_webhook(key, sub["request_id"], USER_ID, int(time.time()), body)
            try:
                reply = await client.post(url, content=body, headers=headers)
                status = str(reply.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            latencies.append(trio.current_time() - due)
            statuses[status] = statuses.get(status, 0) + 1

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    ms = [x * 1000 for x in latencies]
    return {
        "sent": count,
        "statuses": statuses,
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1) if ms else None,
    }


async def flood(
    url: str, subs: list[dict[str, str]], connections: int, kib: int, stop: trio.Event
) -> dict[str, Any]:
    """Forged webhooks (a foreign key's signatures), as fast as ``connections`` allow."""
    forger = Ed25519PrivateKey.generate()
    statuses: dict[str, int] = {}
    sent_bytes = 0
    started = trio.current_time()

    async def sender(n: int) -> None:
        nonlocal sent_bytes
        sub = subs[n % len(subs)]
        async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
            i = 0
            while not stop.is_set():
                i += 1
                body = body_for(sub["request_id"], f"{sub['response_url']}?{i}", kib * 1024)
                headers = signing.sign_webhook(
                    forger, sub["request_id"], USER_ID, int(time.time()), body
                )
                try:
                    reply = await client.post(url, content=body, headers=headers)
                    status = str(reply.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                statuses[status] = statuses.get(status, 0) + 1
                sent_bytes += len(body)

    async with trio.open_nursery() as nursery:
        for n in range(connections):
            nursery.start_soon(sender, n)
    wall = trio.current_time() - started
    total = sum(statuses.values())
    return {
        "requests": total,
        "statuses": statuses,
        "requests_per_second": round(total / wall, 1),
        "mb_per_second": round(sent_bytes / wall / 1e6, 2),
    }


def kept(db_path: Path) -> dict[str, Any]:
    rows = query(
        db_path,
        "SELECT verification, COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM webhook_receipts"
        " GROUP BY verification",
    )
    return {v: {"rows": n, "body_bytes": b} for v, n, b in rows}


async def phase(
    children: Children,
    workdir: Path,
    name: str,
    args: argparse.Namespace,
    key: Ed25519PrivateKey,
    jwks_url: str,
    *,
    baseline: bool,
) -> dict[str, Any]:
    now = time.time()
    subs = [fake_submission() for _ in range(args.trainings)]
    db_path = workdir / f"{name}.db"
    seed_database(db_path, [training_row(s, i, now=now) for i, s in enumerate(subs)], events=False)
    webhook_port, metrics_port = free_port(), free_port()
    config = write_config(
        workdir,
        db_path=db_path,
        queue_url="http://127.0.0.1:9",
        jwks_url=jwks_url,
        webhook_port=webhook_port,
        metrics_port=metrics_port,
        enabled=("webhook",),
        name=f"{name}.toml",
    )
    await wait_quiet()
    daemon = children.spawn(daemon_args(config), f"daemon-{name}")
    await wait_http(f"http://127.0.0.1:{metrics_port}/readyz", daemon)
    url = f"http://127.0.0.1:{webhook_port}{WEBHOOK_PATH}"
    figures: dict[str, Any] = {"db_bytes_before": db_bytes(db_path)}
    half = len(subs) // 2
    if baseline:
        say(f"{name}: genuine webhooks at {args.rate:g}/s, no flood")
        figures["genuine_alone"] = await genuine(
            url, subs[:half], key, args.rate, args.duration / 2
        )
        say(f"  {figures['genuine_alone']}")
    say(
        f"{name}: flood of {args.flood_connections} connections x {args.flood_kib} KiB forged"
        f" webhooks for {args.duration:g} s, genuine ones at {args.rate:g}/s"
    )
    stop = trio.Event()
    foreign = ForeignLoad()
    result: dict[str, Any] = {}

    async def run_flood() -> None:
        result["flood"] = await flood(
            url, subs[half:], args.flood_connections, args.flood_kib, stop
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_flood)
        await trio.sleep(1.0)  # the flood is on before the first genuine webhook
        figures["genuine_under_flood"] = await genuine(
            url, subs[half:], key, args.rate, args.duration
        )
        stop.set()
    figures["flood"] = result["flood"]
    figures["foreign_cores"] = round(foreign.cores(), 2)
    after = await metrics(metrics_port)
    figures["outcomes"] = {
        k.split('outcome="')[1].rstrip('"}'): v
        for k, v in after.items()
        if k.startswith("trainguard_webhooks_received_total{") and v
    }
    figures["evicted"] = {
        k.split('kind="')[1].rstrip('"}'): v
        for k, v in after.items()
        if k.startswith("trainguard_webhook_receipts_evicted_total{") and v
    }
    children.stop(daemon)
    figures["kept"] = kept(db_path)
    figures["db_bytes_after"] = db_bytes(db_path)
    say(f"  genuine under flood: {figures['genuine_under_flood']}")
    say(f"  flood: {figures['flood']}")
    say(f"  kept: {figures['kept']}; database {figures['db_bytes_after'] / 1e6:.1f} MB")
    return figures


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "command": (
            f"bench/webhook_flood.py --duration {args.duration:g} --rate {args.rate:g}"
            f" --flood-connections {args.flood_connections} --flood-kib {args.flood_kib}"
        )
    }
    private_key, jwk = signing.generate_keypair()
    jwks_dir = workdir / "jwks" / ".well-known"
    jwks_dir.mkdir(parents=True)
    (jwks_dir / "jwks.json").write_text(json.dumps(signing.jwks_document([jwk])))
    with Children(workdir) as children:
        jwks_port = free_port()
        server = children.spawn(
            [
                *(PYTHON, "-m", "http.server", str(jwks_port), "--bind", "127.0.0.1"),
                *("--directory", str(workdir / "jwks")),
            ],
            "jwks",
        )
        jwks_url = f"http://127.0.0.1:{jwks_port}/.well-known/jwks.json"
        await wait_http(jwks_url, server)
        figures["refused_flood"] = await phase(
            children, workdir, "refused", args, private_key, jwks_url, baseline=True
        )
        down = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"  # nothing listens
        figures["key_server_down"] = await phase(
            children, workdir, "keys-down", args, private_key, down, baseline=False
        )
    return figures


def report(figures: dict[str, Any]) -> None:
    print()
    print(f"command: {figures['command']}")
    for name in ("refused_flood", "key_server_down"):
        f = figures[name]
        print(f"== {name}")
        if "genuine_alone" in f:
            g = f["genuine_alone"]
            print(
                f"  genuine, no flood:   p50 {g['p50_ms']} ms  p99 {g['p99_ms']} ms  {g['statuses']}"
            )
        g = f["genuine_under_flood"]
        print(
            f"  genuine, under flood: p50 {g['p50_ms']} ms  p99 {g['p99_ms']} ms"
            f"  max {g['max_ms']} ms  {g['statuses']}"
        )
        fl = f["flood"]
        print(
            f"  flood: {fl['requests']} requests, {fl['requests_per_second']}/s,"
            f" {fl['mb_per_second']} MB/s, {fl['statuses']}"
        )
        print(f"  outcomes {f['outcomes']}  evicted {f['evicted']}")
        print(
            f"  kept {f['kept']}; database {f['db_bytes_before'] / 1e6:.1f} MB ->"
            f" {f['db_bytes_after'] / 1e6:.1f} MB; other processes {f['foreign_cores']} cores"
        )


if __name__ == "__main__":
    run_main(__doc__.split("\n\n")[0], options, bench, report, "trainguard-flood-")
