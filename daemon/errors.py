"""Every exception trainguard raises on purpose, in one tree (httpx's ``_exceptions.py`` is
the model). Each module imports its own from here, so ``trainguard.config.ConfigError`` and
``trainguard.errors.ConfigError`` are the same class; a plugin catches ``TrainguardError``
for all of them. Where a class also derives from a built-in (``ValueError``, ``LookupError``,
``RuntimeError``), that is what callers caught before this module existed: kept so that no
``except`` changes meaning.

    TrainguardError
    ├── ConfigError (ValueError) ........ a bad config file or option; names the key (exit 2)
    ├── PluginError (RuntimeError) ...... a plugin that cannot be loaded or contradicts another
    ├── StartError (RuntimeError) ....... the daemon cannot start as configured
    │   └── LayerStartError ............. a layer failed before it had started
    ├── StoreError ...................... the database did not take a write
    │   ├── StoreClosed (RuntimeError) .. the writer stopped before this write was committed
    │   └── TransactionRolledBack (RuntimeError)  the database rolled the batch back itself
    ├── FalRequestError ................. a submit that did not produce a request at FAL
    ├── WebhookError .................... a webhook request that is not stored as genuine
    │   ├── MalformedWebhook (ValueError)  not FAL's shape; the reason is safe to answer with
    │   ├── WebhookRejected ............. failed verification (``code``: stale, bad_signature, ...)
    │   ├── Refusal ..................... refused before the body is judged (``status``)
    │   ├── BodyTooLarge (ValueError) ... a body past its limit (also the admin API's)
    │   ├── KeyServerDown (RuntimeError)  no host of FAL's JWKS answered, no fresh copy
    │   └── UnverifiedFull (RuntimeError)  the bound on webhooks kept unverified is reached
    ├── ActionError ..................... an operator action (CLI, admin API) refused
    │   ├── AlreadyTracked (ValueError) . a training with this request_id is already stored
    │   ├── BadRequestId (ValueError) ... an id ``track`` refuses
    │   ├── MissingInput (ValueError) ... a required model input field is missing
    │   ├── NotFound (LookupError) ...... no training with this request_id
    │   ├── Conflict (RuntimeError) ..... the training's state does not allow the action
    │   ├── Unavailable (RuntimeError) .. FAL did not answer usefully; nothing changed
    │   └── NotRecorded (RuntimeError) .. FAL accepted a training that could not be recorded
    ├── CliError ........................ a CLI failure reported in one line, with its exit status
    ├── ApiError ........................ an admin API answer other than 2xx (``status``, ``code``)
    └── ArtifactError ................... an artifact download that did not complete
        ├── DownloadError ............... failed for now; retried with backoff
        └── GiveUp ...................... no retry can fix it (gone, too large)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActionError",
    "AlreadyTracked",
    "ApiError",
    "ArtifactError",
    "BadRequestId",
    "BodyTooLarge",
    "CliError",
    "ConfigError",
    "Conflict",
    "DownloadError",
    "FalRequestError",
    "GiveUp",
    "KeyServerDown",
    "LayerStartError",
    "MalformedWebhook",
    "MissingInput",
    "NotFound",
    "NotRecorded",
    "PluginError",
    "Refusal",
    "StartError",
    "StoreClosed",
    "StoreError",
    "TrainguardError",
    "TransactionRolledBack",
    "Unavailable",
    "UnverifiedFull",
    "WebhookError",
    "WebhookRejected",
]

#: The CLI's exit status for a failed operation (``trainguard.cli`` re-exports it).
EXIT_FAILURE = 1


class TrainguardError(Exception):
    """The base of every exception trainguard raises on purpose."""


class ConfigError(TrainguardError, ValueError):
    """A configuration problem, with the offending key in the message."""


class PluginError(TrainguardError, RuntimeError):
    """A plugin could not be loaded or contributes something inconsistent."""


class StartError(TrainguardError, RuntimeError):
    """The daemon cannot start as configured (a listener cannot bind, a layer fails)."""


class LayerStartError(StartError):
    """A layer failed before it had started: the daemon cannot run as configured."""


class StoreError(TrainguardError):
    """The database did not take a write; the writer learns it, nothing was half-stored."""


class StoreClosed(StoreError, RuntimeError):
    """The store's writer stopped before this write could be committed."""


class TransactionRolledBack(StoreError, RuntimeError):
    """The database rolled a write batch back by itself (a full disk): nothing of it is stored."""


class FalRequestError(TrainguardError):
    """A submit that did not produce a request; ``answer`` (a ``fal.Answer``) says why."""

    def __init__(self, message: str, answer: Any) -> None:
        super().__init__(message)
        self.answer = answer


class WebhookError(TrainguardError):
    """A webhook request that is not stored as genuine."""


class MalformedWebhook(WebhookError, ValueError):
    """A webhook body that is not FAL's shape; the reason is safe to answer with."""


class WebhookRejected(WebhookError):
    """A webhook failed verification; ``code`` is missing_header, stale, bad_signature or
    foreign_user."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.reason = reason
        self.code = code


class Refusal(WebhookError):
    """A request refused before its body is judged."""

    def __init__(self, status: int, outcome: str, reason: str) -> None:
        super().__init__(f"{outcome}: {reason}")
        self.status = status
        self.outcome = outcome
        self.reason = reason


class BodyTooLarge(WebhookError, ValueError):
    """A request body grew past the limit given to ``read_body``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit


class KeyServerDown(WebhookError, RuntimeError):
    """FAL's JWKS could not be fetched, and no fresh enough copy is cached."""


class UnverifiedFull(WebhookError, RuntimeError):
    """The bound on webhooks kept unverified (while FAL's keys are away) is reached."""


class ActionError(TrainguardError):
    """An operator action (the CLI or the admin API) that was refused or failed."""


class AlreadyTracked(ActionError, ValueError):
    """A training with this request_id is already in the store."""


class BadRequestId(ActionError, ValueError):
    """A request id that ``track`` refuses (see ``actions.REQUEST_ID_RE``)."""


class MissingInput(ActionError, ValueError):
    """A model input field the training type requires is not given; nothing was sent."""


class NotFound(ActionError, LookupError):
    """No training with this request_id."""


class Conflict(ActionError, RuntimeError):
    """The training is in a state that does not allow the action (e.g. already finished)."""


class Unavailable(ActionError, RuntimeError):
    """FAL did not answer usefully right now; nothing was changed."""


class NotRecorded(ActionError, RuntimeError):
    """FAL accepted a training that could not be recorded; it must be adopted with track."""

    def __init__(self, request_id: str, cause: Exception) -> None:
        super().__init__(
            f"FAL accepted the training as {request_id} but it could not be recorded ({cause})"
        )
        self.request_id = request_id


class CliError(TrainguardError):
    """A failure to report in one line, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class ApiError(TrainguardError):
    """An admin API answer other than 2xx: ``status``, a machine ``code`` and a ``detail``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class ArtifactError(TrainguardError):
    """An artifact download that did not complete."""


class DownloadError(ArtifactError):
    """A download failed for now; it is retried."""


class GiveUp(ArtifactError):
    """A download no retry can fix (the media are gone, the file is too large)."""
