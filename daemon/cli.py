"""`trainguard run | demo | simulate | submit | track | cancel | recheck | check | plugins |
instances`.

Exit statuses: 0 success; 1 a failure of the operation (FAL refused a submit, a finished
training lacks a guaranteed field, a listener could not start); 2 bad configuration or bad
arguments. Bad input gets one clear line on stderr, never a traceback (set
``TRAINGUARD_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from trainguard import __version__, actions, config, logs
from trainguard.config import ConfigError, Settings
from trainguard.errors import EXIT_FAILURE, CliError
from trainguard.reconcile import Reconciler, view_as_dict
from trainguard.store import TrainingView

EXIT_CONFIG = 2

T = TypeVar("T")


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _run(async_fn: Callable[[], Awaitable[T]]) -> T:
    """``trio.run``, re-raising a lone exception itself rather than wrapped in the exception
    groups of the nurseries it crossed, so that ``except FalRequestError`` and the like match."""
    try:
        return trio.run(async_fn)
    except BaseExceptionGroup as group:
        leaf = _leaf(group)
        if leaf is group:
            raise
        raise leaf from leaf.__cause__


def _settings(args: argparse.Namespace) -> Settings:
    settings = config.load(args.config)
    logs.configure(
        args.log_level or settings.log["level"],
        stream=sys.stderr if args.command != "run" else None,
        secrets=settings.secrets,
    )
    return settings


# -- run ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from trainguard.supervisor import Daemon, StartError

    settings = _settings(args)
    daemon = Daemon(settings, handle_signals=True, config_path=args.config)
    log = logs.get_logger()
    log.info(
        "trainguard starting",
        version=__version__,
        config=settings.source,
        database=config.redact_url(settings.database["url"]),
        fal_key="set" if settings.fal_key else "missing",
    )
    if not settings.fal_key:
        log.warning(f"{logs.WARN} FAL_KEY is not set: FAL will refuse status checks")
    try:
        trio.run(daemon.run)
    except StartError as exc:
        cause = exc.__cause__
        bad_config = cause is not None and isinstance(_leaf(cause), ConfigError)
        raise CliError(f"cannot start: {exc}", EXIT_CONFIG if bad_config else EXIT_FAILURE) from exc
    return 0


# -- submit / track ----------------------------------------------------------------------
def _extra_arguments(items: Sequence[str] | None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--arg {item!r}: expected KEY=VALUE", EXIT_CONFIG)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, float) and not math.isfinite(value):  # NaN, Infinity, 1e999
            raise CliError(
                f"--arg {item!r}: not a finite number (JSON has no NaN or Infinity)", EXIT_CONFIG
            )
        extra[key] = value
    return extra


@asynccontextmanager
async def _reconciler(settings: Settings) -> AsyncIterator[Reconciler]:
    from trainguard.plugins.manager import (
        HookRunner,
        build_manager,
        collect_layers,
        outbox_collector,
    )
    from trainguard.store import open_store

    pm = build_manager()
    collect_layers(pm, settings)  # plugins learn the settings, as in the daemon
    async with open_store(settings.database["url"]) as store:
        yield Reconciler(store, settings, hooks=HookRunner(pm), outbox=outbox_collector(pm))


def cmd_submit(args: argparse.Namespace) -> int:
    from trainguard.fal import FalRequestError

    settings = _settings(args)
    arguments = actions.training_arguments(
        settings, args.type, args.images_url, args.trigger, _extra_arguments(args.arg)
    )

    async def submit() -> TrainingView:
        async with actions.fal_client(settings) as fal, _reconciler(settings) as reconciler:
            return await actions.submit(
                settings,
                fal,
                reconciler,
                training_type=args.type,
                name=args.name,
                arguments=arguments,
                trigger=args.trigger,
            )

    try:
        view = _run(submit)
    except actions.MissingInput as exc:  # nothing was sent: a bad argument
        raise CliError(f"{exc} (--arg KEY=VALUE)", EXIT_CONFIG) from exc
    except FalRequestError as exc:
        hint = "" if settings.fal_key else " (FAL_KEY is not set)"
        raise CliError(f"FAL refused the submit: {exc}{hint}") from exc
    except actions.NotRecorded as exc:
        raise CliError(
            f"{exc}; adopt it with: trainguard track {exc.request_id} --type {args.type} --name {args.name}"
        ) from exc
    _print_training(view, args.json)
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def track() -> TrainingView:
        async with _reconciler(settings) as reconciler:
            return await actions.track(
                settings,
                reconciler,
                request_id=args.request_id,
                training_type=args.type,
                name=args.name,
                trigger=args.trigger,
            )

    try:
        view = _run(track)
    except ConfigError:  # an unknown --type: a bad argument (exit 2), not a failed track
        raise
    except actions.BadRequestId as exc:  # a bad argument too
        raise CliError(str(exc), EXIT_CONFIG) from exc
    except ValueError as exc:  # a malformed endpoint or request id; AlreadyTracked
        raise CliError(str(exc)) from exc
    _print_training(view, args.json)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def cancel() -> TrainingView:
        async with actions.fal_client(settings) as fal, _reconciler(settings) as reconciler:
            return await actions.cancel(settings, fal, reconciler, args.request_id)

    try:
        view = _run(cancel)
    except (actions.NotFound, actions.Conflict, actions.Unavailable) as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps({**view_as_dict(view), "cancel": "requested"}, ensure_ascii=False))
    else:
        print(
            f"{view.request_id}: cancel requested ({view.status}); FAL may still finish it, "
            "the training is watched until FAL shows the outcome"
        )
    return 0


def cmd_recheck(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def recheck() -> TrainingView:
        async with _reconciler(settings) as reconciler:
            return await actions.recheck(reconciler, args.request_id)

    try:
        view = _run(recheck)
    except (actions.NotFound, actions.Conflict) as exc:
        raise CliError(str(exc)) from exc
    _print_training(view, args.json)
    return 0


def _print_training(view: TrainingView, as_json: bool) -> None:
    print(json.dumps(view_as_dict(view), ensure_ascii=False) if as_json else view.request_id)


# -- check -------------------------------------------------------------------------------
async def _load_rows(settings: Settings, status: str | None) -> list[dict[str, Any]]:
    from trainguard.store import fal_user_ids, open_store

    async with open_store(settings.database["url"]) as store:
        views = await store.trainings(status=status or None)
        files = await store.artifacts.by_request()
        users = await store.read(fal_user_ids)
    return [
        {
            **view_as_dict(v),
            "artifacts": files.get(v.request_id, []),
            "fal_user_id": users.get(v.request_id),
        }
        for v in views
    ]


def _files(artifacts: Sequence[dict[str, Any]]) -> str:
    """Per file ``KIND:STATE``: the sha256 prefix once stored, else ``pending`` (being
    retried) or ``failed`` (given up); ``-`` for a training without files."""
    cells = []
    for a in artifacts:
        state = a["sha256"][:12] if a["stored"] else "failed" if a["given_up"] else "pending"
        cells.append(f"{a['kind']}:{state}")
    return " ".join(cells) or "-"


def _age(iso: str | None) -> str:
    if not iso:
        return "-"
    from datetime import datetime

    seconds = time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(0, seconds):.0f}s"


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = (
        "NAME",
        "TYPE",
        "STATUS",
        "PROG",
        "TRIGGER",
        "RESULT",
        "FALLBACK",
        "BY",
        "FILES",
        "AGE",
    )
    lines = []
    for r in rows:
        result = r["lora_url"] or r["finetune_id"] or "-"
        if len(result) > 48:
            result = "…" + result[-47:]
        fallback = f"yes ({r['fallback_layer']})" if r["is_fallback"] else "no"
        missing = f" MISSING {','.join(r['missing_fields'])}" if r["missing_fields"] else ""
        lines.append(
            (
                r["name"],
                r["training_type"],
                r["status"] + missing,
                f"{r['progress']}%",
                r["trigger_phrase"] or "-",
                result,
                fallback,
                r["result_layer"] or "-",
                _files(r["artifacts"]),
                _age(r["submitted_at"]),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row) for row in (headers, *lines))


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = trio.run(_load_rows, settings, args.status)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        print(render_table(rows) if rows else "no trainings")
    incomplete = [r for r in rows if r["missing_fields"]]
    if incomplete and not args.json:
        print(f"{len(incomplete)} finished training(s) lack a guaranteed field", file=sys.stderr)
    return EXIT_FAILURE if incomplete else 0


# -- plugins -----------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    from trainguard.plugins.manager import build_manager, collect_layers

    settings = _settings(args)
    entries = collect_layers(build_manager(), settings)
    rows = [
        {
            "layer": e.layer.name,
            "enabled": settings.layer(e.layer.name).enabled,
            "plugin": e.plugin,
            "source": e.source,
        }
        for e in entries
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            state = "enabled " if r["enabled"] else "disabled"
            print(f"{r['layer']:<14} {state}  {r['source']:<24} {r['plugin']}")
    return 0


# -- instances ---------------------------------------------------------------------------
async def _load_instances(settings: Settings) -> list[dict[str, Any]]:
    from trainguard.cluster import instance_as_dict, live_instances
    from trainguard.store import open_store

    async with open_store(settings.database["url"]) as store:
        return [instance_as_dict(row) for row in await live_instances(store, settings)]


def cmd_instances(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = trio.run(_load_instances, settings)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    if not rows:
        print("no live instances")
        return 0
    headers = ("ID", "HOST", "PID", "VERSION", "STARTED", "HEARTBEAT", "ROLES", "METRICS")
    lines = [
        (
            r["id"],
            r["host"],
            str(r["pid"]),
            r["version"],
            _age(r["started_at"]),
            _age(r["heartbeat_at"]),
            ",".join(r["roles"]) or "-",
            r["metrics_listen"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(headers, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print("\n".join(fmt.format(*row).rstrip() for row in (headers, *lines)))
    return 0


# -- simulate / demo ---------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    from trainguard.testing import simulator

    logs.configure(args.log_level or "info", stream=sys.stderr)
    trio.run(simulator.run_from_args, args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trainguard.testing import demo

    return demo.main(args)


# -- parser ------------------------------------------------------------------------------
#: The tools beside the daemon; their modules are imported only when one of them is asked for,
#: so that ``trainguard run`` and the other commands never load the simulator or the demo.
TOOLS = ("simulate", "demo")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; a tool's own arguments are added only when ``command`` is that tool."""
    parser = argparse.ArgumentParser(
        prog="trainguard",
        description="Guards FAL AI trainings until their real result is stored.",
    )
    parser.add_argument("--version", action="version", version=f"trainguard {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        help="config file (default: $TRAINGUARD_CONFIG, else ./config.toml, else built-in defaults)",
    )
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    add("run", cmd_run, "run the daemon (all enabled layers) until SIGTERM")

    p = add("submit", cmd_submit, "submit a training to FAL and record it")
    p.add_argument("--type", required=True, help="training type (a [training_types.NAME])")
    p.add_argument("--name", required=True, help="whose training this is (e.g. the user)")
    p.add_argument("--images-url", required=True, help="URL of the zip of training images")
    p.add_argument("--trigger", help="trigger phrase")
    p.add_argument(
        "--arg",
        action="append",
        metavar="KEY=VALUE",
        help="an extra model input field (repeatable); VALUE is read as JSON when it parses"
        " (200, true, [1,2], {...}), else taken as a string; wins over the type's arguments",
    )
    p.add_argument("--json", action="store_true", help="print the recorded training as JSON")

    p = add("track", cmd_track, "adopt a request that was submitted elsewhere")
    p.add_argument("request_id")
    p.add_argument("--type", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--trigger")
    p.add_argument("--json", action="store_true")

    p = add(
        "cancel",
        cmd_cancel,
        "ask FAL to cancel a training (CANCELLED once FAL shows it will not finish)",
    )
    p.add_argument("request_id")
    p.add_argument("--json", action="store_true")

    p = add("recheck", cmd_recheck, "have the running daemon check a training with FAL now")
    p.add_argument("request_id")
    p.add_argument("--json", action="store_true")

    p = add("check", cmd_check, "list every training; exit 1 if a finished one lacks a field")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per training")
    p.add_argument(
        "--status",
        choices=("SUBMITTED", "IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"),
    )

    p = add("plugins", cmd_plugins, "list the loaded layers and where they come from")
    p.add_argument("--json", action="store_true")

    p = add(
        "instances",
        cmd_instances,
        "list the live trainguard instances on the database and the leader roles each holds",
    )
    p.add_argument("--json", action="store_true", help="a JSON list, one object per instance")

    p = add("simulate", cmd_simulate, "serve a FAL-compatible queue on loopback")
    if command == "simulate":
        from trainguard.testing import simulator

        simulator.add_arguments(p)

    p = add("demo", cmd_demo, "simulator + daemon + faults on loopback, ending with a table")
    if command == "demo":
        from trainguard.testing import demo

        demo.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in words if not word.startswith("-")), None)
    parser = build_parser(command if command in TOOLS else None)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except BaseException as raw:  # one clear line, never a traceback
        exc = _leaf(raw)
        if isinstance(exc, SystemExit | KeyboardInterrupt):
            raise exc from None
        if os.environ.get("TRAINGUARD_DEBUG"):
            raise
        if isinstance(exc, ConfigError):
            print(f"trainguard: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(exc, CliError):
            print(f"trainguard: {exc}", file=sys.stderr)
            return exc.status
        print(f"trainguard: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
