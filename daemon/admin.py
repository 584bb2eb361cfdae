"""The admin HTTP API, served on the metrics listener under ``/v1`` (and ``/openapi.json``).

A bearer token from ``TRAINGUARD_ADMIN_TOKEN`` guards every route but the OpenAPI document;
without a token the API is served only on a loopback listener (the daemon refuses to start
otherwise) and only reads: any local process, or a browser page on this host, could otherwise
submit paid trainings or cancel them (the CLI does not need the API: it opens the database).
Every action goes through ``daemon.actions``, the same code as the CLI, and so through
reconcile: the API never writes a training itself.

Whatever the token, a request is refused before it is read when its ``Host`` is a name other
than ``localhost``, the listener's own or one of ``[metrics] allowed_hosts`` (421: DNS
rebinding; an IP address cannot be rebound), and a state-changing one when its ``Origin`` is not the ``Host`` it was sent to
(403: another page's request) or its ``Content-Type`` is not ``application/json`` (415: the
only types a page may send cross-origin without asking are form and text types).

The routes are one table, ``ROUTES``: the router, the accepted query and body fields and the
OpenAPI document all come from it. No routing library: Starlette runs on trio (through anyio)
but documents a route from YAML in its docstring, apart from the checks again; FastAPI
generates the document from types but brings pydantic and its own error bodies, which would
change the answers scripts rely on. The table and its matcher are about 60 lines.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import trio

from trainguard import actions, http
from trainguard.cluster import Cluster, instance_as_dict
from trainguard.config import ConfigError, Settings
from trainguard.errors import ApiError
from trainguard.fal import FalClient, FalRequestError
from trainguard.logs import WARN, get_logger
from trainguard.reconcile import AlreadyTracked, Reconciler, view_as_dict
from trainguard.store import STATUSES, Store, fal_user_ids

log = get_logger(component="admin")

TOKEN_ENV = "TRAINGUARD_ADMIN_TOKEN"
MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_SECONDS = 10.0  # for the whole body, as the webhook listener does
MAX_PAGE = 500
READ_METHODS = frozenset({"GET", "HEAD"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Services(Protocol):
    """What the API needs from the running daemon."""

    settings: Settings
    store: Store | None
    reconciler: Reconciler | None
    fal: FalClient | None
    cluster: Cluster | None


def check_listen_allowed(listen: str, token: str | None) -> None:
    """Refuse a non-loopback admin listener without a token (a ConfigError names why)."""
    if token:
        return
    host, _ = http.parse_listen(listen)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(
            f"metrics.listen: {listen} is not a loopback address, and the admin API on it "
            f"needs a token: set {TOKEN_ENV}"
        )


Handler = Callable[["Request"], Awaitable[tuple[int, Any]]]


class Request:
    def __init__(
        self, scope: Mapping[str, Any], body: bytes, params: dict[str, str], route: Route
    ) -> None:
        self.scope = scope
        self.body = body
        self.params = params
        self.route = route
        self.query = {
            k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()
        }

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(
                self.body or b"null", parse_constant=_not_a_number, parse_float=_finite
            )
        except _NotANumber as exc:
            raise ApiError(
                400, "bad_json", f"{exc}: not a finite number (NaN and Infinity are not JSON)"
            ) from None
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the body is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
        if self.route.body is not None:
            _only(data, set(self.route.body.fields))
        return data


class _NotANumber(Exception):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON (and FAL) does not."""


def _not_a_number(constant: str) -> Any:
    raise _NotANumber(constant)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise _NotANumber(text)
    return value


def _string(data: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "bad_request", f"{key}: a non-empty string is required")
    return value


def _only(data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, "bad_request", f"{unknown[0]}: unknown field")


class AdminApi:
    """The ``/v1`` routes as an ASGI app."""

    def __init__(self, services: Services, token: str | None) -> None:
        self.services = services
        self.token = token

    # -- plumbing ----------------------------------------------------------------------
    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """The route for ``method`` and ``path`` with its path parameters, and whether any
        route has that path (405 rather than 404). A parameter never matches a segment that
        another route of the same length has literally there (``track`` is not an id)."""
        parts = tuple(p for p in path.split("/") if p)
        path_known = False
        for route in ROUTES:
            params = route.match(parts)
            if params is None:
                continue
            path_known = True
            if route.method == method:
                return route, params, True
        return None, {}, path_known

    def _check_origin(self, scope: Mapping[str, Any]) -> None:
        """Refuse a request that a page of another site (or a rebound name) may have sent."""
        headers = _headers(scope)
        host = headers.get("host")
        if host is not None and not self._own_host(host):
            raise ApiError(421, "misdirected", "the Host header does not name this listener")
        if scope["method"] in READ_METHODS:
            return
        origin = headers.get("origin")
        if origin is not None and (host is None or not _same_origin(origin, host)):
            raise ApiError(403, "foreign_origin", "a request from another origin is refused")
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")

    def _own_host(self, host: str) -> bool:
        name = _host_name(host)
        if name is None:
            return False
        if name == "localhost" or _is_ip(name):
            return True
        metrics = self.services.settings.metrics
        own = {http.parse_listen(metrics["listen"])[0].lower().rstrip(".")}
        own.update(n.lower() for n in metrics.get("allowed_hosts", ()))
        return name in own

    def _authorized(self, scope: Mapping[str, Any]) -> bool:
        if not self.token:
            return True
        header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        )

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/openapi.json" and method in ("GET", "HEAD"):
            await _send_json(send, 200, openapi(), head=method == "HEAD")
            return
        route, params, known = self._match(method, path)
        try:
            if route is None:
                raise ApiError(
                    405 if known else 404,
                    "not_found",
                    "no such route" if not known else "method not allowed",
                )
            self._check_origin(scope)
            if not self._authorized(scope):
                raise ApiError(401, "unauthorized", "a valid bearer token is required")
            if not self.token and method not in READ_METHODS:
                raise ApiError(
                    403,
                    "read_only",
                    f"without {TOKEN_ENV} the admin API only reads; set it to change "
                    "trainings here, or use the trainguard CLI",
                )
            body = await _read_body(receive)
            if self.services.reconciler is None:
                raise ApiError(503, "not_ready", "the daemon is still starting")
            handler: Handler = getattr(self, route.handler)
            status, payload = await handler(Request(scope, body, params, route))
        except ApiError as exc:
            extra = ((b"www-authenticate", b"Bearer"),) if exc.status == 401 else ()
            await _send_json(
                send, exc.status, {"error": exc.code, "detail": exc.detail}, headers=extra
            )
            return
        except Exception as exc:  # a bug: logged, and still answered in the documented form
            log.error(f"{WARN} admin API request failed", method=method, path=path, exc_info=exc)
            detail = {"error": "internal", "detail": f"{type(exc).__name__}: {exc}"}
            await _send_json(send, 500, detail)
            return
        await _send_json(send, status, payload)

    # -- routes ------------------------------------------------------------------------
    async def list_trainings(self, request: Request) -> tuple[int, Any]:
        q = request.query
        _only(q, {p["name"] for p in request.route.query})
        if "status" in q and q["status"] not in STATUSES:
            raise ApiError(400, "bad_request", f"status: one of {', '.join(STATUSES)}")
        limit = _int(q.get("limit", "50"), "limit", 1, MAX_PAGE)
        offset = _int(q.get("offset", "0"), "offset", 0, 10**9)
        store = self.services.store
        assert store is not None
        views = await store.trainings(
            status=q.get("status"), name=q.get("name"), limit=limit + 1, offset=offset
        )
        items = [view_as_dict(v) for v in views[:limit]]
        return 200, {"items": items, "next_offset": offset + limit if len(views) > limit else None}

    async def get_training(self, request: Request) -> tuple[int, Any]:
        store = self.services.store
        assert store is not None
        view = await store.training(request.params["request_id"])
        if view is None:
            raise ApiError(404, "not_found", f"no training {request.params['request_id']!r}")
        users = await store.read(fal_user_ids, view.request_id)
        return 200, {
            **view_as_dict(view),
            "fal_user_id": users.get(view.request_id),
            "events": await store.events(view.request_id),
        }

    async def submit(self, request: Request) -> tuple[int, Any]:
        data = request.json()
        s = self.services
        training_type = self._type(data)
        extra = data.get("arguments") or {}
        if not isinstance(extra, dict):
            raise ApiError(400, "bad_request", "arguments: must be an object")
        trigger = _string(data, "trigger", required=False)
        arguments = actions.training_arguments(
            s.settings, training_type, str(_string(data, "images_url")), trigger, extra
        )
        assert s.fal is not None and s.reconciler is not None
        try:
            view = await actions.submit(
                s.settings,
                s.fal,
                s.reconciler,
                training_type=training_type,
                name=str(_string(data, "name")),
                arguments=arguments,
                trigger=trigger,
            )
        except actions.MissingInput as exc:
            raise ApiError(422, "missing_input", str(exc)) from None
        except FalRequestError as exc:
            raise ApiError(502, "fal_refused", str(exc)) from None
        except actions.NotRecorded as exc:
            raise ApiError(500, "not_recorded", str(exc)) from None
        return 201, view_as_dict(view)

    async def track(self, request: Request) -> tuple[int, Any]:
        data = request.json()
        s = self.services
        assert s.reconciler is not None
        try:
            view = await actions.track(
                s.settings,
                s.reconciler,
                request_id=str(_string(data, "request_id")),
                training_type=self._type(data),
                name=str(_string(data, "name")),
                trigger=_string(data, "trigger", required=False),
            )
        except AlreadyTracked as exc:
            raise ApiError(409, "already_tracked", str(exc)) from None
        except actions.BadRequestId as exc:
            raise ApiError(422, "bad_request_id", str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        return 201, view_as_dict(view)

    async def cancel(self, request: Request) -> tuple[int, Any]:
        s = self.services
        assert s.fal is not None and s.reconciler is not None
        try:
            view = await actions.cancel(
                s.settings, s.fal, s.reconciler, request.params["request_id"]
            )
        except actions.NotFound as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except actions.Conflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        except actions.Unavailable as exc:
            raise ApiError(503, "fal_unavailable", str(exc)) from None
        return 200, {**view_as_dict(view), "cancel": "requested"}

    async def recheck(self, request: Request) -> tuple[int, Any]:
        s = self.services
        assert s.reconciler is not None
        try:
            view = await actions.recheck(s.reconciler, request.params["request_id"])
        except actions.NotFound as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except actions.Conflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return 202, view_as_dict(view)

    async def list_instances(self, request: Request) -> tuple[int, Any]:
        cluster = self.services.cluster
        if cluster is None:
            raise ApiError(503, "not_ready", "the daemon is still starting")
        return 200, {"items": [instance_as_dict(row) for row in await cluster.instances()]}

    def _type(self, data: Mapping[str, Any]) -> str:
        name = str(_string(data, "type"))
        if name not in self.services.settings.training_types:
            known = ", ".join(sorted(self.services.settings.training_types))
            raise ApiError(400, "bad_request", f"type: unknown training type (known: {known})")
        return name


def _headers(scope: Mapping[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}


def _host_name(host: str) -> str | None:
    """The lower-case name or address in a ``Host`` value (``name[:port]``, ``[v6][:port]``)."""
    if any(c in host for c in "@/?#\\"):
        return None
    try:
        parts = urlsplit(f"//{host.strip()}")
        valid = parts.port is None or parts.port > 0  # .port raises on a malformed one
    except ValueError:
        return None
    name = (parts.hostname or "").rstrip(".")
    return name if valid and name else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _same_origin(origin: str, host: str) -> bool:
    """Whether ``Origin`` (``scheme://name[:port]``) names the ``Host`` the request went to."""
    try:
        o = urlsplit(origin.strip())
        h = urlsplit(f"//{host.strip()}")
        o_port = o.port or _DEFAULT_PORTS.get(o.scheme)
        h_port = h.port or _DEFAULT_PORTS.get(o.scheme)
    except ValueError:
        return False
    return (
        o.scheme in _DEFAULT_PORTS
        and o.hostname is not None
        and o.hostname == h.hostname
        and o_port == h_port
    )


def _int(raw: str, name: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"{name}: an integer is required") from None
    if not low <= value <= high:
        raise ApiError(400, "bad_request", f"{name}: between {low} and {high}")
    return value


async def _read_body(receive: Any) -> bytes:
    """The whole body within ``BODY_TIMEOUT_SECONDS`` (a trickling client gets 408)."""
    with trio.move_on_after(BODY_TIMEOUT_SECONDS):
        try:
            body = await http.read_body(receive, MAX_BODY_BYTES)
        except http.BodyTooLarge as exc:
            raise ApiError(413, "too_large", str(exc)) from None
        return body or b""
    raise ApiError(408, "timeout", f"body not received within {BODY_TIMEOUT_SECONDS:g} s")


async def _send_json(
    send: Any,
    status: int,
    payload: Any,
    *,
    head: bool = False,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode() + b"\n"
    await http.respond(
        send, status, body, content_type="application/json", head=head, headers=headers
    )


# -- the OpenAPI document ------------------------------------------------------------------
_NULLABLE_STRING = {"type": "string", "nullable": True}
_TRAINING = {
    "type": "object",
    "required": [
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
    ],
    "properties": {
        "request_id": {"type": "string"},
        "name": {"type": "string"},
        "training_type": {"type": "string"},
        "endpoint": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "trigger_phrase": _NULLABLE_STRING,
        "lora_url": _NULLABLE_STRING,
        "config_url": _NULLABLE_STRING,
        "finetune_id": _NULLABLE_STRING,
        "is_fallback": {"type": "boolean"},
        "fallback_layer": _NULLABLE_STRING,
        "fallback_kind": _NULLABLE_STRING,
        "fallback_reason": _NULLABLE_STRING,
        "result_layer": _NULLABLE_STRING,
        "failure_detail": _NULLABLE_STRING,
        "last_error": _NULLABLE_STRING,
        "attempts": {"type": "integer"},
        "missing_fields": {"type": "array", "items": {"type": "string"}},
        "submitted_at": {"type": "string", "format": "date-time"},
        "started_at": {**_NULLABLE_STRING, "format": "date-time"},
        "completed_at": {**_NULLABLE_STRING, "format": "date-time"},
        "last_checked_at": {**_NULLABLE_STRING, "format": "date-time"},
        "next_check_at": {**_NULLABLE_STRING, "format": "date-time"},
        "deadline_at": {**_NULLABLE_STRING, "format": "date-time"},
        "cancel_requested_at": {**_NULLABLE_STRING, "format": "date-time"},
        "result_errors": {"type": "integer"},
        "cancel": {"type": "string", "enum": ["requested"]},
    },
}
_EVENT = {
    "type": "object",
    "required": ["at", "layer", "kind"],
    "properties": {
        "at": {"type": "number"},
        "layer": {"type": "string"},
        "kind": {"type": "string"},
        "from_status": _NULLABLE_STRING,
        "to_status": _NULLABLE_STRING,
        "detail": {"nullable": True},
    },
}
_INSTANCE = {
    "type": "object",
    "required": [
        "id",
        "host",
        "pid",
        "version",
        "started_at",
        "heartbeat_at",
        "webhook_listen",
        "metrics_listen",
        "roles",
    ],
    "properties": {
        "id": {"type": "string"},
        "host": {"type": "string"},
        "pid": {"type": "integer"},
        "version": {"type": "string"},
        "started_at": {"type": "string", "format": "date-time"},
        "heartbeat_at": {"type": "string", "format": "date-time"},
        "webhook_listen": _NULLABLE_STRING,
        "metrics_listen": _NULLABLE_STRING,
        "roles": {"type": "array", "items": {"type": "string"}},
    },
}
_ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, ref: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


_ID = {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
_COMMON = {
    "401": _error("missing or wrong bearer token"),
    "408": _error("the body did not arrive in time"),
    "403": _error("a change without a token configured, or from another origin"),
    "413": _error("body too large"),
    "415": _error("a change whose Content-Type is not application/json"),
    "421": _error("a Host header that does not name this listener"),
    "503": _error("not ready"),
}


@dataclass(frozen=True)
class Body:
    """A JSON object body: its ``required`` string fields and ``optional`` ones as
    name -> JSON type; no other field is accepted (the API answers 400 naming it)."""

    required: tuple[str, ...]
    optional: Mapping[str, str] = field(default_factory=dict)

    @property
    def fields(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)

    def openapi(self) -> dict[str, Any]:
        properties = {name: {"type": "string"} for name in self.required}
        properties.update({name: {"type": kind} for name, kind in self.optional.items()})
        schema = {
            "type": "object",
            "required": list(self.required),
            "additionalProperties": False,
            "properties": properties,
        }
        return {"required": True, "content": {"application/json": {"schema": schema}}}


@dataclass(frozen=True)
class Route:
    """One route of the admin API: how it is matched, which ``AdminApi`` method answers
    it, and what the OpenAPI document says of it (generated from this table, so the
    document, the router and the field checks cannot drift apart)."""

    method: str
    path: str  # "/v1/trainings/{request_id}": one {name} per parameter segment
    handler: str  # the name of the AdminApi method
    summary: str
    responses: Mapping[str, dict[str, Any]]
    query: tuple[dict[str, Any], ...] = ()
    body: Body | None = None

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(p for p in self.path.split("/") if p)

    def match(self, parts: tuple[str, ...]) -> dict[str, str] | None:
        """The path parameters when ``parts`` is this route's path, else None."""
        pattern = self.segments
        if len(pattern) != len(parts):
            return None
        params: dict[str, str] = {}
        for i, (want, got) in enumerate(zip(pattern, parts, strict=True)):
            if want.startswith("{"):
                if got in _LITERALS.get((len(parts), i), ()):
                    return None
                params[want.strip("{}")] = got
            elif want != got:
                return None
        return params

    def operation(self) -> dict[str, Any]:
        op: dict[str, Any] = {"summary": self.summary}
        parameters = [_ID] if "{request_id}" in self.path else []
        parameters += [{**p, "in": "query"} for p in self.query]
        if parameters:
            op["parameters"] = parameters
        if self.body is not None:
            op["requestBody"] = self.body.openapi()
        op["responses"] = {**self.responses, **_COMMON}
        return op


_TRAINING_REF = "#/components/schemas/Training"
ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/trainings",
        "list_trainings",
        "List trainings",
        {
            "200": _ok("a page of trainings", "#/components/schemas/Page"),
            "400": _error("bad query"),
        },
        query=(
            {"name": "status", "schema": {"type": "string", "enum": list(STATUSES)}},
            {"name": "name", "schema": {"type": "string"}},
            {"name": "limit", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
            {"name": "offset", "schema": {"type": "integer", "minimum": 0}},
        ),
    ),
    Route(
        "POST",
        "/v1/trainings",
        "submit",
        "Submit a training to FAL and record it",
        {
            "201": _ok("recorded", _TRAINING_REF),
            "400": _error("bad request"),
            "422": _error("a required input field is missing (nothing was sent)"),
            "500": _error("FAL accepted it but it could not be recorded"),
            "502": _error("FAL refused the submit"),
        },
        body=Body(("type", "name", "images_url"), {"trigger": "string", "arguments": "object"}),
    ),
    Route(
        "POST",
        "/v1/trainings/track",
        "track",
        "Adopt a request submitted elsewhere",
        {
            "201": _ok("adopted", _TRAINING_REF),
            "400": _error("bad request"),
            "409": _error("already tracked"),
            "422": _error("a request id that could never be fetched or cancelled"),
        },
        body=Body(("request_id", "type", "name"), {"trigger": "string"}),
    ),
    Route(
        "GET",
        "/v1/trainings/{request_id}",
        "get_training",
        "One training with its event history",
        {
            "200": _ok("the training", "#/components/schemas/TrainingDetail"),
            "404": _error("unknown"),
        },
    ),
    Route(
        "POST",
        "/v1/trainings/{request_id}/cancel",
        "cancel",
        "Ask FAL to cancel; CANCELLED once FAL shows it will not finish",
        {
            "200": _ok("cancel requested (FAL may still finish it)", _TRAINING_REF),
            "404": _error("unknown"),
            "409": _error("already finished"),
        },
    ),
    Route(
        "POST",
        "/v1/trainings/{request_id}/recheck",
        "recheck",
        "Check this training with FAL now",
        {
            "202": _ok("scheduled", _TRAINING_REF),
            "404": _error("unknown"),
            "409": _error("cancelled"),
        },
    ),
    Route(
        "GET",
        "/v1/instances",
        "list_instances",
        "The live trainguard instances on this database, with the leader roles each holds",
        {"200": _ok("the live instances", "#/components/schemas/Instances")},
    ),
)
#: Per (number of segments, position), the literal segments some route has there.
_LITERALS: dict[tuple[int, int], set[str]] = {}
for _route in ROUTES:
    for _i, _segment in enumerate(_route.segments):
        if not _segment.startswith("{"):
            _LITERALS.setdefault((len(_route.segments), _i), set()).add(_segment)


def openapi() -> dict[str, Any]:
    """The OpenAPI document, generated from ``ROUTES``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = route.operation()
    return {
        "openapi": "3.0.3",
        "info": {"title": "trainguard admin API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Training": _TRAINING,
                "TrainingDetail": {
                    "allOf": [
                        {"$ref": _TRAINING_REF},
                        {
                            "type": "object",
                            "required": ["events"],
                            "properties": {
                                "events": {"type": "array", "items": _EVENT},
                                "fal_user_id": _NULLABLE_STRING,
                            },
                        },
                    ]
                },
                "Page": {
                    "type": "object",
                    "required": ["items", "next_offset"],
                    "properties": {
                        "items": {"type": "array", "items": {"$ref": _TRAINING_REF}},
                        "next_offset": {"type": "integer", "nullable": True},
                    },
                },
                "Instance": _INSTANCE,
                "Instances": {
                    "type": "object",
                    "required": ["items"],
                    "properties": {
                        "items": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Instance"},
                        }
                    },
                },
                "Error": _ERROR,
            },
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
