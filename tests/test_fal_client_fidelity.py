"""The official fal_client, pointed at the simulator, sees what the simulator says is true.

fal_client reads ``FAL_QUEUE_RUN_HOST`` once, at import, and always speaks https. So the
simulator serves TLS with a certificate from a throwaway trustme CA, and fal_client runs
in a child Python process whose environment names the simulator as the queue host and the
CA as ``SSL_CERT_FILE`` (honoured by httpx). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import trio
import trustme

from trainguard.testing.simulator import LORA_FILE_SIZE, SimConfig, Simulator

FAST = "fal-ai/flux-lora-fast-training"
PORTRAIT = "fal-ai/flux-lora-portrait-trainer"
PRO = "fal-ai/flux-pro-trainer"

CLIENT_SCRIPT = r"""
import json
import os
import sys
import time

import fal_client
import httpx
from httpx_sse import connect_sse

IMAGES = {"images_data_url": "https://example.invalid/images.zip"}
report = {}

# Success, submitted under a subpath: the handle must use the URLs submit returned.
handle = fal_client.submit(sys.argv[1], {**IMAGES, "steps": 200}, path="v2")
report["queued"] = type(handle.status()).__name__
report["ok_id"] = handle.request_id
report["ok_result"] = handle.get(interval=0.05)
completed = handle.status(with_logs=True)
report["ok_status"] = [type(completed).__name__, [log["message"] for log in completed.logs]]
# fal_client.result builds the URL itself from FAL_QUEUE_RUN_HOST.
report["ok_result_again"] = fal_client.result(sys.argv[1], handle.request_id)
lora_url = report["ok_result"]["diffusers_lora_file"]["url"]
report["lora_bytes"] = len(httpx.get(lora_url).content)

# A failed training: COMPLETED, then the model's 422 on the result fetch.
failing = fal_client.submit(sys.argv[2], {**IMAGES, "sim_outcome": "fail"})
try:
    failing.get(interval=0.05)
except fal_client.FalClientHTTPError as exc:
    report["fail"] = [failing.request_id, exc.status_code, exc.response.json()]

# A training that never finishes, cancelled while running (a queued one is removed).
stuck = fal_client.submit(sys.argv[2], {**IMAGES, "sim_outcome": "never"})
while type(stuck.status()).__name__ != "InProgress":
    time.sleep(0.02)
stuck.cancel()
cancelled = fal_client.status(sys.argv[2], stuck.request_id)
report["cancel"] = [stuck.request_id, type(cancelled).__name__, cancelled.error_type]

# Another, cancelled through the module-level call (it builds the URL itself).
queued = fal_client.submit(sys.argv[2], {**IMAGES, "sim_outcome": "never"})
fal_client.cancel(sys.argv[2], queued.request_id)
try:  # removed if it was still queued (404), else cancelled while running
    after = fal_client.status(sys.argv[2], queued.request_id).error_type
except fal_client.FalClientHTTPError as exc:
    after = exc.status_code
report["cancel_again"] = [queued.request_id, after]

# 1.0.x follows a request by polling (iter_events); each status parsed by the client.
polled = fal_client.submit(sys.argv[2], IMAGES)
events = list(polled.iter_events(with_logs=True, interval=0.05))
report["polled"] = [type(status).__name__ for status in events]
report["polled_logs"] = [log["message"] for log in events[-1].logs]

# The status stream (fal-js's option), read with httpx_sse (fal_client's own SSE reader,
# which checks the content type) and each event parsed by fal_client's status parser.
streamed = fal_client.submit(sys.argv[2], IMAGES)
auth = {"Authorization": "Key " + os.environ["FAL_KEY"]}
with httpx.Client(headers=auth) as http, connect_sse(
    http, "GET", streamed.status_url + "/stream", params={"logs": 1}
) as source:
    report["streamed"] = [type(streamed._parse_status(e.json())).__name__ for e in source.iter_sse()]
report["streamed_result"] = [streamed.request_id, streamed.get(interval=0.05)]

# The pro trainer refuses a submit without finetune_comment, as FastAPI does.
try:
    fal_client.submit(sys.argv[3], {"data_url": "https://example.invalid/d.zip"})
except fal_client.FalClientHTTPError as exc:
    report["pro_refused"] = [exc.status_code, exc.response.json()]

print(json.dumps(report))
"""


def _issue_certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = (tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    for index, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(cert_file), append=index > 0)
    return ca_file, cert_file, key_file


def _client_env(host: str, ca_file: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if "proxy" not in name.lower() and not name.startswith("FAL_")
    }
    env.update(
        FAL_KEY="sim-test-key",
        FAL_QUEUE_RUN_HOST=host,
        FAL_RUN_HOST=host,
        SSL_CERT_FILE=str(ca_file),
    )
    return env


async def test_official_client_against_simulator(tmp_path: Path) -> None:
    ca_file, cert_file, key_file = _issue_certificate(tmp_path)
    config = SimConfig(
        queue_seconds=0.1,
        run_seconds=0.2,
        tls=True,
        certfile=str(cert_file),
        keyfile=str(key_file),
    )
    sim = Simulator(config)
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(sim.serve)
        assert base_url.startswith("https://127.0.0.1:")
        host = base_url.removeprefix("https://")
        with trio.fail_after(30):
            done = await trio.run_process(
                [sys.executable, "-c", CLIENT_SCRIPT, FAST, PORTRAIT, PRO],
                env=_client_env(host, ca_file),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        nursery.cancel_scope.cancel()
    assert done.returncode == 0, done.stderr.decode()
    report: dict[str, Any] = json.loads(done.stdout)

    ok = sim.truth[report["ok_id"]]
    assert ok.endpoint == f"{FAST}/v2"
    assert ok.outcome == "ok"
    assert report["queued"] == "Queued"
    assert report["ok_result"] == ok.output
    assert report["ok_result_again"] == ok.output
    assert report["ok_result"]["diffusers_lora_file"]["url"].startswith(base_url)
    assert report["lora_bytes"] == LORA_FILE_SIZE
    kind, messages = report["ok_status"]
    assert kind == "Completed"
    assert messages[-2:] == ["step 200/200", "Training completed"]

    fail_id, code, body = report["fail"]
    assert sim.truth[fail_id].outcome == "fail"
    assert code == 422
    assert isinstance(body["detail"], list)

    cancel_id, kind, error_type = report["cancel"]
    assert sim.truth[cancel_id].outcome == "cancelled"
    assert (kind, error_type) == ("Completed", "client_cancelled")
    queued_id, error_type = report["cancel_again"]
    # The module-level call built the right URL: the request was cancelled, and then either
    # removed from the queue (404, as fal does) or stopped while running.
    assert sim.truth[queued_id].outcome == "cancelled" and error_type in (404, "client_cancelled")

    def steps(kinds: list[str]) -> list[str]:  # consecutive repeats folded
        return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]

    assert steps(report["polled"]) == ["Queued", "InProgress", "Completed"]
    assert report["polled_logs"][-1] == "Training completed"
    assert steps(report["streamed"]) == ["Queued", "InProgress", "Completed"]
    assert report["streamed"].count("Completed") == 1  # the stream ends at COMPLETED
    streamed_id, output = report["streamed_result"]
    assert output == sim.truth[streamed_id].output
    assert sim.stats[("status_stream", 200)] == 1

    code, body = report["pro_refused"]
    assert code == 422
    assert [entry["loc"] for entry in body["detail"]] == [["body", "finetune_comment"]]
    assert not any(t.endpoint == PRO for t in sim.truth.values())

    # The client authenticated with the key from its environment on every call.
    assert not any(status == 401 for (_, status) in sim.stats)
