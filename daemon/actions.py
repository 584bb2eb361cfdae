"""What an operator or the bot asks for (submit, track, cancel, recheck), shared by the CLI,
the admin API and the demo.

Each goes through the FAL client and hands the outcome to reconcile, like a layer does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from trainguard.config import Settings
from trainguard.fal import FalClient, Kind, queue_urls
from trainguard.reconcile import Kind as ObsKind
from trainguard.reconcile import Observation, Reconciler
from trainguard.store import TrainingView

#: What a tracked request id may be: FAL's are UUIDs. Anything that is not one URL path
#: segment as it is (a ``/``, ``%``, ``?``, space, ``..``) could never be fetched or
#: cancelled through the admin API; ``track`` is that API's own route.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")
_RESERVED_IDS = frozenset({"track"})


class BadRequestId(ValueError):
    """A request id that ``track`` refuses (see ``REQUEST_ID_RE``)."""


def check_request_id(request_id: str) -> None:
    """Raise ``BadRequestId`` unless ``request_id`` is safe to track."""
    if not REQUEST_ID_RE.fullmatch(request_id) or request_id in _RESERVED_IDS:
        raise BadRequestId(
            f"request id {request_id!r}: use 1-128 letters, digits and . _ ~ - "
            "(starting with a letter or digit, not 'track'), as FAL's are"
        )


class NotRecorded(RuntimeError):
    """FAL accepted a training that could not be recorded; it must be adopted with track."""

    def __init__(self, request_id: str, cause: Exception) -> None:
        super().__init__(
            f"FAL accepted the training as {request_id} but it could not be recorded ({cause})"
        )
        self.request_id = request_id


class MissingInput(ValueError):
    """A model input field the training type requires is not given; nothing was sent."""


def model_input(
    settings: Settings, training_type: str, name: str, arguments: Mapping[str, Any]
) -> dict[str, Any]:
    """What is sent to FAL: the type's default ``arguments`` (placeholders filled for
    ``name``) merged under the caller's. Raises MissingInput naming the first ``required``
    field that is absent, null or empty."""
    ttype = settings.training_type(training_type)
    merged = {**ttype.default_arguments(name), **arguments}
    for key in ttype.required:
        if merged.get(key) in (None, ""):
            raise MissingInput(
                f"input field {key!r} is required by training type {ttype.name!r}"
                f" ({ttype.endpoint}) and was not given: pass it as an extra argument"
                f" or set it in [training_types.{ttype.name}] arguments"
            )
    return merged


def training_arguments(
    settings: Settings,
    training_type: str,
    images_url: str,
    trigger: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The model input for a training type (the field names are configuration)."""
    ttype = settings.training_type(training_type)
    arguments: dict[str, Any] = {ttype.images_field: images_url}
    if trigger:
        arguments[ttype.trigger_field] = trigger
    arguments.update(extra or {})
    return arguments


async def submit(
    settings: Settings,
    fal: FalClient,
    reconciler: Reconciler,
    *,
    training_type: str,
    name: str,
    arguments: Mapping[str, Any],
    trigger: str | None = None,
) -> TrainingView:
    """Submit to FAL with our webhook URL, then record the training.

    The input sent is :func:`model_input`'s. Raises ``MissingInput`` (before anything is
    sent) when a required field is missing, ``FalRequestError`` when FAL refuses, and
    ``NotRecorded`` (with the request id) when FAL accepted but the store did not.
    """
    ttype = settings.training_type(training_type)
    arguments = model_input(settings, training_type, name, arguments)
    submitted = await fal.submit(ttype.endpoint, arguments, settings.webhook["public_url"])
    try:
        return await reconciler.register(
            name=name,
            training_type=ttype.name,
            request_id=submitted.request_id,
            layer="submit",
            status_url=submitted.status_url,
            response_url=submitted.response_url,
            cancel_url=submitted.cancel_url,
            trigger_phrase=trigger,
            arguments=arguments,
        )
    except Exception as exc:
        raise NotRecorded(submitted.request_id, exc) from exc


async def track(
    settings: Settings,
    reconciler: Reconciler,
    *,
    request_id: str,
    training_type: str,
    name: str,
    trigger: str | None = None,
) -> TrainingView:
    """Adopt a request submitted elsewhere (its URLs are built from the endpoint).

    Raises ``BadRequestId`` for an id that could not be looked up or cancelled later.
    """
    check_request_id(request_id)
    ttype = settings.training_type(training_type)
    status_url, response_url, cancel_url = queue_urls(
        settings.fal["queue_url"], ttype.endpoint, request_id
    )
    return await reconciler.register(
        name=name,
        training_type=ttype.name,
        request_id=request_id,
        layer="track",
        status_url=status_url,
        response_url=response_url,
        cancel_url=cancel_url,
        trigger_phrase=trigger,
    )


class NotFound(LookupError):
    """No training with this request_id."""


class Conflict(RuntimeError):
    """The training is in a state that does not allow the action (e.g. already finished)."""


class Unavailable(RuntimeError):
    """FAL did not answer usefully right now; nothing was changed."""


async def _known(reconciler: Reconciler, request_id: str) -> TrainingView:
    view = await reconciler.store.training(request_id)
    if view is None:
        raise NotFound(f"no training {request_id!r}")
    return view


async def cancel(
    settings: Settings, fal: FalClient, reconciler: Reconciler, request_id: str
) -> TrainingView:
    """Ask FAL to cancel. An accepted cancel is a request, not an outcome: it is recorded
    (``cancel_requested_at``) and the layers keep watching until FAL shows what happened (a
    queued request is removed: CANCELLED; a running one may still finish with its result).

    Raises NotFound, Conflict (already finished here or at FAL) or Unavailable (a transient
    answer: try again).
    """
    view = await _known(reconciler, request_id)
    if view.finished:
        raise Conflict(f"training {request_id} is already {view.status}")
    cancel_url = (
        view.cancel_url or queue_urls(settings.fal["queue_url"], view.endpoint, request_id)[2]
    )
    answer = await fal.cancel(cancel_url)
    if answer.kind == Kind.SUCCEEDED:
        change = await reconciler.observe_answer(answer, request_id, "admin")
        return change.training or await _known(reconciler, request_id)
    if answer.kind == Kind.TRANSIENT:
        raise Unavailable(f"FAL did not answer the cancel: {answer.detail}")
    if answer.kind == Kind.NOT_FOUND and view.cancel_requested_at is not None:
        change = await reconciler.observe_answer(answer, request_id, "admin")  # removed
        if change.training is not None and change.training.status == "CANCELLED":
            return change.training
    if answer.status == "ALREADY_COMPLETED":
        await reconciler.observe_answer(answer, request_id, "admin")  # fetch the result now
        raise Conflict(
            f"training {request_id} already completed at FAL; its result is being fetched"
        )
    raise Conflict(f"FAL refused the cancel: {answer.detail or answer.kind.value}")


async def recheck(reconciler: Reconciler, request_id: str) -> TrainingView:
    """Make a training due for a check now (the poller, or the delayed layer once finished)."""
    await _known(reconciler, request_id)
    change = await reconciler.observe(Observation(request_id, "admin", ObsKind.RECHECK))
    if change.kind != "recheck" or change.training is None:
        raise Conflict(f"training {request_id} is cancelled; nothing to check")
    return change.training


def fal_client(settings: Settings, **kwargs: Any) -> FalClient:
    """A FAL client configured from settings (the caller enters it with ``async with``)."""
    from trainguard.fal import RateLimiter

    return FalClient(
        queue_url=settings.fal["queue_url"],
        backup_queue_url=settings.fal["backup_queue_url"],
        key=settings.fal_key,
        rate_limiter=RateLimiter(settings.fal["max_requests_per_second"]),
        timeout=settings.fal["timeout_seconds"],
        retries=settings.fal["retries"],
        **kwargs,
    )
