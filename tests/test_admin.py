"""The admin API on the metrics listener, and the CLI's cancel and recheck."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import daemon_settings, make_settings
from trainguard import __version__, admin
from trainguard.cluster import Cluster
from trainguard.config import DEFAULT_TRAINING_TYPES, ConfigError
from trainguard.plugins.manager import build_manager
from trainguard.store import open_store
from trainguard.supervisor import Daemon
from trainguard.testing.simulator import WEBHOOK_USER_ID, SimConfig, Simulator

TOKEN = "admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
SUBMIT = {"type": "portrait", "name": "eve", "images_url": "https://example.invalid/e.zip"}


async def start(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, token: str | None = TOKEN, **kw: Any
) -> tuple[Daemon, str]:
    settings = dataclasses.replace(
        daemon_settings(tmp_path / "db.sqlite", sim, **kw), admin_token=token
    )
    daemon = Daemon(settings, pm=build_manager(entry_points=False))
    await nursery.start(daemon.run)
    assert daemon.ops_address is not None
    host, port = daemon.ops_address
    return daemon, f"http://{host}:{port}"


async def submit(
    client: httpx.AsyncClient, base: str, name: str, outcome: str = "ok"
) -> dict[str, Any]:
    reply = await client.post(
        f"{base}/v1/trainings",
        headers=AUTH,
        json={
            "type": "portrait",
            "name": name,
            "images_url": f"https://example.invalid/{name}.zip",
            "trigger": f"{name} person",
            "arguments": {"sim_outcome": outcome},
        },
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


async def test_token_is_required_and_openapi_is_public(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    _, base = await start(nursery, tmp_path, sim, only=("webhook",))
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{base}/v1/trainings")).status_code == 401
        wrong = await client.get(f"{base}/v1/trainings", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert (await client.get(f"{base}/v1/trainings", headers=AUTH)).json() == {
            "items": [],
            "next_offset": None,
        }
        doc = (await client.get(f"{base}/openapi.json")).json()
        assert (
            doc["openapi"].startswith("3.") and "/v1/trainings/{request_id}/cancel" in doc["paths"]
        )
        assert (await client.get(f"{base}/metrics")).status_code == 200  # the ops routes stay open
        assert (await client.get(f"{base}/v1/nothing", headers=AUTH)).status_code == 404
        assert (await client.delete(f"{base}/v1/trainings", headers=AUTH)).status_code == 405


async def test_without_a_token_a_foreign_page_cannot_submit_or_cancel(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    """issue 9 item 5: a browser page's text/plain POST from a foreign Origin got 201."""
    daemon, base = await start(nursery, tmp_path, sim, token=None, only=("webhook",))
    assert daemon.store is not None and daemon.reconciler is not None
    await daemon.reconciler.register(
        name="ann", training_type="portrait", request_id="req-ann", layer="track"
    )
    page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    async with httpx.AsyncClient() as client:
        forged = await client.post(f"{base}/v1/trainings", headers=page, content=json.dumps(SUBMIT))
        assert forged.status_code == 403, forged.text
        cancel = await client.post(f"{base}/v1/trainings/req-ann/cancel", headers=page)
        assert cancel.status_code == 403, cancel.text
        # even a well-formed same-origin change is refused without a token: reads only
        plain = await client.post(f"{base}/v1/trainings", json=SUBMIT)
        assert plain.status_code == 403 and plain.json()["error"] == "read_only"
        track = await client.post(
            f"{base}/v1/trainings/track",
            json={"request_id": "req-x", "type": "portrait", "name": "x"},
        )
        assert track.status_code == 403
        listed = await client.get(f"{base}/v1/trainings")
        assert listed.status_code == 200 and [t["name"] for t in listed.json()["items"]] == ["ann"]
        assert (await client.get(f"{base}/v1/trainings/req-ann")).status_code == 200
    assert sim.truth == {}  # nothing reached FAL
    view = await daemon.store.training("req-ann")
    assert view is not None and view.status == "SUBMITTED"
    assert await daemon.store.training("req-x") is None


async def test_changes_need_json_a_same_origin_and_our_host(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    """With a token too: the browser's cross-origin simple request and DNS rebinding."""
    daemon, base = await start(
        nursery,
        tmp_path,
        sim,
        only=("webhook",),
        extra={"metrics": {"allowed_hosts": ["trainguard.internal"]}},
    )
    host, port = daemon.ops_address  # type: ignore[misc]
    url = f"{base}/v1/trainings"
    async with httpx.AsyncClient() as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {**AUTH, "Content-Type": content_type} if content_type else AUTH
            reply = await client.post(url, headers=headers, content=json.dumps(SUBMIT))
            assert reply.status_code == 415, (content_type, reply.text)
        for origin in ("http://evil.example", "null", f"http://{host}:{port + 1}", "https://x"):
            reply = await client.post(url, headers={**AUTH, "Origin": origin}, json=SUBMIT)
            assert reply.status_code == 403 and reply.json()["error"] == "foreign_origin", origin
        for rebound in (f"evil.example:{port}", "trainguard.attacker.test", "a@127.0.0.1", ":x"):
            for method in ("GET", "POST"):
                reply = await client.request(
                    method, url, headers={**AUTH, "Host": rebound}, json=SUBMIT
                )
                assert reply.status_code == 421, (rebound, method, reply.text)
        assert sim.truth == {}
        # what the CLI-less operator and a same-origin page legitimately send still works
        ok = await client.post(
            url, headers={**AUTH, "Origin": f"http://{host}:{port}"}, json=SUBMIT
        )
        assert ok.status_code == 201, ok.text
        local = await client.get(url, headers={**AUTH, "Host": f"localhost:{port}"})
        assert local.status_code == 200 and len(local.json()["items"]) == 1
        allowed = await client.get(url, headers={**AUTH, "Host": f"TrainGuard.internal:{port}"})
        assert allowed.status_code == 200  # [metrics] allowed_hosts
        charset = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
        again = await client.post(url, headers=charset, content=json.dumps(SUBMIT))
        assert again.status_code == 201, again.text
    assert len(sim.truth) == 2


async def test_nan_or_infinity_in_submit_arguments_is_a_clear_400(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    """issue 9 item 12: `NaN` in the arguments gave a 500 with an empty body."""
    _, base = await start(nursery, tmp_path, sim, only=("webhook",))
    async with httpx.AsyncClient() as client:
        for value in ("NaN", "Infinity", "-Infinity", "1e999"):
            body = (
                '{"type": "portrait", "name": "n", "images_url": "https://x/a.zip", '
                f'"arguments": {{"steps": {value}}}}}'
            )
            reply = await client.post(
                f"{base}/v1/trainings", headers={**AUTH, **JSON}, content=body
            )
            assert reply.status_code == 400, (value, reply.status_code, reply.text)
            assert reply.json()["error"] == "bad_json" and value in reply.json()["detail"]
    assert sim.truth == {}


async def test_track_refuses_an_id_the_api_could_never_serve(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    """issue 9 item 12: `a/b` was tracked, and then neither fetched nor cancelled."""
    daemon, base = await start(nursery, tmp_path, sim, only=("webhook",))
    async with httpx.AsyncClient() as client:
        for rid in ("a/b", "..", "a%2Fb", "track", "x y", ""):
            body = {"request_id": rid, "type": "portrait", "name": "x"}
            reply = await client.post(f"{base}/v1/trainings/track", headers=AUTH, json=body)
            assert reply.status_code == (400 if rid == "" else 422), (rid, reply.text)
        ok = {"request_id": "0f1e-Ab_9.~x", "type": "portrait", "name": "x"}
        assert (
            await client.post(f"{base}/v1/trainings/track", headers=AUTH, json=ok)
        ).status_code == 201
        got = await client.get(f"{base}/v1/trainings/0f1e-Ab_9.~x", headers=AUTH)
        assert got.status_code == 200, got.text
    assert [v.request_id for v in await daemon.store.trainings()] == ["0f1e-Ab_9.~x"]  # type: ignore[union-attr]


async def test_a_trickled_body_gets_408_and_frees_the_connection(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client trickling its body a byte at a time held an admin connection for ever (the
    listener's read timeout is per read); the whole body now has one time limit."""
    monkeypatch.setattr(admin, "BODY_TIMEOUT_SECONDS", 1.0)
    daemon, _ = await start(nursery, tmp_path, sim, only=("webhook",))
    host, port = daemon.ops_address  # type: ignore[misc]
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(
        b"POST /v1/trainings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
    )
    answer = b""
    with trio.fail_after(30):
        while b"\r\n\r\n" not in answer:
            with trio.move_on_after(0.2):
                answer += await stream.receive_some(4096)
            if b"\r\n\r\n" not in answer:
                await stream.send_all(b" ")
    assert answer.startswith(b"HTTP/1.1 408"), answer
    await stream.aclose()
    assert sim.truth == {}


async def test_non_loopback_listener_needs_a_token(tmp_path: Path, sim: Simulator) -> None:
    settings = daemon_settings(
        tmp_path / "db.sqlite", sim, extra={"metrics": {"listen": "0.0.0.0:9700"}}
    )
    with pytest.raises(ConfigError, match="TRAINGUARD_ADMIN_TOKEN"):
        Daemon(settings, pm=build_manager(entry_points=False))
    Daemon(dataclasses.replace(settings, admin_token=TOKEN), pm=build_manager(entry_points=False))


async def test_submit_list_get_filter_and_page(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    _, base = await start(nursery, tmp_path, sim, only=("webhook",))
    async with httpx.AsyncClient() as client:
        made = [await submit(client, base, f"u{i}") for i in range(5)]
        assert made[0]["status"] == "SUBMITTED" and made[0]["is_fallback"] is False
        with trio.fail_after(10):
            while True:
                page = (
                    await client.get(f"{base}/v1/trainings?status=COMPLETED", headers=AUTH)
                ).json()
                if len(page["items"]) == 5:
                    break
                await trio.sleep(0.1)
        first = (await client.get(f"{base}/v1/trainings?limit=2", headers=AUTH)).json()
        assert [t["name"] for t in first["items"]] == ["u0", "u1"] and first["next_offset"] == 2
        last = (await client.get(f"{base}/v1/trainings?limit=2&offset=4", headers=AUTH)).json()
        assert [t["name"] for t in last["items"]] == ["u4"] and last["next_offset"] is None
        by_name = (await client.get(f"{base}/v1/trainings?name=u3", headers=AUTH)).json()
        assert [t["request_id"] for t in by_name["items"]] == [made[3]["request_id"]]
        one = (
            await client.get(f"{base}/v1/trainings/{made[1]['request_id']}", headers=AUTH)
        ).json()
        assert one["status"] == "COMPLETED" and one["result_layer"] == "webhook"
        assert [e["kind"] for e in one["events"]] == ["registered", "result"]
        assert one["fal_user_id"] == WEBHOOK_USER_ID  # the account its verified webhook named
        for bad in ("status=DONE", "limit=0", "limit=x", "nope=1"):
            assert (await client.get(f"{base}/v1/trainings?{bad}", headers=AUTH)).status_code == 400
        assert (await client.get(f"{base}/v1/trainings/unknown", headers=AUTH)).status_code == 404
        for body in (
            b"{",
            b"[]",
            json.dumps({"type": "nope", "name": "x", "images_url": "u"}).encode(),
        ):
            reply = await client.post(
                f"{base}/v1/trainings", headers={**AUTH, **JSON}, content=body
            )
            assert reply.status_code == 400, body


async def test_submit_merges_type_arguments_and_refuses_a_missing_required_field(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    masked = {
        "endpoint": "fal-ai/flux-lora-fast-training",
        "result_field": "diffusers_lora_file",
        "arguments": {"steps": 300, "note": "for {name}"},
        "required": ["images_data_url", "mask_url"],
    }
    types = {"masked": masked, "style": DEFAULT_TRAINING_TYPES["style"]}
    _, base = await start(
        nursery, tmp_path, sim, only=("webhook",), extra={"training_types": types}
    )
    async with httpx.AsyncClient() as client:

        async def post(body: dict[str, Any]) -> httpx.Response:
            return await client.post(f"{base}/v1/trainings", headers=AUTH, json=body)

        first = {"type": "masked", "name": "dee", "images_url": "https://x.invalid/d.zip"}
        refused = await post(first)
        assert refused.status_code == 422
        assert refused.json()["error"] == "missing_input"
        assert (
            "input field 'mask_url' is required by training type 'masked'"
            in (refused.json()["detail"])
        )
        assert sim.truth == {}  # nothing was sent
        made = await post({**first, "arguments": {"mask_url": "https://x.invalid/m", "steps": 9}})
        assert made.status_code == 201, made.text
        assert sim.truth[made.json()["request_id"]].input == {
            "images_data_url": "https://x.invalid/d.zip",
            "mask_url": "https://x.invalid/m",
            "steps": 9,  # the caller's wins
            "note": "for dee",
        }
        style = await post({"type": "style", "name": "eve", "images_url": "https://x.invalid/e"})
        assert style.status_code == 201, style.text
        assert sim.truth[style.json()["request_id"]].input["finetune_comment"] == "eve"


async def test_track_cancel_recheck(nursery: trio.Nursery, tmp_path: Path) -> None:
    sim = Simulator(SimConfig(queue_seconds=0.2, run_seconds=30.0, seed=2))  # long enough to cancel
    await nursery.start(sim.serve)
    daemon, base = await start(nursery, tmp_path, sim, only=("webhook", "poller"))
    async with httpx.AsyncClient() as client:
        running = await submit(client, base, "ann")
        rid = running["request_id"]
        recheck = await client.post(f"{base}/v1/trainings/{rid}/recheck", headers=AUTH, json={})
        assert recheck.status_code == 202
        requested = await client.post(f"{base}/v1/trainings/{rid}/cancel", headers=AUTH, json={})
        assert requested.status_code == 200, requested.text
        # A cancel is a request, not an outcome: the training is still being watched ...
        assert requested.json()["cancel"] == "requested"
        assert requested.json()["status"] in ("SUBMITTED", "IN_QUEUE", "IN_PROGRESS")
        assert requested.json()["cancel_requested_at"]
        assert sim.truth[rid].outcome == "cancelled"
        # ... until FAL shows it will not finish (the poller sees the cancelled request).
        with trio.fail_after(10):
            while True:
                one = await client.get(f"{base}/v1/trainings/{rid}", headers=AUTH)
                if one.json()["status"] == "CANCELLED":
                    break
                await trio.sleep(0.1)
        assert not one.json()["is_fallback"] and one.json()["cancel_requested_at"]
        again = await client.post(f"{base}/v1/trainings/{rid}/cancel", headers=AUTH, json={})
        assert again.status_code == 409
        assert (
            await client.post(f"{base}/v1/trainings/{rid}/recheck", headers=AUTH, json={})
        ).status_code == 409
        assert (
            await client.post(f"{base}/v1/trainings/nope/cancel", headers=AUTH, json={})
        ).status_code == 404

        # a request submitted elsewhere, adopted through the API
        async with httpx.AsyncClient(headers={"Authorization": "Key k"}) as fal:
            elsewhere = (
                await fal.post(
                    f"{sim.base_url}/fal-ai/flux-lora-portrait-trainer",
                    json={"images_data_url": "u"},
                )
            ).json()
        body = {"request_id": elsewhere["request_id"], "type": "portrait", "name": "bob"}
        tracked = await client.post(f"{base}/v1/trainings/track", headers=AUTH, json=body)
        assert tracked.status_code == 201 and tracked.json()["name"] == "bob"
        assert (
            await client.post(f"{base}/v1/trainings/track", headers=AUTH, json=body)
        ).status_code == 409
    events = [e["kind"] for e in await daemon.store.events(rid)]  # type: ignore[union-attr]
    assert events[0] == "registered" and "recheck" in events and events[-1] == "cancelled"
    assert events.index("cancel_requested") < events.index("cancelled")


async def test_cli_cancel_and_recheck(nursery: trio.Nursery, tmp_path: Path) -> None:
    sim = Simulator(SimConfig(queue_seconds=0.2, run_seconds=30.0, seed=4))
    await nursery.start(sim.serve)
    settings = daemon_settings(tmp_path / "db.sqlite", sim)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[database]\nurl = "{settings.database["url"]}"\n[fal]\nqueue_url = "{sim.base_url}"\n',
        encoding="utf-8",
    )
    env = {"FAL_KEY": "k", "PATH": "/usr/bin:/bin"}

    async def cli(*args: str) -> trio.CompletedProcess[bytes]:
        return await trio.run_process(
            [sys.executable, "-m", "trainguard", *args, "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
            cwd=tmp_path,
        )

    sub = await cli(
        "submit", "--type", "portrait", "--name", "ann", "--images-url", "https://x/a.zip"
    )
    assert sub.returncode == 0, sub.stderr
    rid = sub.stdout.decode().strip()
    rechecked = await cli("recheck", rid, "--json")
    assert rechecked.returncode == 0 and json.loads(rechecked.stdout)["request_id"] == rid
    cancelled = await cli("cancel", rid, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    shown = json.loads(cancelled.stdout)
    assert (shown["status"], shown["cancel"]) == ("SUBMITTED", "requested")
    assert shown["cancel_requested_at"]
    # The running request stopped at FAL; no daemon here, so the CLI is told FAL finished it.
    again = await cli("cancel", rid)
    assert (
        again.returncode == 1
        and b"already completed at FAL" in again.stderr
        and b"Traceback" not in again.stderr
    )
    plain = await cli(
        "cancel",
        (
            await cli(
                "submit", "--type", "portrait", "--name", "bo", "--images-url", "https://x/b.zip"
            )
        )
        .stdout.decode()
        .strip(),
    )
    assert plain.returncode == 0 and b"cancel requested" in plain.stdout
    missing = await cli("recheck", "nope")
    assert missing.returncode == 1 and b"no training" in missing.stderr


@pytest.mark.skipif(
    shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None,
    reason="schemathesis not installed",
)
async def test_schemathesis_finds_no_5xx_and_no_response_outside_the_schema(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    _, base = await start(nursery, tmp_path, sim, only=("webhook",))
    async with httpx.AsyncClient() as client:
        await submit(client, base, "seed")  # something to list and fetch
    result = await trio.run_process(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=tmp_path,
    )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output[-4000:]
    # every route was tested
    routes = len(admin.ROUTES)
    assert f"{routes} passed" in output or f"{routes} operations" in output, output[-2000:]


async def test_instances_answers_the_live_instances_with_their_roles(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    daemon, base = await start(nursery, tmp_path, sim, only=("webhook",), url=database_url)
    assert daemon.cluster is not None and daemon.ops_address is not None
    async with open_store(database_url) as other_store:
        other = Cluster(other_store, make_settings(database_url, {"cluster": {"instance_id": "b"}}))
        await other.register()  # a second instance, not leading
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"{base}/v1/instances", headers=AUTH)
            refused = await client.get(f"{base}/v1/instances")
    assert reply.status_code == 200, reply.text
    assert refused.status_code == 401
    by_id = {item["id"]: item for item in reply.json()["items"]}
    assert sorted(by_id) == sorted([daemon.cluster.id, "b"])
    mine = by_id[daemon.cluster.id]
    host, port = daemon.ops_address
    assert mine["roles"] == ["sweeps"] and mine["pid"] == os.getpid()
    assert mine["metrics_listen"] == f"{host}:{port}" and mine["version"] == __version__
    assert by_id["b"]["roles"] == []
    assert "/v1/instances" in admin.openapi()["paths"]


def test_the_router_the_field_checks_and_the_openapi_document_are_one_table() -> None:
    doc = admin.openapi()
    operations = {(m.upper(), path) for path, item in doc["paths"].items() for m in item}
    assert operations == {(route.method, route.path) for route in admin.ROUTES}
    api = admin.AdminApi(services=None, token=None)  # type: ignore[arg-type]  # routing only
    for route in admin.ROUTES:
        concrete = route.path.replace("{request_id}", "req-1")
        found, params, known = api._match(route.method, concrete)
        assert found is route and known
        assert params == ({"request_id": "req-1"} if "{" in route.path else {})
        operation = doc["paths"][route.path][route.method.lower()]
        if route.body is None:
            assert "requestBody" not in operation
        else:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert sorted(schema["properties"]) == sorted(route.body.fields)
        documented = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "query"}
        assert documented == {p["name"] for p in route.query}
    # "track" is a literal route, never an id; another method on a known path is a 405
    assert api._match("GET", "/v1/trainings/track") == (None, {}, True)
    assert api._match("DELETE", "/v1/trainings/req-1") == (None, {}, True)
    assert api._match("GET", "/v1/nothing") == (None, {}, False)
