"""An open-loop, fixed-rate HTTP load generator (wrk2's idea, for latency at a set rate).

Request ``i`` is due at ``start + i / rate`` whatever happened to the ones before it, and its
latency is measured from that due time (so a stall shows up in the latency instead of lowering
the rate: no coordinated omission). Requests go over a pool of keep-alive HTTP/1.1 connections
on raw trio sockets; each is one line of a pre-signed file::

    request_id <TAB> user_id <TAB> timestamp <TAB> signature <TAB> body

Prints one JSON object: count, errors, achieved rate and latency percentiles in milliseconds.
Run: ``python bench/_loadgen.py --url http://127.0.0.1:PORT/fal/webhook --file F --rate 200
--duration 15``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from urllib.parse import urlsplit

import trio


def load_requests(path: str, host: str, target: str, limit: int) -> list[bytes]:
    out: list[bytes] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) >= limit:
                break
            rid, uid, ts, sig, body = line.rstrip("\n").split("\t", 4)
            raw = body.encode()
            head = (
                f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(raw)}\r\nX-Fal-Webhook-Request-Id: {rid}\r\n"
                f"X-Fal-Webhook-User-Id: {uid}\r\nX-Fal-Webhook-Timestamp: {ts}\r\n"
                f"X-Fal-Webhook-Signature: {sig}\r\n\r\n"
            )
            out.append(head.encode() + raw)
    return out


class Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def exchange(self, request: bytes) -> int:
        """Send one request, read one response; returns the status code."""
        await self.stream.send_all(request)
        while b"\r\n\r\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("closed by the server mid-body")
            rest += chunk
        self.buffer = rest[length:]
        return status


async def run(args: argparse.Namespace) -> dict[str, float | int | dict[str, int]]:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    total = math.ceil(args.rate * args.duration)
    requests = load_requests(args.file, f"{host}:{port}", parts.path or "/", total)
    if len(requests) < total:
        raise SystemExit(f"{args.file} holds {len(requests)} requests; {total} needed")
    idle: list[Connection] = []
    free = trio.Semaphore(args.connections)
    latencies: list[float] = []
    service: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0

    async def one(i: int, due: float) -> None:
        nonlocal errors
        async with free:
            conn = idle.pop() if idle else None
            sent = trio.current_time()
            try:
                with trio.fail_after(args.timeout):
                    for fresh in (conn is None, True):  # a kept-alive one may have been closed
                        if fresh:
                            conn = Connection(await trio.open_tcp_stream(host, port))
                        assert conn is not None
                        try:
                            sent = trio.current_time()
                            status = await conn.exchange(requests[i])
                            break
                        except (OSError, ConnectionError):
                            await conn.stream.aclose()
                            if fresh:
                                raise
            except (OSError, ConnectionError, trio.TooSlowError, ValueError, IndexError):
                errors += 1
                if conn is not None:
                    await conn.stream.aclose()
                return
            done = trio.current_time()
            latencies.append(done - due)
            service.append(done - sent)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            idle.append(conn)

    start = trio.current_time() + 0.2
    async with trio.open_nursery() as nursery:
        for i in range(total):
            due = start + i / args.rate
            await trio.sleep_until(due)
            nursery.start_soon(one, i, due)
    elapsed = trio.current_time() - start
    for conn in idle:
        await conn.stream.aclose()

    def pct(values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {
        "offered_rate": args.rate,
        "sent": total,
        "completed": len(latencies),
        "errors": errors,
        "statuses": statuses,
        "achieved_rate": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 50),
        "p90_ms": pct(latencies, 90),
        "p99_ms": pct(latencies, 99),
        "max_ms": pct(latencies, 100),
        "service_p50_ms": pct(service, 50),
        "service_p99_ms": pct(service, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--file", required=True, help="pre-signed requests, one per line")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds")
    parser.add_argument("--connections", type=int, default=32, help="at most this many")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    args = parser.parse_args()
    result = trio.run(run, args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
