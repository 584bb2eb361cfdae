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
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import trio

from trainguard import actions, http
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
    def __init__(self, scope: Mapping[str, Any], body: bytes, params: dict[str, str]) -> None:
        self.scope = scope
        self.body = body
        self.params = params
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
        self.routes: list[tuple[str, tuple[str, ...], Handler]] = [
            ("GET", ("v1", "trainings"), self.list_trainings),
            ("POST", ("v1", "trainings"), self.submit),
            ("POST", ("v1", "trainings", "track"), self.track),
            ("GET", ("v1", "trainings", "{id}"), self.get_training),
            ("POST", ("v1", "trainings", "{id}", "cancel"), self.cancel),
            ("POST", ("v1", "trainings", "{id}", "recheck"), self.recheck),
        ]

    # -- plumbing ----------------------------------------------------------------------
    def _match(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], bool]:
        parts = tuple(p for p in path.split("/") if p)
        path_known = False
        for route_method, pattern, handler in self.routes:
            if len(pattern) != len(parts):
                continue
            params: dict[str, str] = {}
            for want, got in zip(pattern, parts, strict=True):
                if want == "{id}":
                    if got == "track" and len(pattern) == 3:
                        break
                    params["id"] = got
                elif want != got:
                    break
            else:
                path_known = True
                if route_method == method:
                    return handler, params, True
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
        handler, params, known = self._match(method, path)
        try:
            if handler is None:
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
            status, payload = await handler(Request(scope, body, params))
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
        _only(q, {"status", "name", "limit", "offset"})
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
        view = await store.training(request.params["id"])
        if view is None:
            raise ApiError(404, "not_found", f"no training {request.params['id']!r}")
        users = await store.read(fal_user_ids, view.request_id)
        return 200, {
            **view_as_dict(view),
            "fal_user_id": users.get(view.request_id),
            "events": await store.events(view.request_id),
        }

    async def submit(self, request: Request) -> tuple[int, Any]:
        data = request.json()
        _only(data, {"type", "name", "images_url", "trigger", "arguments"})
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
        _only(data, {"request_id", "type", "name", "trigger"})
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
            view = await actions.cancel(s.settings, s.fal, s.reconciler, request.params["id"])
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
            view = await actions.recheck(s.reconciler, request.params["id"])
        except actions.NotFound as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except actions.Conflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return 202, view_as_dict(view)

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


def _json_body(required: list[str], **optional: str) -> dict[str, Any]:
    """A required JSON object body: the ``required`` string fields, plus ``optional`` ones
    given as name=type; nothing else allowed."""
    properties = {name: {"type": "string"} for name in required}
    properties.update({name: {"type": kind} for name, kind in optional.items()})
    schema = {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": properties,
    }
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def openapi() -> dict[str, Any]:
    training = "#/components/schemas/Training"
    return {
        "openapi": "3.0.3",
        "info": {"title": "trainguard admin API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Training": _TRAINING,
                "TrainingDetail": {
                    "allOf": [
                        {"$ref": training},
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
                        "items": {"type": "array", "items": {"$ref": training}},
                        "next_offset": {"type": "integer", "nullable": True},
                    },
                },
                "Error": _ERROR,
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/trainings": {
                "get": {
                    "summary": "List trainings",
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"type": "string", "enum": list(STATUSES)},
                        },
                        {"name": "name", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "responses": {
                        "200": _ok("a page of trainings", "#/components/schemas/Page"),
                        "400": _error("bad query"),
                        **_COMMON,
                    },
                },
                "post": {
                    "summary": "Submit a training to FAL and record it",
                    "requestBody": _json_body(
                        ["type", "name", "images_url"], trigger="string", arguments="object"
                    ),
                    "responses": {
                        "201": _ok("recorded", training),
                        "400": _error("bad request"),
                        "422": _error("a required input field is missing (nothing was sent)"),
                        "500": _error("FAL accepted it but it could not be recorded"),
                        "502": _error("FAL refused the submit"),
                        **_COMMON,
                    },
                },
            },
            "/v1/trainings/track": {
                "post": {
                    "summary": "Adopt a request submitted elsewhere",
                    "requestBody": _json_body(["request_id", "type", "name"], trigger="string"),
                    "responses": {
                        "201": _ok("adopted", training),
                        "400": _error("bad request"),
                        "409": _error("already tracked"),
                        "422": _error("a request id that could never be fetched or cancelled"),
                        **_COMMON,
                    },
                }
            },
            "/v1/trainings/{request_id}": {
                "get": {
                    "summary": "One training with its event history",
                    "parameters": [_ID],
                    "responses": {
                        "200": _ok("the training", "#/components/schemas/TrainingDetail"),
                        "404": _error("unknown"),
                        **_COMMON,
                    },
                }
            },
            "/v1/trainings/{request_id}/cancel": {
                "post": {
                    "summary": "Ask FAL to cancel; CANCELLED once FAL shows it will not finish",
                    "parameters": [_ID],
                    "responses": {
                        "200": _ok("cancel requested (FAL may still finish it)", training),
                        "404": _error("unknown"),
                        "409": _error("already finished"),
                        **_COMMON,
                    },
                }
            },
            "/v1/trainings/{request_id}/recheck": {
                "post": {
                    "summary": "Check this training with FAL now",
                    "parameters": [_ID],
                    "responses": {
                        "202": _ok("scheduled", training),
                        "404": _error("unknown"),
                        "409": _error("cancelled"),
                        **_COMMON,
                    },
                }
            },
        },
    }
