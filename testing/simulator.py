"""A FAL-compatible queue on loopback, with signed webhooks and fault injection.

Tests and the demo point the daemon here instead of ``https://queue.fal.run``. The queue
API, the webhook bodies and the signatures follow /work/shared/fal-api.md. Where that page
is silent the simulator picks one plausible behaviour and says so here:

- Cancel follows fal-api.md: a queued request is removed (from then on its status, result
  and cancel answer 404 as for an unknown id, and no webhook is sent). A running one gets
  the signal: by default the app stops at once, the training becomes COMPLETED (status
  carries ``error``/``error_type`` ``client_cancelled``), its result answers 499
  ``{"detail": ..., "error_type": "client_cancelled"}`` with ``X-Fal-Error-Type`` (fal's
  documented error type for a client cancellation), and a webhook, if registered, is sent
  with ``status: "ERROR"`` and ``error: "Invalid status code: 499"``. A running app may
  also ignore the signal and finish with its result ("the app decides"): the input's
  ``sim_cancel: "ignore"`` or the ``ignore_cancel`` fault.
- Outcomes ``error500`` (the app's own 500 ``{"detail": ...}`` on the result) and
  ``typed_error`` (504 ``{"detail", "error_type": "request_timeout"}`` with
  ``X-Fal-Error-Type``, fal's typed error after its own retries) are final errors of a
  finished request (fal-api.md, result and "Infrastructure errors").
- The not-ready answer of the result call is undocumented: ``not_ready_answer`` picks the
  wording (400 "still in progress" by default, 400 "Request is not completed", 404, a bare
  422, or a random one of these per call).
- A failed training answers its result with 422 ``{"detail": [...]}``; about half of the
  failed trainings (seeded) also show ``error: "Invalid status code: 422"`` on the COMPLETED
  status, so a client cannot rely on it.
- ``payload_error``: only the webhook carries ``payload: null`` + ``payload_error``; the
  result fetch still answers 200 with the real output.
- Once a result expires (``result_expiry_seconds``), status, result, cancel and files all
  answer 404, as for an unknown id.
- Inputs missing the trainer's required field (``images_data_url``) fail like fal's runner
  does (422 ``field required``) unless ``sim_outcome`` says otherwise. The pro trainer
  (``fal-ai/flux-pro-trainer``) refuses the submit itself without ``data_url`` or
  ``finetune_comment``: 422 ``{"detail": [...]}``, one FastAPI-style entry per missing field,
  nothing queued. Unknown apps are treated as generic LoRA trainers.
- Submit answers carry ``x-fal-request-id``. ``GET .../requests/{id}/status/stream`` sends
  server-sent events (``data: <status JSON>``, the status route's object, honouring
  ``?logs=1``) each time the status changes, until COMPLETED.
- Transient faults (``api_error_rate``, ``api_down``, ``result_gateway_error``) are what
  fal-api.md calls transient: 429 with ``Retry-After`` (carrying ``error_type:
  "rate_limited"``, fal documents none for it) and untyped gateway pages (HTML 502/504,
  plain-text 503: no ``X-Fal-Error-Type``, no FAL error body), never fal's typed errors.

Time is ``trio.current_time()`` read lazily on every request, so no task runs per training
except the webhook sender; ``Truth.completed_at`` is on that clock too.

Every webhook delivery attempt is logged in ``Simulator.deliveries`` (request id, good or bad
signature, the signature header and body hash as sent, and the receiver's HTTP status or the
transport error), so a test can check the receiver's own records against what was sent.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import math
import random
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import httpx
import hypercorn.config
import hypercorn.trio
import trio

from trainguard import http, signing

logger = logging.getLogger("trainguard.testing.simulator")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OUTCOMES = ("ok", "fail", "error500", "typed_error", "no_lora", "payload_error", "never")
"""Values accepted in an input's ``sim_outcome`` key ("cancelled" comes only from a cancel)."""

DEFAULT_WEBHOOK_RETRY_DELAYS: tuple[float, ...] = (0.5, 1, 2, 4, 8, 15, 30, 60, 120, 240)
"""Real fal retries 10 times over about 2 hours; same count and shape, ~15x shorter."""

WEBHOOK_USER_ID = "sim-user-0001"
LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
CONFIG_FILE_NAME = "config.json"
LORA_FILE_SIZE = 4096
PAYLOAD_ERROR_TEXT = (
    "Response payload is not JSON serializable. Either return a JSON serializable object "
    "or use the queue endpoint to retrieve the response."
)
CANCELLED_DETAIL = "Request was cancelled by the client"
APP_ERROR_DETAIL = "Training crashed: CUDA error: an illegal memory access was encountered"
TYPED_ERROR = (504, "request_timeout", "Request timed out")
#: The ``error`` of a COMPLETED status (about half the failed trainings show one, seeded).
_FAILED_STATUS = {
    "fail": "Invalid status code: 422",
    "error500": "Invalid status code: 500",
    "typed_error": TYPED_ERROR[2],
}
NOT_READY_ANSWERS = ("in_progress", "not_completed", "not_found", "bare_422")
CANCEL_BEHAVIOURS = ("honour", "ignore")
LOG_CHECKPOINTS = 10
STREAM_INTERVAL_SECONDS = 0.05
"""How often a status stream looks for a change to send."""

_HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
_HTML_504 = b"<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway Time-out</h1></center><hr><center>nginx</center></body></html>"


def _rate_limited() -> _Reply:
    return _json_reply(
        429,
        {"detail": "Too many concurrent requests", "error_type": "rate_limited"},
        {"Retry-After": "1"},
    )


def _gateway_page(status: int) -> _Reply:
    """An untyped page from a proxy on the way: not FAL's answer about the request."""
    if status == 503:
        return _Reply(503, b"Service Unavailable", content_type="text/plain")
    return _Reply(status, _HTML_504 if status == 504 else _HTML_502, content_type="text/html")


@dataclass
class Faults:
    """Independent fault knobs; mutable at runtime (read on every request or delivery).

    Probabilities are in [0, 1] and drawn from seeded generators.
    """

    drop_webhook: float = 0.0
    """A training's webhook is never sent."""
    duplicate_webhook: float = 0.0
    """An acknowledged webhook is sent once more."""
    delay_webhook_seconds: float = 0.0
    """Max random extra delay before the first delivery (reorders deliveries)."""
    bad_signature: float = 0.0
    """A delivery attempt is signed over different bytes."""
    api_error_rate: float = 0.0
    """A queue API call answers 429 (with Retry-After) or an untyped gateway page (HTML
    502/504, plain-text 503)."""
    api_timeout_rate: float = 0.0
    """A queue API call hangs ``api_timeout_seconds`` before answering."""
    api_timeout_seconds: float = 30.0
    fail_training: float = 0.0
    """The training fails: COMPLETED, then 422 on the result, ERROR webhook."""
    missing_lora: float = 0.0
    """Success output without diffusers_lora_file / finetune_id."""
    payload_error: float = 0.0
    """The webhook carries ``payload: null`` and ``payload_error``."""
    never_finish: float = 0.0
    """The training stays IN_PROGRESS forever."""
    gateway_id_header: float = 0.0
    """The training was retried inside fal: its ``gateway_request_id`` differs from its
    ``request_id``, and its webhooks carry the gateway id in ``X-Fal-Webhook-Request-Id``,
    signed over it (which id fal sends then is unsourced; both are genuine)."""
    result_expiry_seconds: float | None = None
    """Result and files answer 404 this long after completion; None keeps them."""
    jwks_down: bool = False
    """The JWKS endpoint answers 503."""
    api_down: bool = False
    """Every queue API call answers 503 (an untyped plain-text page)."""
    result_gateway_error: float = 0.0
    """A result call answers an untyped gateway page (HTML 502 or plain-text 503)."""
    ignore_cancel: float = 0.0
    """A running training ignores a cancel and finishes with its outcome (unless its input
    says ``sim_cancel``)."""
    not_ready_answer: str = "in_progress"
    """The result call's answer before completion: in_progress (400 "Request is still in
    progress"), not_completed (400 "Request is not completed"), not_found (404), bare_422
    (422, no body), or mixed (one of those at random per call)."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in _CHOICE_FAULTS:
                if value not in _CHOICE_FAULTS[item.name]:
                    choices = ", ".join(_CHOICE_FAULTS[item.name])
                    raise ValueError(f"fault {item.name} is one of {choices}, got {value!r}")
            elif item.name in _BOOL_FAULTS:
                if not isinstance(value, bool):
                    raise ValueError(f"fault {item.name} must be a boolean, got {value!r}")
            elif value is None and item.name in _OPTIONAL_FAULTS:
                continue
            elif not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"fault {item.name} must be a number, got {value!r}")
            elif item.name in _PROBABILITY_FAULTS and not 0 <= value <= 1:
                raise ValueError(f"fault {item.name} is a probability in [0, 1], got {value}")
            elif value < 0:
                raise ValueError(f"fault {item.name} must not be negative, got {value}")


_BOOL_FAULTS = frozenset({"jwks_down", "api_down"})
_CHOICE_FAULTS = {"not_ready_answer": (*NOT_READY_ANSWERS, "mixed")}
_OPTIONAL_FAULTS = frozenset({"result_expiry_seconds"})
_PROBABILITY_FAULTS = frozenset(
    {
        "drop_webhook",
        "duplicate_webhook",
        "bad_signature",
        "api_error_rate",
        "api_timeout_rate",
        "fail_training",
        "missing_lora",
        "payload_error",
        "never_finish",
        "result_gateway_error",
        "ignore_cancel",
        "gateway_id_header",
    }
)


def parse_fault(spec: str) -> tuple[str, float | bool | str | None]:
    """Parse ``NAME=VALUE`` from ``--fault``; raises ValueError naming what is wrong."""
    name, sep, raw = spec.partition("=")
    name, raw = name.strip(), raw.strip()
    known = [item.name for item in fields(Faults)]
    if not sep or not name:
        raise ValueError(f"--fault {spec!r}: expected NAME=VALUE")
    if name not in known:
        raise ValueError(f"--fault {spec!r}: unknown fault {name!r}; known: {', '.join(known)}")
    if name in _CHOICE_FAULTS:
        if raw not in _CHOICE_FAULTS[name]:
            choices = ", ".join(_CHOICE_FAULTS[name])
            raise ValueError(f"--fault {spec!r}: {name} is one of {choices}")
        return name, raw
    if name in _BOOL_FAULTS:
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return name, True
        if lowered in {"0", "false", "no", "off"}:
            return name, False
        raise ValueError(f"--fault {spec!r}: {name} takes true or false")
    if name in _OPTIONAL_FAULTS and raw.lower() == "none":
        return name, None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"--fault {spec!r}: {name} takes a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"--fault {spec!r}: {name} must be finite")
    return name, value


@dataclass
class SimConfig:
    """How the simulator listens and how fast trainings move."""

    host: str = "127.0.0.1"
    port: int = 0
    queue_seconds: float = 2.0
    run_seconds: float = 10.0
    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    webhook_retry_delays: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY_DELAYS
    webhook_timeout_seconds: float = 10.0
    webhook_ca_file: str | None = None
    """CA bundle for https webhook receivers (default: certifi's)."""
    webhook_connection_per_delivery: bool = False
    """Open a new connection for every webhook delivery instead of keeping one alive, so a
    load balancer in front of several instances spreads the deliveries, not only the
    connections (fal does not document which its senders do)."""
    tls: bool = False
    certfile: str | None = None
    keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.queue_seconds < 0 or self.run_seconds < 0:
            raise ValueError("queue_seconds and run_seconds must not be negative")
        if any(delay < 0 for delay in self.webhook_retry_delays):
            raise ValueError("webhook_retry_delays must not be negative")
        if self.tls and not (self.certfile and self.keyfile):
            raise ValueError("tls needs both certfile and keyfile")


@dataclass
class Truth:
    """What really happened to one training, for tests to compare the daemon against."""

    request_id: str
    endpoint: str
    """As submitted: owner/app plus the subpath, if any."""
    input: dict[str, Any]
    outcome: str
    """ok, fail, no_lora, payload_error, never or cancelled."""
    output: dict[str, Any] | None
    """What a result fetch answers with 200, or None when it never will."""
    completed_at: float | None
    """trio clock time of completion (planned or past); None while it never finishes."""
    webhook_url: str | None
    webhook_dropped: bool = False
    webhook_attempts: int = 0
    webhook_acks: int = 0
    webhook_signatures: list[str] = field(default_factory=list)
    """Per delivery attempt, in order: "good" or "bad" signature."""
    webhook_gave_up: bool = False
    cancel_requested: bool = False
    """A cancel was accepted (CANCELLATION_REQUESTED) for this request."""
    cancel_ignored: bool = False
    """The app got the cancel signal while running and finished anyway."""


@dataclass(frozen=True)
class Delivery:
    """One webhook delivery attempt, as the sender saw it."""

    request_id: str
    signature: str
    """"good", or "bad" when the attempt was signed over different bytes."""
    signature_header: str
    """The ``X-Fal-Webhook-Signature`` value sent (hex)."""
    body_sha256: str
    """Hex SHA-256 of the raw body sent."""
    status: int | None
    """The receiver's HTTP status; None when the attempt failed in transport."""
    error: str | None = None
    """The transport error (``repr``) when there was no HTTP answer."""

    @property
    def acked(self) -> bool:
        """The receiver answered 2xx."""
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class _Trainer:
    output: str  # "lora" or "finetune"
    required_field: str | None
    steps_field: str
    default_steps: int
    debug_output: bool = False
    submit_required: tuple[str, ...] = ()
    """Fields without which the submit itself is refused (422, FastAPI's shape)."""


_TRAINERS = {
    "fal-ai/flux-lora-portrait-trainer": _Trainer("lora", "images_data_url", "steps", 2500),
    "fal-ai/flux-lora-fast-training": _Trainer(
        "lora", "images_data_url", "steps", 1000, debug_output=True
    ),
    "fal-ai/flux-pro-trainer": _Trainer(
        "finetune",
        "data_url",
        "iterations",
        300,
        submit_required=("data_url", "finetune_comment"),
    ),
}
_GENERIC_TRAINER = _Trainer("lora", None, "steps", 1000)


@dataclass
class _Training:
    truth: Truth
    app_id: str
    index: int
    submitted_at: float
    wall_offset: float
    steps: int
    error_detail: list[dict[str, Any]] | None
    error_on_status: bool
    rng: random.Random
    files: dict[str, tuple[str, int]]
    config_bytes: bytes
    gateway_request_id: str
    """The body's ``gateway_request_id``; also the header's id when it differs."""
    ignores_cancel: bool = False
    removed: bool = False
    """A queued request removed by a cancel: fal no longer knows it."""
    cancelled: trio.Event = field(default_factory=trio.Event)

    @property
    def request_id(self) -> str:
        return self.truth.request_id


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]] | None = None
    """Server-sent events: called with a function that sends one chunk; ``body`` unused."""


def _json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Reply:
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return _Reply(status, json.dumps(payload).encode(), headers=extra)


def _fal_error(status: int, error_type: str, detail: str) -> _Reply:
    headers = {"X-Fal-Error-Type": error_type}
    if status == 429:
        headers["Retry-After"] = "1"
    return _json_reply(status, {"detail": detail, "error_type": error_type}, headers)


def _lora_bytes(request_id: str) -> bytes:
    """Deterministic stand-in for a LoRA file: a SHA-256 chain of the request id."""
    chunks = [
        hashlib.sha256(f"{request_id}:{i}".encode()).digest() for i in range(LORA_FILE_SIZE // 32)
    ]
    return b"".join(chunks)


class Simulator:
    """The FAL queue, webhook sender and JWKS server; serve it with :meth:`serve`."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.truth: dict[str, Truth] = {}
        self.stats: Counter[tuple[str, int]] = Counter()
        """Answers by (route, status code); routes: submit, status, status_stream, result,
        cancel, files, jwks, unknown."""
        self.hangs: Counter[str] = Counter()
        """Queue calls held ``api_timeout_seconds`` before answering (the timeout fault), by
        route."""
        self.deliveries: list[Delivery] = []
        self.open_streams = 0
        """Status streams being sent now (one ends at COMPLETED or when its client leaves)."""
        """Every webhook delivery attempt that ended, in the order they ended."""
        self.private_key, jwk = signing.generate_keypair()
        self.user_id = WEBHOOK_USER_ID
        """The ``X-Fal-Webhook-User-Id`` its webhooks are signed for (the fal account)."""
        self.jwks: list[dict[str, str]] = [jwk]
        self._trainings: dict[str, _Training] = {}
        self._submit_times: list[float] = []
        self._api_rng = random.Random(f"{self.config.seed}:api")
        self._base_url: str | None = None
        self._nursery: trio.Nursery | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def faults(self) -> Faults:
        """The live fault knobs (the same object as ``config.faults``)."""
        return self.config.faults

    @property
    def base_url(self) -> str:
        """``http(s)://127.0.0.1:PORT`` once :meth:`serve` has started."""
        if self._base_url is None:
            raise RuntimeError("the simulator is not serving yet")
        return self._base_url

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/.well-known/jwks.json"

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the base URL through ``task_status``, serve until cancelled."""
        hconfig = hypercorn.config.Config()
        hconfig.bind = [f"{self.config.host}:{self.config.port}"]
        hconfig.errorlog = logger
        if self.config.tls:
            hconfig.certfile = self.config.certfile
            hconfig.keyfile = self.config.keyfile
        verify: ssl.SSLContext | bool = True
        if self.config.webhook_ca_file:
            verify = ssl.create_default_context(cafile=self.config.webhook_ca_file)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's
        if self.config.webhook_connection_per_delivery:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        client = httpx.AsyncClient(
            timeout=self.config.webhook_timeout_seconds,
            verify=verify,
            trust_env=False,
            limits=limits,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._client = client
                self._nursery = nursery
                binds = await nursery.start(
                    partial(hypercorn.trio.serve, self.app, hconfig, mode="asgi")
                )
                self._base_url = binds[0]
                task_status.started(self._base_url)
        finally:
            self._nursery = None
            self._client = None
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application."""
        if scope["type"] == "lifespan":
            await http.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        route, reply = await self._dispatch(scope, body)
        self.stats[(route, reply.status)] += 1
        if reply.stream is not None:
            await _send_stream(reply, receive, send)
            return
        headers = [
            (b"content-type", reply.content_type.encode()),
            (b"content-length", str(len(reply.body)).encode()),
            *reply.headers,
        ]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        payload = b"" if scope["method"] == "HEAD" else reply.body
        await send({"type": "http.response.body", "body": payload})

    # -- routing ---------------------------------------------------------------------------

    async def _dispatch(self, scope: Scope, body: bytes) -> tuple[str, _Reply]:
        method: str = scope["method"]
        parts = [part for part in scope["path"].split("/") if part]
        query = parse_qs(scope["query_string"].decode("latin-1"))
        base = self._base_url or f"{scope['scheme']}://{_host_header(scope)}"

        if method == "GET" and parts == [".well-known", "jwks.json"]:
            if self.faults.jwks_down:
                return "jwks", _fal_error(503, "internal_error", "JWKS temporarily unavailable")
            return "jwks", _json_reply(
                200, signing.jwks_document(self.jwks), {"Cache-Control": "max-age=86400"}
            )
        if method in ("GET", "HEAD") and len(parts) == 3 and parts[0] == "files":
            return "files", self._file(parts[1], parts[2])

        queue_route = len(parts) >= 4 and parts[2] == "requests"
        if method == "POST" and len(parts) >= 2:
            route = "submit"
        elif queue_route and len(parts) == 4 and method == "GET":
            route = "result"
        elif queue_route and len(parts) == 5 and parts[4] == "status" and method == "GET":
            route = "status"
        elif queue_route and len(parts) == 5 and parts[4] == "cancel" and method == "PUT":
            route = "cancel"
        elif queue_route and parts[4:] == ["status", "stream"] and method == "GET":
            route = "status_stream"
        else:
            return "unknown", _json_reply(404, {"detail": "Not Found"})

        fault = await self._api_fault(route)
        if fault is not None:
            return route, fault
        if not _authorized(scope):
            return route, _json_reply(
                401, {"detail": "Missing or invalid credentials: use 'Authorization: Key <key>'"}
            )
        if route == "submit":
            return route, self._submit(parts, query, body, base)

        app_id = f"{parts[0]}/{parts[1]}"
        training = self._trainings.get(parts[3])
        now = trio.current_time()
        if (
            training is None
            or training.app_id != app_id
            or training.removed
            or self._expired(training, now)
        ):
            training = None
        if route == "status":
            return route, self._status(training, now, query, base)
        if route == "status_stream":
            return route, self._status_stream(training, query, base)
        if route == "result":
            return route, self._result(training, now)
        return route, self._cancel(training, now)

    async def _api_fault(self, route: str) -> _Reply | None:
        """An injected infrastructure failure for this queue call, if any."""
        faults = self.faults
        if faults.api_down:
            return _gateway_page(503)
        if self._api_rng.random() < faults.api_timeout_rate:
            self.hangs[route] += 1
            await trio.sleep(faults.api_timeout_seconds)
        if self._api_rng.random() < faults.api_error_rate:
            code = self._api_rng.choice((429, 502, 503, 504))
            return _rate_limited() if code == 429 else _gateway_page(code)
        if (
            route == "result"
            and faults.result_gateway_error > 0  # no draw when off: seeds stay as they were
            and self._api_rng.random() < faults.result_gateway_error
        ):
            return _gateway_page(self._api_rng.choice((502, 503)))
        return None

    # -- queue operations ------------------------------------------------------------------

    def _submit(
        self, parts: list[str], query: dict[str, list[str]], body: bytes, base: str
    ) -> _Reply:
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return _json_reply(
                422,
                {
                    "detail": [
                        {"loc": ["body"], "msg": "expected a JSON object", "type": "type_error"}
                    ]
                },
            )
        for name, allowed in (("sim_outcome", OUTCOMES), ("sim_cancel", CANCEL_BEHAVIOURS)):
            if payload.get(name) is not None and payload[name] not in allowed:
                return _json_reply(
                    422,
                    {
                        "detail": [
                            {
                                "loc": ["body", name],
                                "msg": f"{name} must be one of {', '.join(allowed)}",
                                "type": "value_error",
                            }
                        ]
                    },
                )
        forced, on_cancel = payload.get("sim_outcome"), payload.get("sim_cancel")

        webhook_url = (query.get("fal_webhook") or [None])[0]
        if webhook_url and self._nursery is None:
            raise RuntimeError("webhooks need the simulator running under serve()")
        app_id = f"{parts[0]}/{parts[1]}"
        trainer = _TRAINERS.get(app_id, _GENERIC_TRAINER)
        absent = [name for name in trainer.submit_required if name not in payload]
        if absent:  # refused before anything is queued, as FastAPI validates a body
            return _json_reply(
                422,
                {
                    "detail": [
                        {
                            "loc": ["body", name],
                            "msg": "field required",
                            "type": "value_error.missing",
                        }
                        for name in absent
                    ]
                },
            )
        request_id = str(uuid.uuid4())
        index = len(self._submit_times)
        rng = random.Random(f"{self.config.seed}:training:{index}")
        outcome, error_detail = self._draw_outcome(rng, forced, trainer, payload)
        now = trio.current_time()
        steps = payload.get(trainer.steps_field)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            steps = trainer.default_steps

        config_bytes = json.dumps(
            {"request_id": request_id, "endpoint": app_id, "steps": steps, "input": payload},
            sort_keys=True,
        ).encode()
        files: dict[str, tuple[str, int]] = {}
        output = None
        if outcome in ("ok", "no_lora", "payload_error"):
            output, files = _model_output(
                trainer, f"{base}/files/{request_id}", config_bytes, lora=outcome != "no_lora"
            )
        completed_at = None if outcome == "never" else now + self._duration
        # Its own generator, so that the knob leaves every other draw as it was.
        retried = random.Random(f"{self.config.seed}:gateway:{index}").random()
        gateway_id = str(uuid.uuid4()) if retried < self.faults.gateway_id_header else request_id
        truth = Truth(
            request_id=request_id,
            endpoint="/".join(parts),
            input=payload,
            outcome=outcome,
            output=output,
            completed_at=completed_at,
            webhook_url=webhook_url,
        )
        training = _Training(
            truth=truth,
            app_id=app_id,
            index=index,
            submitted_at=now,
            wall_offset=time.time() - now,
            steps=steps,
            error_detail=error_detail,
            error_on_status=rng.random() < 0.5,
            # Its own generator: the draws of existing seeds stay as they were.
            ignores_cancel=on_cancel == "ignore"
            or (
                on_cancel is None
                and random.Random(f"{self.config.seed}:cancel:{index}").random()
                < self.faults.ignore_cancel
            ),
            rng=rng,
            files=files,
            config_bytes=config_bytes,
            gateway_request_id=gateway_id,
        )
        self.truth[request_id] = truth
        self._trainings[request_id] = training
        self._submit_times.append(now)
        if webhook_url:
            if rng.random() < self.faults.drop_webhook:
                truth.webhook_dropped = True
            else:
                assert self._nursery is not None
                self._nursery.start_soon(self._deliver, training)

        urls = _urls(base, app_id, request_id)
        return _json_reply(
            200,
            {
                "status": "IN_QUEUE",
                "request_id": request_id,
                **urls,
                "gateway_request_id": gateway_id,
                "queue_position": self._queue_position(training, now),
            },
            {"x-fal-request-id": request_id},
        )

    def _draw_outcome(
        self,
        rng: random.Random,
        forced: str | None,
        trainer: _Trainer,
        payload: dict[str, Any],
    ) -> tuple[str, list[dict[str, Any]] | None]:
        """The outcome and, for "fail", the model's 422 detail. Draws are always taken in
        the same order so a seed reproduces the same trainings whatever the knobs."""
        faults = self.faults
        draws = {
            "never": rng.random() < faults.never_finish,
            "fail": rng.random() < faults.fail_training,
            "payload_error": rng.random() < faults.payload_error,
            "no_lora": rng.random() < faults.missing_lora,
        }
        missing = trainer.required_field is not None and trainer.required_field not in payload
        if forced is None and missing:
            forced = "fail"
        outcome = forced or next((name for name, hit in draws.items() if hit), "ok")
        if outcome != "fail":
            return outcome, None
        if missing:
            detail = {
                "loc": ["body", trainer.required_field],
                "msg": "field required",
                "type": "value_error.missing",
            }
        else:
            detail = {
                "loc": ["body", trainer.required_field or "input"],
                "msg": "Training failed: could not load the training images",
                "type": "value_error",
            }
        return outcome, [detail]

    @property
    def _duration(self) -> float:
        return self.config.queue_seconds + self.config.run_seconds

    def _expired(self, training: _Training, now: float) -> bool:
        expiry = self.faults.result_expiry_seconds
        done = training.truth.completed_at
        return expiry is not None and done is not None and now >= done + expiry

    def _phase(self, training: _Training, now: float) -> str:
        done = training.truth.completed_at
        if done is not None and now >= done:
            return "COMPLETED"
        if now >= training.submitted_at + self.config.queue_seconds:
            return "IN_PROGRESS"
        return "IN_QUEUE"

    def _queue_position(self, training: _Training, now: float) -> int:
        """Trainings submitted earlier and still queued (FIFO: all wait queue_seconds)."""
        left_queue = bisect.bisect_right(self._submit_times, now - self.config.queue_seconds)
        return max(0, training.index - left_queue)

    def _status(
        self,
        training: _Training | None,
        now: float,
        query: dict[str, list[str]],
        base: str,
    ) -> _Reply:
        if training is None:
            return _json_reply(404, {"detail": "Request not found"})
        phase = self._phase(training, now)
        want_logs = (query.get("logs") or ["0"])[0].lower() in {"1", "true"}
        body: dict[str, Any] = {
            "status": phase,
            "request_id": training.request_id,
            **_urls(base, training.app_id, training.request_id),
            "logs": self._logs(training, now) if want_logs else None,
            "metrics": {},
        }
        if phase == "IN_QUEUE":
            body["queue_position"] = self._queue_position(training, now)
            return _json_reply(202, body)
        if phase == "IN_PROGRESS":
            return _json_reply(202, body)
        started = training.submitted_at + self.config.queue_seconds
        body["metrics"] = {"inference_time": max(0.0, min(now, self._end(training)) - started)}
        outcome = training.truth.outcome
        if outcome == "cancelled":
            body["error"], body["error_type"] = CANCELLED_DETAIL, "client_cancelled"
        elif outcome in _FAILED_STATUS and training.error_on_status:
            body["error"] = _FAILED_STATUS[outcome]
            if outcome == "typed_error":
                body["error_type"] = TYPED_ERROR[1]
        return _json_reply(200, body)

    def _status_stream(
        self, training: _Training | None, query: dict[str, list[str]], base: str
    ) -> _Reply:
        """Server-sent events: the status object (as the status route answers it) whenever
        it changes, checked every ``STREAM_INTERVAL_SECONDS``, until COMPLETED."""
        if training is None:
            return _json_reply(404, {"detail": "Request not found"})

        async def events(emit: Callable[[bytes], Awaitable[None]]) -> None:
            last = None
            self.open_streams += 1
            try:
                while True:
                    now = trio.current_time()
                    status = json.loads(self._status(training, now, query, base).body)
                    if status != last:
                        await emit(b"data: " + json.dumps(status).encode() + b"\n\n")
                        last = status
                    if status["status"] == "COMPLETED":
                        return
                    await trio.sleep(STREAM_INTERVAL_SECONDS)
            finally:
                self.open_streams -= 1

        return _Reply(200, content_type="text/event-stream", stream=events)

    def _end(self, training: _Training) -> float:
        done = training.truth.completed_at
        return math.inf if done is None else done

    def _logs(self, training: _Training, now: float) -> list[dict[str, str]]:
        """Step logs up to now: one line per tenth of the run, then the closing line."""
        started = training.submitted_at + self.config.queue_seconds
        run = self.config.run_seconds
        until = min(now, self._end(training))
        outcome = training.truth.outcome
        if until < started:
            reached = 0
        elif run > 0:
            # The epsilon keeps the last checkpoint when until == started + run in floats.
            reached = min(LOG_CHECKPOINTS, int((until - started) / run * LOG_CHECKPOINTS + 1e-9))
        else:
            reached = LOG_CHECKPOINTS
        if outcome == "never":
            reached = min(reached, LOG_CHECKPOINTS - 1)
        logs = []
        for k in range(1, reached + 1):
            at = started + run * k / LOG_CHECKPOINTS
            step = training.steps * k // LOG_CHECKPOINTS
            logs.append(self._log(training, at, f"step {step}/{training.steps}", "INFO"))
        if now >= self._end(training):
            if outcome == "cancelled":
                logs.append(self._log(training, until, CANCELLED_DETAIL, "WARNING"))
            elif outcome == "fail":
                detail = training.error_detail or []
                message = detail[0]["msg"] if detail else "Training failed"
                logs.append(self._log(training, until, message, "ERROR"))
            elif outcome == "error500":
                logs.append(self._log(training, until, APP_ERROR_DETAIL, "ERROR"))
            elif outcome == "typed_error":
                logs.append(self._log(training, until, TYPED_ERROR[2], "ERROR"))
            else:
                logs.append(self._log(training, until, "Training completed", "INFO"))
        return logs

    def _log(self, training: _Training, at: float, message: str, level: str) -> dict[str, str]:
        stamp = datetime.fromtimestamp(at + training.wall_offset, UTC).isoformat()
        return {"message": message, "level": level, "source": "user", "timestamp": stamp}

    def _result(self, training: _Training | None, now: float) -> _Reply:
        if training is None:
            return _json_reply(404, {"detail": "Request not found"})
        if self._phase(training, now) != "COMPLETED":
            return self._not_ready()
        truth = training.truth
        if truth.outcome == "fail":
            return _json_reply(422, {"detail": training.error_detail})
        if truth.outcome == "error500":
            return _json_reply(500, {"detail": APP_ERROR_DETAIL})
        if truth.outcome == "typed_error":
            return _fal_error(*TYPED_ERROR)
        if truth.outcome == "cancelled":
            return _fal_error(499, "client_cancelled", CANCELLED_DETAIL)
        return _json_reply(200, truth.output)

    def _not_ready(self) -> _Reply:
        """The result call's answer before completion (undocumented: see not_ready_answer)."""
        wording = self.faults.not_ready_answer
        if wording == "mixed":
            wording = self._api_rng.choice(NOT_READY_ANSWERS)
        if wording == "not_completed":
            return _json_reply(400, {"detail": "Request is not completed"})
        if wording == "not_found":
            return _json_reply(404, {"detail": "Request not found"})
        if wording == "bare_422":
            return _Reply(422)
        return _json_reply(400, {"detail": "Request is still in progress"})

    def _cancel(self, training: _Training | None, now: float) -> _Reply:
        """A queued request is removed; a running one gets the signal and its app decides
        (fal-api.md, cancel)."""
        if training is None:
            return _json_reply(404, {"status": "NOT_FOUND"})
        phase = self._phase(training, now)
        if phase == "COMPLETED":
            return _json_reply(400, {"status": "ALREADY_COMPLETED"})
        truth = training.truth
        truth.cancel_requested = True
        if phase == "IN_PROGRESS" and training.ignores_cancel:
            truth.cancel_ignored = True  # it finishes as it would have, result and all
            return _json_reply(202, {"status": "CANCELLATION_REQUESTED"})
        truth.outcome, truth.output, truth.completed_at = "cancelled", None, now
        training.removed = phase == "IN_QUEUE"
        training.files.clear()
        training.cancelled.set()
        return _json_reply(202, {"status": "CANCELLATION_REQUESTED"})

    def _file(self, request_id: str, name: str) -> _Reply:
        training = self._trainings.get(request_id)
        now = trio.current_time()
        if (
            training is None
            or name not in training.files
            or self._phase(training, now) != "COMPLETED"
            or self._expired(training, now)
        ):
            return _json_reply(404, {"detail": "File not found"})
        content_type, _size = training.files[name]
        data = training.config_bytes if name == CONFIG_FILE_NAME else _lora_bytes(request_id)
        return _Reply(200, data, content_type=content_type)

    # -- webhooks --------------------------------------------------------------------------

    async def _deliver(self, training: _Training) -> None:
        """Wait for completion (or a cancel), then POST the webhook with fal's retries."""
        with trio.move_on_at(self._end(training)):
            await training.cancelled.wait()
        if training.removed:  # a queued request removed by a cancel never ran
            return
        extra = self.faults.delay_webhook_seconds
        if extra > 0:
            await trio.sleep(training.rng.uniform(0, extra))
        body = json.dumps(self._webhook_body(training)).encode()
        delays = self.config.webhook_retry_delays
        for attempt in range(len(delays) + 1):
            if await self._send_webhook(training, body):
                break
            if attempt < len(delays):
                await trio.sleep(delays[attempt])
        else:
            training.truth.webhook_gave_up = True
            logger.info("webhook for %s given up", training.request_id)
            return
        if training.rng.random() < self.faults.duplicate_webhook:
            await self._send_webhook(training, body)

    def _webhook_body(self, training: _Training) -> dict[str, Any]:
        truth = training.truth
        body: dict[str, Any] = {
            "request_id": truth.request_id,
            "gateway_request_id": training.gateway_request_id,
        }
        if truth.outcome == "fail":
            body.update(
                status="ERROR",
                error="Invalid status code: 422",
                payload={"detail": training.error_detail},
            )
        elif truth.outcome == "error500":
            body.update(
                status="ERROR",
                error="Invalid status code: 500",
                payload={"detail": APP_ERROR_DETAIL},
            )
        elif truth.outcome == "typed_error":
            body.update(
                status="ERROR",
                error=f"Invalid status code: {TYPED_ERROR[0]}",
                payload={"detail": TYPED_ERROR[2], "error_type": TYPED_ERROR[1]},
            )
        elif truth.outcome == "cancelled":
            body.update(
                status="ERROR",
                error="Invalid status code: 499",
                payload={"detail": CANCELLED_DETAIL, "error_type": "client_cancelled"},
            )
        elif truth.outcome == "payload_error":
            body.update(status="OK", payload=None, payload_error=PAYLOAD_ERROR_TEXT)
        else:
            body.update(status="OK", payload=truth.output)
        return body

    async def _send_webhook(self, training: _Training, body: bytes) -> bool:
        """One delivery attempt; True when the receiver answered 2xx."""
        truth = training.truth
        assert truth.webhook_url is not None and self._client is not None
        bad = training.rng.random() < self.faults.bad_signature
        signed = body + b" " if bad else body
        headers = signing.sign_webhook(
            self.private_key, training.gateway_request_id, self.user_id, int(time.time()), signed
        )
        headers["Content-Type"] = "application/json"
        truth.webhook_attempts += 1
        truth.webhook_signatures.append("bad" if bad else "good")
        record = partial(
            Delivery,
            truth.request_id,
            "bad" if bad else "good",
            headers[signing.HEADER_SIGNATURE],
            hashlib.sha256(body).hexdigest(),
        )
        try:
            response = await self._client.post(truth.webhook_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self.deliveries.append(record(None, repr(exc)))
            logger.info("webhook for %s failed: %r", truth.request_id, exc)
            return False
        self.deliveries.append(record(response.status_code))
        if not response.is_success:
            logger.info("webhook for %s answered %d", truth.request_id, response.status_code)
            return False
        truth.webhook_acks += 1
        return True


async def _send_stream(reply: _Reply, receive: Receive, send: Send) -> None:
    """Send ``reply``'s events as they come, until they end or the client goes away."""
    assert reply.stream is not None
    headers = [(b"content-type", reply.content_type.encode()), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})

    async def emit(chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await reply.stream(emit)
        await send({"type": "http.response.body", "body": b""})
        nursery.cancel_scope.cancel()


def _urls(base: str, app_id: str, request_id: str) -> dict[str, str]:
    """Response, status and cancel URLs: owner/app only, never the subpath."""
    response_url = f"{base}/{app_id}/requests/{request_id}"
    return {
        "response_url": response_url,
        "status_url": f"{response_url}/status",
        "cancel_url": f"{response_url}/cancel",
    }


def _model_output(
    trainer: _Trainer, files_base: str, config_bytes: bytes, *, lora: bool
) -> tuple[dict[str, Any], dict[str, tuple[str, int]]]:
    """The trainer's success output and the files it points at (name -> type, size)."""
    if trainer.output == "finetune":
        return ({"finetune_id": str(uuid.uuid4())} if lora else {}), {}
    files = {CONFIG_FILE_NAME: ("application/json", len(config_bytes))}
    if lora:
        files[LORA_FILE_NAME] = ("application/octet-stream", LORA_FILE_SIZE)
    described = {
        name: {
            "url": f"{files_base}/{name}",
            "content_type": content_type,
            "file_name": name,
            "file_size": size,
        }
        for name, (content_type, size) in files.items()
    }
    output: dict[str, Any] = {}
    if lora:
        output["diffusers_lora_file"] = described[LORA_FILE_NAME]
    output["config_file"] = described[CONFIG_FILE_NAME]
    if trainer.debug_output:
        output["debug_preprocessed_output"] = None
    return output, files


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _host_header(scope: Scope) -> str:
    host = _header(scope, b"host")
    if host:
        return host
    server_host, server_port = scope["server"]
    return f"{server_host}:{server_port}"


def _authorized(scope: Scope) -> bool:
    value = _header(scope, b"authorization") or ""
    scheme, _, key = value.partition(" ")
    return scheme == "Key" and bool(key.strip())


# -- CLI glue (wired into `trainguard simulate`) ---------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    defaults = SimConfig()
    parser.add_argument("--host", default=defaults.host, help="address to bind (loopback)")
    parser.add_argument("--port", type=int, default=defaults.port, help="port; 0 picks one")
    parser.add_argument(
        "--queue-seconds", type=float, default=defaults.queue_seconds, help="time IN_QUEUE"
    )
    parser.add_argument(
        "--run-seconds", type=float, default=defaults.run_seconds, help="time IN_PROGRESS"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for fault draws")
    parser.add_argument("--tls", action="store_true", help="serve https (needs cert and key)")
    parser.add_argument("--certfile", help="PEM certificate chain for --tls")
    parser.add_argument("--keyfile", help="PEM private key for --tls")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a fault knob, e.g. fail_training=0.2 or jwks_down=true (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """A SimConfig from parsed arguments; raises ValueError on a bad --fault."""
    faults = Faults(**dict(parse_fault(spec) for spec in args.fault))
    return SimConfig(
        host=args.host,
        port=args.port,
        queue_seconds=args.queue_seconds,
        run_seconds=args.run_seconds,
        seed=args.seed,
        faults=faults,
        tls=args.tls,
        certfile=args.certfile,
        keyfile=args.keyfile,
    )


async def run_from_args(args: argparse.Namespace) -> None:
    """Serve the simulator until cancelled; print its base and JWKS URLs once ready."""
    simulator = Simulator(config_from_args(args))
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.serve)
        print(f"FAL simulator at {simulator.base_url} (JWKS {simulator.jwks_url})", flush=True)
