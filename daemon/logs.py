"""structlog setup and the documented log tags.

Logs go to one stream (stdout by default): JSON lines when it is not a terminal, a readable
console format on a terminal. Every line is written as UTF-8 without ``\\u`` escapes (so
``journalctl -u trainguard | grep 🔍`` finds the tags) in one write followed by a flush (so a
killed process loses nothing it logged). Records from the standard ``logging`` module
(hypercorn, httpx, ...) are rendered the same way on the same stream.
"""

from __future__ import annotations

import io
import json as jsonlib
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.contextvars import bound_contextvars
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from trainguard.names import CHECK, LAYER_TAGS, RECHECK, WARN, WEBHOOK

__all__ = [
    "CHECK",
    "LAYER_TAGS",
    "RECHECK",
    "WARN",
    "WEBHOOK",
    "bound",
    "configure",
    "get_logger",
    "tag_for",
]


#: Bind key/values into the log context of the current task for a ``with`` block.
bound = bound_contextvars

_MIN_SECRET_LEN = 4
_QUIET_LIBRARIES = ("httpx", "httpcore")
_stdlib_handler: logging.Handler | None = None


def tag_for(layer: str) -> str:
    """The documented log tag of a built-in layer; ``""`` for plugin layers."""
    return LAYER_TAGS.get(layer, "")


def get_logger(**initial: Any) -> FilteringBoundLogger:
    """A logger carrying ``initial`` key/values; follows later calls to :func:`configure`."""
    return structlog.get_logger(**initial)


def configure(
    level: str = "info",
    *,
    stream: TextIO | None = None,
    json: bool | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """(Re)configure structlog and the standard ``logging`` root logger.

    ``json=None`` picks JSON lines unless ``stream`` is a terminal. Every occurrence of a
    string in ``secrets`` (4 characters or more) is replaced by ``***`` in the rendered line,
    exception text included. httpx/httpcore request chatter is shown only at debug level.
    """
    global _stdlib_handler
    numeric_level = _parse_level(level)
    out = sys.stdout if stream is None else stream
    _force_utf8(out)
    as_json = not _isatty(out) if json is None else json

    pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_layer_tag,
        structlog.processors.StackInfoRenderer(),
    ]
    render: list[Processor] = []
    if as_json:
        # Structured tracebacks without local variables: locals may hold secrets cut short.
        render.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        render.append(structlog.processors.JSONRenderer(ensure_ascii=False))
    else:
        render.append(
            structlog.dev.ConsoleRenderer(
                colors=_isatty(out),
                # Plain tracebacks whatever else is installed: rich's (pulled in by some
                # tools) takes a third of a second per exception.
                exception_formatter=structlog.dev.plain_traceback,
            )
        )
    redact = _redactor(secrets)
    if redact is not None:
        render.append(redact)

    writer = structlog.WriteLogger(out)
    structlog.configure(
        processors=[*pre_chain, *render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *_: writer,
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    _stdlib_handler = logging.StreamHandler(out)
    _stdlib_handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *pre_chain],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    root.addHandler(_stdlib_handler)
    root.setLevel(numeric_level)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric_level, logging.WARNING))


def _parse_level(level: str) -> int:
    names = ("debug", "info", "warning", "error", "critical")
    if level.lower() not in names:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(names)}")
    return logging.getLevelNamesMapping()[level.upper()]


def _force_utf8(stream: TextIO) -> None:
    """Make a text file write UTF-8 whatever the locale, never failing on bad characters."""
    if isinstance(stream, io.TextIOWrapper) and (
        stream.encoding.lower().replace("_", "-") != "utf-8" or stream.errors == "strict"
    ):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _add_layer_tag(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """Add ``tag`` (e.g. 🔍) for a built-in ``layer`` bound to the event."""
    layer = event_dict.get("layer")
    if isinstance(layer, str) and "tag" not in event_dict and (tag := tag_for(layer)):
        event_dict["tag"] = tag
    return event_dict


def _redactor(secrets: Iterable[str]) -> Processor | None:
    """A final processor replacing each secret (and its JSON/repr-escaped forms) by ``***``."""
    variants: set[str] = set()
    for secret in secrets:
        if len(secret) >= _MIN_SECRET_LEN:
            variants.update(
                (secret, jsonlib.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1])
            )
    if not variants:
        return None
    pattern = re.compile("|".join(map(re.escape, sorted(variants, key=len, reverse=True))))

    def redact(_logger: WrappedLogger, _name: str, rendered: str) -> str:
        return pattern.sub("***", rendered)

    return redact  # type: ignore[return-value]
