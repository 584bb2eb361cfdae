"""`python -m daemon ...` as an operator runs it: a subprocess in its own directory, with a
config file there pointing at a temporary database, and no ``$TRAINGUARD_CONFIG`` unless the
test is about it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from trainguard import __version__, actions, config, signing
from trainguard.config import BUILTIN_LAYERS
from trainguard.reconcile import Kind, Observation, Reconciler
from trainguard.store import open_store
from trainguard.testing.demo import free_port
from trainguard.testing.simulator import Simulator

COMMANDS = (
    "run",
    "demo",
    "simulate",
    "submit",
    "track",
    "cancel",
    "recheck",
    "check",
    "plugins",
    "instances",
)
#: The keys of `check --json` that scripts and the bot depend on (design.md).
CONTRACT_KEYS = {
    "request_id",
    "name",
    "training_type",
    "status",
    "progress",
    "trigger_phrase",
    "lora_url",
    "config_url",
    "finetune_id",
    "is_fallback",
    "fallback_layer",
    "fallback_reason",
    "result_layer",
    "submitted_at",
    "completed_at",
}
STATUSES = {"SUBMITTED", "IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"}
FAL_KEY = "fal-key-5e1f-DISTINCTIVE-9c3b:secret-part-77aa"


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would steer the CLI, plus ``extra``."""
    steering = ("TRAINGUARD_CONFIG", "TRAINGUARD_DEBUG", "FAL_KEY", "NOTIFY_SOCKET")
    env = {k: v for k, v in os.environ.items() if k not in steering}
    env.update(extra)
    return env


def write_config(
    directory: Path,
    name: str = "config.toml",
    *,
    queue_url: str = "http://127.0.0.1:9",
    extra: str = "",
) -> Path:
    path = directory / name
    path.write_text(
        f'[database]\nurl = "sqlite:///{directory / "tg.db"}"\n'
        f'[fal]\nqueue_url = "{queue_url}"\n{extra}',
        encoding="utf-8",
    )
    return path


def cli(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainguard", *args],
        cwd=cwd,
        env=cli_env() if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def acli(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI run without blocking trio, so a simulator in the test's nursery keeps serving."""
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "trainguard", *args],
            cwd=cwd,
            env=cli_env() if env is None else dict(env),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def rows_of(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The trainings printed by ``check --json`` (exit 1 only flags incomplete ones)."""
    assert done.args[-2:] == ["check", "--json"]
    assert done.returncode in (0, 1), done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def one_clear_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (never a traceback)."""
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- help and version ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_command(tmp_path: Path, command: str) -> None:
    done = cli(tmp_path, command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: trainguard {command}")
    assert "--config" in done.stdout


def test_version(tmp_path: Path) -> None:
    done = cli(tmp_path, "--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"trainguard {__version__}")


# -- configuration --------------------------------------------------------------------------------
def disabled_layers(done: subprocess.CompletedProcess[str]) -> set[str]:
    assert done.returncode == 0, done.stderr
    return {row["layer"] for row in json.loads(done.stdout) if not row["enabled"]}


def test_config_resolution_order(tmp_path: Path) -> None:
    """--config beats $TRAINGUARD_CONFIG beats ./config.toml (each turns a different layer off)."""
    for name, layer in (
        ("config.toml", "emergency"),
        ("env.toml", "delayed"),
        ("cli.toml", "poller"),
    ):
        write_config(tmp_path, name, extra=f"[layers.{layer}]\nenabled = false\n")
    from_env = cli_env(TRAINGUARD_CONFIG=str(tmp_path / "env.toml"))

    assert disabled_layers(cli(tmp_path, "plugins", "--json")) == {"emergency"}
    assert disabled_layers(cli(tmp_path, "plugins", "--json", env=from_env)) == {"delayed"}
    both = cli(tmp_path, "plugins", "--json", "--config", "cli.toml", env=from_env)
    assert disabled_layers(both) == {"poller"}


@pytest.mark.parametrize("via", ["--config", "TRAINGUARD_CONFIG"])
def test_an_explicit_missing_config_file_is_exit_2(tmp_path: Path, via: str) -> None:
    write_config(tmp_path)  # ./config.toml exists, but was not what was asked for
    missing = str(tmp_path / "nowhere.toml")
    if via == "--config":
        done = cli(tmp_path, "check", "--config", missing)
    else:
        done = cli(tmp_path, "check", env=cli_env(TRAINGUARD_CONFIG=missing))
    assert done.returncode == 2
    assert (
        one_clear_line(done) == f"trainguard: configuration error: {missing}: config file not found"
    )
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[fal]\nretries = 2\nretries = 3\n", "not valid TOML"),
        ('[fal]\nqueue_url = "http://127.0.0.1:9"\nretry = 3\n', "fal.retry: unknown key"),
        ('[fal]\nretries = "three"\n', "fal.retries: must be an integer"),
        ("[layers.poller]\ninterval_seconds = true\n", "layers.poller.interval_seconds"),
        ('[metrics]\nlisten = "nowhere"\n', "metrics.listen"),
    ],
)
@pytest.mark.parametrize("command", ["run", "check"])
def test_a_broken_config_is_one_line_naming_the_key(
    tmp_path: Path, command: str, text: str, named: str
) -> None:
    (tmp_path / "config.toml").write_text(text, encoding="utf-8")
    done = cli(tmp_path, command)
    assert done.returncode == 2
    line = one_clear_line(done)
    assert line.startswith("trainguard: configuration error: config.toml: ")
    assert named in line
    assert done.stdout == ""


# -- submit and track against a simulator --------------------------------------------------------
SUBMIT = (
    "submit",
    "--type",
    "portrait",
    "--name",
    "alice",
    "--images-url",
    "https://example.invalid/alice.zip",
    "--trigger",
    "alice person",
)


async def test_submit_records_the_training(tmp_path: Path, sim: Simulator) -> None:
    write_config(tmp_path, queue_url=sim.base_url)
    done = await acli(tmp_path, *SUBMIT, "--json", env=cli_env(FAL_KEY=FAL_KEY))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["request_id"] in sim.truth  # FAL really got it

    (row,) = rows_of(await acli(tmp_path, "check", "--json"))
    assert row["request_id"] == printed["request_id"]
    assert (row["status"], row["name"], row["training_type"]) == ("SUBMITTED", "alice", "portrait")
    assert row["trigger_phrase"] == "alice person"


async def test_submit_args_are_json_when_they_parse_and_win_over_the_types(
    tmp_path: Path, sim: Simulator
) -> None:
    write_config(tmp_path, queue_url=sim.base_url)
    style = (
        "submit",
        "--type",
        "style",
        "--name",
        "bea",
        "--images-url",
        "https://x.invalid/b.zip",
    )
    done = await acli(tmp_path, *style, env=cli_env(FAL_KEY=FAL_KEY))
    assert done.returncode == 0, done.stderr
    # The shipped style type fills finetune_comment (fal-ai/flux-pro-trainer requires it).
    assert sim.truth[done.stdout.strip()].input == {
        "data_url": "https://x.invalid/b.zip",
        "finetune_comment": "bea",
    }
    args = (
        *("--arg", "iterations=200", "--arg", "lora_rank=null", "--arg", "note=hello world"),
        *("--arg", 'opts={"tags": ["a", 1], "on": true}', "--arg", "finetune_comment=mine"),
        *("--arg", "ratio=0.5", "--arg", 'quoted="200"', "--arg", "eq=a=b"),
    )
    done = await acli(tmp_path, *style, *args, env=cli_env(FAL_KEY=FAL_KEY))
    assert done.returncode == 0, done.stderr
    assert sim.truth[done.stdout.strip()].input == {
        "data_url": "https://x.invalid/b.zip",
        "finetune_comment": "mine",
        "iterations": 200,
        "lora_rank": None,
        "note": "hello world",
        "opts": {"tags": ["a", 1], "on": True},
        "ratio": 0.5,
        "quoted": "200",
        "eq": "a=b",
    }
    for bad in ("novalue", "=x"):
        refused = await acli(tmp_path, *style, "--arg", bad, env=cli_env(FAL_KEY=FAL_KEY))
        assert refused.returncode == 2
        assert "expected KEY=VALUE" in one_clear_line(refused)
    assert len(sim.truth) == 2


async def test_a_missing_required_input_is_exit_2_naming_it_and_sends_nothing(
    tmp_path: Path, sim: Simulator
) -> None:
    masked = (
        "[training_types.masked]\nendpoint = 'fal-ai/flux-lora-fast-training'\n"
        "result_field = 'diffusers_lora_file'\nrequired = ['images_data_url', 'mask_url']\n"
    )
    write_config(tmp_path, queue_url=sim.base_url, extra=masked)
    submit = ("submit", "--type", "masked", "--name", "cy", "--images-url", "https://x.invalid/c")
    done = await acli(tmp_path, *submit, env=cli_env(FAL_KEY=FAL_KEY))
    assert done.returncode == 2
    line = one_clear_line(done)
    assert "input field 'mask_url' is required by training type 'masked'" in line
    assert line.endswith("(--arg KEY=VALUE)")
    empty = await acli(tmp_path, *submit, "--arg", 'mask_url=""', env=cli_env(FAL_KEY=FAL_KEY))
    assert empty.returncode == 2 and "'mask_url'" in one_clear_line(empty)
    assert sim.truth == {}  # nothing was sent
    assert rows_of(await acli(tmp_path, "check", "--json")) == []
    given = await acli(
        tmp_path,
        *submit,
        *("--arg", "mask_url=https://x.invalid/m", "--json"),
        env=cli_env(FAL_KEY=FAL_KEY),
    )
    assert given.returncode == 0, given.stderr
    assert (
        sim.truth[json.loads(given.stdout)["request_id"]].input["mask_url"] == "https://x.invalid/m"
    )


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_submit_refuses_a_non_finite_argument(
    tmp_path: Path, sim: Simulator, value: str
) -> None:
    """issue 9 item 12 (the CLI side of NaN in submit arguments): a bad argument, exit 2."""
    write_config(tmp_path, queue_url=sim.base_url)
    done = await acli(tmp_path, *SUBMIT, "--arg", f"steps={value}", env=cli_env(FAL_KEY=FAL_KEY))
    assert done.returncode == 2, done.stderr
    assert one_clear_line(done) == (
        f"trainguard: --arg 'steps={value}': not a finite number (JSON has no NaN or Infinity)"
    )
    assert sim.truth == {} and rows_of(await acli(tmp_path, "check", "--json")) == []


@pytest.mark.parametrize("refusal", ["api_down", "no_key"])
async def test_submit_refused_by_fal_records_nothing(
    tmp_path: Path, sim: Simulator, refusal: str
) -> None:
    write_config(tmp_path, queue_url=sim.base_url)
    if refusal == "api_down":
        sim.faults.api_down = True
        env = cli_env(FAL_KEY=FAL_KEY)
    else:
        env = cli_env()  # no FAL_KEY: FAL answers 401
    done = await acli(tmp_path, *SUBMIT, env=env)
    assert done.returncode == 1
    line = one_clear_line(done)
    assert line.startswith("trainguard: FAL refused the submit: ")
    if refusal == "api_down":
        assert "HTTP 503" in line
    else:
        assert "HTTP 401" in line and line.endswith("(FAL_KEY is not set)")
    assert done.stdout == ""
    assert sim.truth == {}
    assert rows_of(await acli(tmp_path, "check", "--json")) == []


async def test_the_fal_key_never_appears_in_output_or_logs(tmp_path: Path, sim: Simulator) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    webhook = f"127.0.0.1:{free_port()}"
    write_config(
        tmp_path,
        queue_url=sim.base_url,
        extra=f'[metrics]\nlisten = "{metrics}"\n[webhook]\nlisten = "{webhook}"\n',
    )
    env = cli_env(FAL_KEY=FAL_KEY)
    sim.faults.api_down = True
    refused = await acli(tmp_path, *SUBMIT, "--log-level", "debug", env=env)
    assert refused.returncode == 1
    # `run` logs at start (at debug level), then fails: its metrics port is taken.
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", int(metrics.rsplit(":", 1)[1])))
        taken.listen()
        failed_run = await acli(tmp_path, "run", "--log-level", "debug", env=env)
    assert failed_run.returncode == 1
    for done in (refused, failed_run):
        output = done.stdout + done.stderr
        assert output  # there was something to leak into
        for secret in (FAL_KEY, FAL_KEY.split(":", 1)[1]):
            assert secret not in output


async def test_track_adopts_a_request_once(tmp_path: Path, sim: Simulator) -> None:
    path = write_config(tmp_path, queue_url=sim.base_url)
    settings = config.load(str(path), env={"FAL_KEY": FAL_KEY})
    async with actions.fal_client(settings) as fal:  # submitted elsewhere, not recorded here
        submitted = await fal.submit(
            settings.training_type("fast").endpoint,
            {"images_data_url": "https://x.invalid/b.zip"},
            None,
        )
    rid = submitted.request_id
    track = ("track", rid, "--type", "fast", "--name", "bob", "--trigger", "bob person")

    first = await acli(tmp_path, *track, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["request_id"] == rid
    (row,) = rows_of(await acli(tmp_path, "check", "--json"))
    assert (row["request_id"], row["name"], row["training_type"], row["status"]) == (
        rid,
        "bob",
        "fast",
        "SUBMITTED",
    )

    again = await acli(tmp_path, *track)
    assert again.returncode == 1
    assert one_clear_line(again) == f"trainguard: training {rid} is already tracked"
    assert len(rows_of(await acli(tmp_path, "check", "--json"))) == 1


@pytest.mark.parametrize("rid", ["a/b", "../x", "a b", "x%2Fy", "q?x", "track", "é", "x" * 129])
def test_track_refuses_a_request_id_that_could_never_be_fetched(tmp_path: Path, rid: str) -> None:
    """issue 9 item 12: a tracked id with `/` could never be fetched or cancelled."""
    write_config(tmp_path)
    done = cli(tmp_path, "track", rid, "--type", "fast", "--name", "x")
    assert done.returncode == 2, done.stderr
    assert one_clear_line(done).startswith(f"trainguard: request id {rid!r}: use 1-128 letters")
    assert rows_of(cli(tmp_path, "check", "--json")) == []


@pytest.mark.parametrize(
    "args",
    [
        ("submit", "--type", "video", "--name", "x", "--images-url", "https://x.invalid/x.zip"),
        ("track", "some-request-id", "--type", "video", "--name", "x"),
    ],
)
def test_an_unknown_training_type_is_a_bad_argument(tmp_path: Path, args: tuple[str, ...]) -> None:
    write_config(tmp_path)
    done = cli(tmp_path, *args, env=cli_env(FAL_KEY=FAL_KEY))
    assert done.returncode == 2
    assert "unknown training type 'video' (known: fast, portrait, style)" in one_clear_line(done)
    assert rows_of(cli(tmp_path, "check", "--json")) == []


# -- check ----------------------------------------------------------------------------------------
REAL_OUTPUT = {
    "diffusers_lora_file": {"url": "https://files.example/carol.safetensors"},
    "config_file": {"url": "https://files.example/carol.json"},
}


def record(path: Path, *, incomplete: bool) -> dict[str, str]:
    """Trainings in the store, written by the reconciler as a daemon would (name -> id)."""
    settings = config.load(str(path), env={})
    day = 86400.0

    async def write() -> dict[str, str]:
        async with open_store(settings.database["url"]) as store:
            reconciler = Reconciler(store, settings)
            ids: dict[str, str] = {}
            outcomes: list[tuple[str, Observation | None]] = [
                ("carol", Observation("r-carol", "poller", Kind.SUCCEEDED, output=REAL_OUTPUT)),
                ("dave", Observation("r-dave", "emergency", Kind.DEADLINE)),
                ("erin", None),  # still running
            ]
            if incomplete:  # a real result whose config_file never came
                lora_only = {"diffusers_lora_file": REAL_OUTPUT["diffusers_lora_file"]}
                outcomes.append(
                    ("frank", Observation("r-frank", "webhook", Kind.SUCCEEDED, output=lora_only))
                )
            for name, observation in outcomes:
                view = await reconciler.register(
                    name=name,
                    training_type="portrait",
                    request_id=f"r-{name}",
                    layer="submit",
                    trigger_phrase=f"{name} person",
                    submitted_at=time.time() - 2 * day,  # dave's 6 h deadline is long past
                )
                ids[name] = view.request_id
                if observation is not None:
                    await reconciler.observe(observation)
            return ids

    return trio.run(write)


def parse_utc(value: str) -> datetime:
    assert value.endswith(("Z", "+00:00")), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    return parsed


def test_check_json_keeps_the_operator_contract(tmp_path: Path) -> None:
    record(write_config(tmp_path), incomplete=False)
    done = cli(tmp_path, "check", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert set(rows) == {"carol", "dave", "erin"}
    for row in rows.values():
        assert set(row) >= CONTRACT_KEYS
        assert row["status"] in STATUSES
        assert isinstance(row["progress"], int) and 0 <= row["progress"] <= 100
        assert isinstance(row["is_fallback"], bool)
        parse_utc(row["submitted_at"])
        assert row["cancel_requested_at"] is None  # issue 8: added; nobody asked to cancel

    carol, dave, erin = rows["carol"], rows["dave"], rows["erin"]
    assert (carol["status"], carol["progress"], carol["is_fallback"]) == ("COMPLETED", 100, False)
    assert carol["lora_url"] == REAL_OUTPUT["diffusers_lora_file"]["url"]
    assert carol["config_url"] == REAL_OUTPUT["config_file"]["url"]
    assert (carol["result_layer"], carol["fallback_layer"], carol["finetune_id"]) == (
        "poller",
        None,
        None,
    )
    assert parse_utc(carol["completed_at"]) >= parse_utc(carol["submitted_at"])

    assert (dave["status"], dave["is_fallback"], dave["fallback_layer"]) == (
        "COMPLETED",
        True,
        "emergency",
    )
    assert dave["fallback_reason"] and dave["result_layer"] is None
    assert dave["lora_url"].startswith("https://emergency.fallback.invalid/")
    parse_utc(dave["completed_at"])

    assert (erin["status"], erin["completed_at"], erin["is_fallback"]) == ("SUBMITTED", None, False)

    table = cli(tmp_path, "check")
    assert table.returncode == 0, table.stderr
    lines = {line.split()[0]: line for line in table.stdout.splitlines()}
    assert "FALLBACK" in lines["NAME"] and "BY" in lines["NAME"]
    assert "yes (emergency)" in lines["dave"]
    assert " no " in lines["carol"] and "poller" in lines["carol"]


def test_check_json_shows_the_fal_user_id_of_the_latest_verified_webhook(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    ids = record(path, incomplete=False)
    settings = config.load(str(path), env={})

    async def receipts() -> None:
        async with open_store(settings.database["url"]) as store:
            reconciler = Reconciler(store, settings)
            kept = [
                (ids["carol"], "verified", "acct-old"),
                (ids["carol"], "verified", "acct-1"),
                (ids["carol"], "rejected", "acct-forger"),  # refused: not a user id seen
                (ids["dave"], "unverified", "acct-2"),  # not verified (yet): not shown
            ]
            for n, (rid, verification, user) in enumerate(kept):
                await reconciler.record_receipt(
                    body=b"{}",
                    headers={signing.HEADER_USER_ID.lower(): user},
                    verification=verification,
                    request_id=rid,
                    dedupe_key=f"k{n}",
                )

    trio.run(receipts)
    rows = {r["name"]: r for r in rows_of(cli(tmp_path, "check", "--json"))}
    assert {name: row["fal_user_id"] for name, row in rows.items()} == {
        "carol": "acct-1",
        "dave": None,
        "erin": None,
    }


def test_check_exits_1_when_a_finished_training_lacks_a_field(tmp_path: Path) -> None:
    ids = record(write_config(tmp_path), incomplete=True)
    done = cli(tmp_path, "check", "--json")
    assert done.returncode == 1
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["frank"]["request_id"] == ids["frank"]
    assert rows["frank"]["missing_fields"] == ["config_url"]
    assert rows["carol"]["missing_fields"] == []

    table = cli(tmp_path, "check")
    assert table.returncode == 1
    frank = next(line for line in table.stdout.splitlines() if line.startswith("frank"))
    assert "MISSING config_url" in frank
    assert one_clear_line(table) == "1 finished training(s) lack a guaranteed field"


# -- plugins ----------------------------------------------------------------------------------
def test_plugins_lists_the_built_in_layers(tmp_path: Path) -> None:
    write_config(tmp_path)
    done = cli(tmp_path, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["layer"]: r for r in json.loads(done.stdout)}
    for layer in BUILTIN_LAYERS:
        assert (rows[layer]["source"], rows[layer]["enabled"]) == ("built-in", True)

    table = cli(tmp_path, "plugins")
    assert table.returncode == 0, table.stderr
    listed = {line.split()[0] for line in table.stdout.splitlines()}
    assert set(BUILTIN_LAYERS) <= listed


# -- instances (issue 11) ---------------------------------------------------------------------
async def test_instances_prints_the_live_instances_and_their_roles(
    tmp_path: Path, database_url: str
) -> None:
    from trainguard.cluster import SWEEPS, Cluster

    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "{database_url}"\n', encoding="utf-8")
    settings = config.load(str(path))
    async with open_store(database_url) as one, open_store(database_url) as two:
        a = Cluster(one, settings)
        b = Cluster(two, settings)
        for cluster in (a, b):
            await cluster.register()
        assert await a.try_lead(SWEEPS)

        done = await acli(tmp_path, "instances", "--json", "--config", str(path))
        assert done.returncode == 0, done.stderr
        rows = {row["id"]: row for row in json.loads(done.stdout)}
        assert sorted(rows) == sorted([a.id, b.id])
        assert rows[a.id]["roles"] == [SWEEPS] and rows[b.id]["roles"] == []
        assert rows[a.id]["pid"] == os.getpid() and rows[a.id]["version"] == __version__

        table = await acli(tmp_path, "instances", "--config", str(path))
        assert table.returncode == 0, table.stderr
        header, *lines = table.stdout.splitlines()
        assert header.split()[:3] == ["ID", "HOST", "PID"]
        assert sorted(line.split()[0] for line in lines) == sorted([a.id, b.id])
        assert any(line.startswith(a.id) and SWEEPS in line for line in lines)

        for cluster in (a, b):
            await cluster.resign()  # a clean stop deletes the rows
        gone = await acli(tmp_path, "instances", "--config", str(path))
        assert gone.returncode == 0 and gone.stdout.strip() == "no live instances"
