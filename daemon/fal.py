"""FAL queue client: submit, status, result, cancel and media probes, every answer classified.

The provider contract is ``fal-api.md``. Each call goes through the shared :class:`RateLimiter`,
has an overall deadline, and is retried on transient answers with capped, fully jittered
exponential backoff (honouring ``Retry-After``). Except for :meth:`FalClient.submit`, nothing
is raised for a provider or network problem: the caller gets an :class:`Answer` whose
:class:`Kind` says what it means for the training. ``trio.Cancelled`` always propagates.

The API key is sent only in the ``Authorization`` header of queue calls and is scrubbed from
every answer body, detail and error message.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import httpx
import structlog
import trio

from trainguard.errors import FalRequestError

__all__ = [
    "Answer",
    "FalClient",
    "FalRequestError",
    "Kind",
    "RateLimiter",
    "Submitted",
    "progress_from_logs",
    "queue_urls",
]

# fal-client treats these app prefixes as namespaces: the app is the next two segments.
log = structlog.get_logger("trainguard.fal")

_NAMESPACES = frozenset({"workflows", "comfy"})
# 4xx answers that say nothing about the training itself: retry them, never fail on them.
# 401/403 mean *our* key is wrong or revoked; a training must not be failed for that.
_TRANSIENT_4XX = frozenset({401, 403, 408, 409, 429})
# Answers after which the server has certainly not acted on the request, so even a
# non-idempotent submit may be sent again without risking a duplicate (paid) training.
# fal_client retries every call, submit included, on 408/409/429 (client.py RETRY_CODES).
_RESENDABLE_HTTP = frozenset({408, 409, 429, 503})
_UNSENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The connection to the host itself failed: fal_client's AsyncBackupDomainTransport replays
# exactly these on the backup host (queue.fal.run -> queue.falrun.com), never an answer.
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
_DETAIL_LIMIT = 500
_REDACTED = "[redacted]"
_STEP_RE = re.compile(
    r"\b(?:steps?|iter(?:ation)?s?)\s*[:#=]?\s*(\d{1,9})\s*(?:/|of)\s*(\d{1,9})(?!\d)"
    r"|(?<!\d)(\d{1,9})\s*/\s*(\d{1,9})\s*(?:steps?\b|iter(?:ation)?s?\b|\[)",
    re.IGNORECASE,
)


class Kind(StrEnum):
    """What an answer means for the training, whatever the HTTP details were."""

    PENDING = "pending"
    COMPLETED = "completed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TRANSIENT = "transient"
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class Answer:
    """One classified answer from FAL (or from the network on the way to it)."""

    op: str
    kind: Kind
    http_status: int | None = None
    status: str | None = None
    queue_position: int | None = None
    logs: list[dict[str, Any]] | None = field(default=None, repr=False)
    progress: int | None = None
    output: dict[str, Any] | None = field(default=None, repr=False)
    detail: str | None = None
    error_type: str | None = None
    retry_after: float | None = None
    body: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Submitted:
    """A request accepted by the queue, with the URLs to follow it."""

    request_id: str
    status_url: str
    response_url: str
    cancel_url: str
    gateway_request_id: str | None = None
    queue_position: int | None = None


def _app_path(endpoint: str) -> str:
    """``owner/app`` (with its namespace, if any) of an endpoint, dropping any subpath."""
    parts = [part for part in endpoint.strip("/").split("/") if part]
    size = 3 if parts and parts[0] in _NAMESPACES else 2
    if len(parts) < size:
        raise ValueError(f"FAL endpoint must look like owner/app[/subpath], got {endpoint!r}")
    return "/".join(parts[:size])


def queue_urls(queue_url: str, endpoint: str, request_id: str) -> tuple[str, str, str]:
    """(status_url, response_url, cancel_url) of a request, built from owner/app only."""
    if not request_id:
        raise ValueError("request_id must not be empty")
    base = f"{queue_url.rstrip('/')}/{_app_path(endpoint)}/requests/{quote(request_id, safe='')}"
    return f"{base}/status", base, f"{base}/cancel"


def progress_from_logs(logs: Iterable[Mapping[str, Any]] | None) -> int | None:
    """Percent done (0-100) from the last log message carrying a step count, else None."""
    for entry in reversed(list(logs or ())):
        message = entry.get("message") if isinstance(entry, Mapping) else None
        if not isinstance(message, str):
            continue
        for match in reversed(list(_STEP_RE.finditer(message))):
            done, total = (int(g) for g in match.groups() if g is not None)
            if total > 0:
                return min(100, done * 100 // total)
    return None


class RateLimiter:
    """Async token bucket for trio, shared by every caller of the FAL API.

    ``rate`` requests per second on average, with up to ``burst`` back to back. Each caller
    reserves the next free slot before sleeping (GCRA), so waiters are served in arrival
    order; a caller cancelled while waiting gives its slot up to nobody (errs on the slow side).
    """

    def __init__(self, rate: float, burst: int = 5) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of requests per second: {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1: {burst!r}")
        self._interval = 1.0 / rate
        self._tolerance = burst * self._interval
        self._tat = -math.inf  # theoretical arrival time of the next request

    async def acquire(self) -> None:
        """Wait until one more request may be sent."""
        now = trio.current_time()
        self._tat = max(self._tat, now) + self._interval
        await trio.sleep_until(self._tat - self._tolerance)


@dataclass(frozen=True)
class _Reply:
    """One HTTP response, decoded once, with the key already scrubbed."""

    op: str
    code: int
    body: Any
    decoded: bool
    snippet: str
    error_type: str | None
    retry_after: float | None

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def from_fal(self) -> bool:
        """FAL's (or the app's) own error answer: a typed error (``X-Fal-Error-Type`` or
        ``error_type`` in the body) or a JSON error body with ``detail``. An HTML or
        plain-text page from a gateway on the way is neither."""
        return self.error_type is not None or (
            isinstance(self.body, dict) and "detail" in self.body
        )

    def answer(self, kind: Kind, detail: str | None = None, **fields: Any) -> Answer:
        return Answer(
            op=self.op,
            kind=kind,
            http_status=self.code,
            detail=detail,
            error_type=self.error_type,
            retry_after=self.retry_after,
            body=self.body,
            **fields,
        )

    def describe(self) -> str:
        """``HTTP <code>: <FAL's detail>``, readable and bounded."""
        if isinstance(self.body, dict) and "detail" in self.body:
            text = _readable(self.body["detail"])
        elif self.body is not None:
            text = _readable(self.body)
        else:
            text = self.snippet
        return _clip(f"HTTP {self.code}: {text}" if text else f"HTTP {self.code}")

    def malformed(self, what: str) -> Answer:
        return self.answer(Kind.TRANSIENT, _clip(f"{what}: {self.describe()}"))


def _clip(text: str) -> str:
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


def _readable(value: Any) -> str:
    """A one-line rendering of FAL's ``detail`` (a string, or pydantic's list of errors)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return "; ".join(_readable_item(item) for item in value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _readable_item(item: dict[str, Any]) -> str:
    loc, msg = item.get("loc"), item.get("msg")
    if not isinstance(msg, str):
        return _readable(item)
    if isinstance(loc, list) and loc:
        return f"{'.'.join(str(part) for part in loc)}: {msg}"
    return msg


def _non_negative_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or HTTP date), else None."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _http_failure(reply: _Reply) -> Answer:
    """A non-2xx queue answer with no op-specific meaning."""
    if reply.code == 404:
        return reply.answer(Kind.NOT_FOUND, reply.describe())
    if 400 <= reply.code < 500 and reply.code not in _TRANSIENT_4XX:
        return reply.answer(Kind.FAILED, reply.describe())
    return reply.answer(Kind.TRANSIENT, reply.describe())


def _classify_submit(reply: _Reply) -> Answer:
    if not reply.ok:
        return _http_failure(reply)
    body = reply.body
    if not (
        isinstance(body, dict) and isinstance(body.get("request_id"), str) and body["request_id"]
    ):
        return reply.malformed("submit answer without a request_id")
    return reply.answer(Kind.SUCCEEDED)


def _classify_status(reply: _Reply) -> Answer:
    if not reply.ok:
        return _http_failure(reply)
    body = reply.body
    if not (isinstance(body, dict) and isinstance(body.get("status"), str)):
        return reply.malformed("status answer without a status")
    state = body["status"]
    raw_logs = body.get("logs")
    logs = [e for e in raw_logs if isinstance(e, dict)] if isinstance(raw_logs, list) else None
    fields: dict[str, Any] = {
        "status": state,
        "queue_position": _non_negative_int(body.get("queue_position")),
        "logs": logs,
        "progress": progress_from_logs(logs),
    }
    if state in ("IN_QUEUE", "IN_PROGRESS"):
        return reply.answer(Kind.PENDING, **fields)
    if state == "COMPLETED":
        error, error_type = body.get("error"), body.get("error_type")
        if error or error_type:
            return reply.answer(Kind.FAILED, _clip(_readable(error or error_type)), **fields)
        return reply.answer(Kind.COMPLETED, **fields)
    return reply.malformed(f"unknown status {state!r}")


def _classify_result(reply: _Reply) -> Answer:
    """SUCCEEDED (the output), PENDING ("still in progress"), FAILED (an error answer from
    FAL or the app: final once the status said COMPLETED, see fal-api.md), NOT_FOUND, or
    TRANSIENT (transport, 401/403/408/409/429, and an untyped 5xx such as a gateway page).
    Whether a FAILED or NOT_FOUND here is final is not this answer's to say: the caller
    knows whether COMPLETED was seen (reconcile decides)."""
    body = reply.body if isinstance(reply.body, dict) else {}
    if reply.ok:
        if not reply.decoded:
            return reply.malformed("undecodable JSON")
        if reply.code != 200:  # only a 200 carries the model output; never mistake a status
            if body.get("status") in ("IN_QUEUE", "IN_PROGRESS"):
                return reply.answer(Kind.PENDING, reply.describe(), status=body["status"])
            return reply.malformed("result answer without the output")
        if not isinstance(reply.body, dict):
            return reply.malformed("output is not a JSON object")
        return reply.answer(Kind.SUCCEEDED, output=reply.body)
    detail = body.get("detail")
    if 400 <= reply.code < 500 and isinstance(detail, str) and "in progress" in detail.lower():
        return reply.answer(Kind.PENDING, detail)
    if reply.code >= 500 and reply.from_fal:
        return reply.answer(Kind.FAILED, reply.describe())
    return _http_failure(reply)


def _classify_cancel(reply: _Reply) -> Answer:
    state = reply.body.get("status") if isinstance(reply.body, dict) else None
    state = state if isinstance(state, str) else None
    if state == "NOT_FOUND" or reply.code == 404:
        return reply.answer(Kind.NOT_FOUND, reply.describe(), status=state)
    if state == "ALREADY_COMPLETED":
        return reply.answer(Kind.FAILED, "ALREADY_COMPLETED", status=state)
    if reply.ok:
        if not reply.decoded:
            return reply.malformed("undecodable JSON")
        return reply.answer(Kind.SUCCEEDED, status=state)
    return _http_failure(reply)


def _classify_probe(reply: _Reply) -> Answer:
    if reply.ok:
        return reply.answer(Kind.SUCCEEDED)
    if reply.code in (404, 410):
        return reply.answer(Kind.NOT_FOUND, f"HTTP {reply.code}")
    if reply.code in (408, 409, 429) or reply.code >= 500:
        return reply.answer(Kind.TRANSIENT, f"HTTP {reply.code}")
    return reply.answer(Kind.FAILED, f"HTTP {reply.code}")


class FalClient:
    """FAL queue client over a small round-robin set of ``httpx.AsyncClient`` (see design.md:
    one client at high concurrency is slow, several small pools are fast)."""

    def __init__(
        self,
        *,
        queue_url: str,
        key: str | None,
        backup_queue_url: str = "",
        rate_limiter: RateLimiter,
        timeout: float,
        retries: int = 2,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
        clients: int = 4,
        connections_per_client: int = 5,
        observe: Callable[[str, str, float], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | str | bool = True,
    ) -> None:
        if timeout <= 0 or retries < 0 or clients < 1 or connections_per_client < 1:
            raise ValueError("timeout must be > 0, retries >= 0, clients and connections >= 1")
        self._queue_url = queue_url.rstrip("/")
        self._backup_url = backup_queue_url.rstrip("/")
        self._auth = {"Authorization": f"Key {key}"} if key else {}
        secrets = [key] if key else []
        if key and ":" in key:
            secrets.append(key.split(":", 1)[1])
        self._secrets = [s for s in secrets if s]
        self._limiter = rate_limiter
        self._timeout = timeout
        self._retries = retries
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._observe = observe
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        limits = httpx.Limits(
            max_connections=connections_per_client,
            max_keepalive_connections=connections_per_client,
        )
        self._clients = [
            httpx.AsyncClient(
                timeout=timeout,
                limits=limits,
                transport=transport,
                verify=verify,
                headers={"User-Agent": "trainguard"},
            )
            for _ in range(clients)
        ]
        self._rotation = itertools.cycle(self._clients)

    def __repr__(self) -> str:
        key = "set" if self._auth else "none"
        return (
            f"FalClient(queue_url={self._queue_url!r}, backup_queue_url={self._backup_url!r}, "
            f"clients={len(self._clients)}, key={key})"
        )

    async def __aenter__(self) -> FalClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection pool (shielded: sockets must not leak on cancellation)."""
        with trio.CancelScope(shield=True):
            for client in self._clients:
                await client.aclose()

    async def submit(
        self, endpoint: str, arguments: dict[str, Any], webhook_url: str | None
    ) -> Submitted:
        """Queue a request; ``webhook_url`` goes in the ``fal_webhook`` query parameter.

        Raises FalRequestError unless FAL answers 2xx with a request_id. Transient failures are
        retried only when FAL certainly did not act on the request (connection never made,
        408/429/503): a retry after anything else could start a second, paid training.
        """
        app_path = _app_path(endpoint)  # validate before anything is sent
        answer = await self._call(
            "submit",
            "POST",
            f"{self._queue_url}/{endpoint.strip('/')}",
            _classify_submit,
            idempotent=False,
            json=arguments,
            params={"fal_webhook": webhook_url} if webhook_url else None,
        )
        if answer.kind is not Kind.SUCCEEDED:
            raise FalRequestError(
                f"FAL submit to {app_path} failed ({answer.kind}): {answer.detail}", answer
            )
        body: dict[str, Any] = answer.body
        request_id: str = body["request_id"]
        derived = queue_urls(self._queue_url, endpoint, request_id)
        returned = [body.get(k) for k in ("status_url", "response_url", "cancel_url")]
        status_url, response_url, cancel_url = (
            url if isinstance(url, str) and url else fallback
            for url, fallback in zip(returned, derived, strict=True)
        )
        gateway = body.get("gateway_request_id")
        return Submitted(
            request_id=request_id,
            status_url=status_url,
            response_url=response_url,
            cancel_url=cancel_url,
            gateway_request_id=gateway if isinstance(gateway, str) else None,
            queue_position=_non_negative_int(body.get("queue_position")),
        )

    async def status(self, status_url: str, *, logs: bool = True) -> Answer:
        """Queue status: PENDING, COMPLETED (fetch the result now), FAILED, NOT_FOUND or TRANSIENT."""
        params = {"logs": "1"} if logs else None
        return await self._call("status", "GET", status_url, _classify_status, params=params)

    async def result(self, response_url: str) -> Answer:
        """The model output: SUCCEEDED with ``output``, PENDING, FAILED, NOT_FOUND or TRANSIENT."""
        return await self._call("result", "GET", response_url, _classify_result)

    async def cancel(self, cancel_url: str) -> Answer:
        """Ask FAL to cancel: SUCCEEDED (requested), FAILED (ALREADY_COMPLETED), NOT_FOUND, TRANSIENT."""
        return await self._call("cancel", "PUT", cancel_url, _classify_cancel)

    async def probe(self, url: str) -> Answer:
        """HEAD a public media URL (never with our key): SUCCEEDED, NOT_FOUND, FAILED or TRANSIENT."""
        return await self._call(
            "probe", "HEAD", url, _classify_probe, auth=False, follow_redirects=True
        )

    async def _call(
        self,
        op: str,
        method: str,
        url: str,
        classify: Callable[[_Reply], Answer],
        *,
        idempotent: bool = True,
        auth: bool = True,
        **request: Any,
    ) -> Answer:
        """One logical call: attempts with backoff while the answer is transient and retryable."""
        attempt = 0
        while True:
            answer, resendable = await self._attempt(op, method, url, classify, auth, request)
            if answer.kind is not Kind.TRANSIENT or attempt >= self._retries:
                return answer
            if not (idempotent or resendable):
                return answer
            await trio.sleep(self._backoff(attempt, answer.retry_after))
            attempt += 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self._backoff_cap * 3)
        return random.uniform(0, min(self._backoff_cap, self._backoff_base * 2**attempt))

    async def _attempt(
        self,
        op: str,
        method: str,
        url: str,
        classify: Callable[[_Reply], Answer],
        auth: bool,
        request: dict[str, Any],
    ) -> tuple[Answer, bool]:
        """One HTTP attempt, classified; also says whether FAL certainly did not act on it.

        When the connection to the queue host itself fails (never on an answer, never on a
        read timeout), the same request is sent once to ``backup_queue_url``, as fal_client's
        backup-domain transport does; if that fails too, the first failure is reported."""
        await self._limiter.acquire()
        client = next(self._rotation)
        started = trio.current_time()
        response, failure, unsent = await self._send(client, method, url, auth, request)
        backup = self._backup_for(url) if failure is not None and unsent == "connect" else None
        if backup is not None:
            log.warning("connection to the FAL queue failed; trying the backup host", op=op)
            second = await self._send(client, method, backup, auth, request)
            if second[0] is not None or second[2] != "connect":
                response, failure, unsent = second
        if response is None:
            detail = _clip(self._scrub(failure or "timeout"))
            answer = Answer(op=op, kind=Kind.TRANSIENT, detail=detail)
            resendable = unsent is not None
        else:
            answer = classify(self._decode(op, response))
            resendable = response.status_code in _RESENDABLE_HTTP
        if self._observe is not None:
            self._observe(op, answer.kind.value, trio.current_time() - started)
        return answer, resendable

    async def _send(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        auth: bool,
        request: dict[str, Any],
    ) -> tuple[httpx.Response | None, str | None, str | None]:
        """(response, failure, unsent): ``unsent`` is "connect" when the connection to the
        host failed, "pool" when no connection was free, None when the request may have
        reached FAL."""
        with trio.move_on_after(self._timeout):
            try:
                response = await client.request(
                    method, url, headers=self._auth if auth else None, **request
                )
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                name = type(exc).__name__
                if isinstance(exc, httpx.TimeoutException):
                    failure = f"timeout ({name})"
                else:
                    failure = f"{name}: {exc}" if str(exc) else name
                if isinstance(exc, _CONNECT_ERRORS):
                    return None, failure, "connect"
                return None, failure, "pool" if isinstance(exc, _UNSENT_ERRORS) else None
            return response, None, None
        return None, "timeout", None

    def _backup_for(self, url: str) -> str | None:
        """The same request on the backup host, for a URL on the primary queue host."""
        if self._backup_url and url.startswith(self._queue_url + "/"):
            return self._backup_url + url[len(self._queue_url) :]
        return None

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text

    def _scrub_bytes(self, raw: bytes) -> bytes:
        for secret in self._secrets:
            raw = raw.replace(secret.encode(), _REDACTED.encode())
        return raw

    def _decode(self, op: str, response: httpx.Response) -> _Reply:
        raw = self._scrub_bytes(response.content)
        try:
            body, decoded = json.loads(raw), True
        except (ValueError, RecursionError):
            body, decoded = None, False
        header_type = response.headers.get("x-fal-error-type")
        json_type = body.get("error_type") if isinstance(body, dict) else None
        error_type = json_type if isinstance(json_type, str) else header_type
        return _Reply(
            op=op,
            code=response.status_code,
            body=body,
            decoded=decoded,
            snippet=_clip(raw.decode("utf-8", "replace").strip()),
            error_type=self._scrub(error_type) if error_type else None,
            retry_after=_parse_retry_after(response.headers.get("retry-after")),
        )
