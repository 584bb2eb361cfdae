"""config.toml -> typed, validated settings.

Every key is declared once in ``SCHEMA`` with its type, default and check; an unknown key, a
wrong type or an impossible value raises ``ConfigError`` naming the key, so the daemon never
starts half-configured. Secrets never live in the file: ``FAL_KEY`` comes from the
environment only.
"""

from __future__ import annotations

import math
import os
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from trainguard.errors import ConfigError
from trainguard.names import BUILTIN_LAYERS, FALLBACK_HOSTS

__all__ = [
    "BUILTIN_LAYERS",
    "LAYER_SCHEMA",
    "SCHEMA",
    "ConfigError",
    "LayerSettings",
    "Option",
    "Settings",
    "TrainingType",
    "load",
    "loads",
    "parse",
    "validate_options",
]

#: The password in a URL's user info (``scheme://user:PASSWORD@host``) or in a libpq-style
#: ``password=`` query parameter.
_URL_PASSWORD = re.compile(
    r"^([a-z][a-z0-9+.-]*://[^/?#:@]*):([^/?#]*)@|([?&]password=)([^&#]*)", re.I
)


def url_passwords(url: str) -> list[str]:
    """The passwords written in ``url``, as written and percent-decoded."""
    found = []
    for m in _URL_PASSWORD.finditer(url):
        raw = m.group(2) if m.group(1) is not None else m.group(4)
        if raw:
            found.extend({raw, unquote(raw)})
    return found


def redact_url(url: str) -> str:
    """``url`` with every password in it replaced by ``***`` (to log it or name it)."""

    def hide(m: re.Match[str]) -> str:
        return f"{m.group(1)}:***@" if m.group(1) is not None else f"{m.group(3)}***"

    return _URL_PASSWORD.sub(hide, url)


@dataclass(frozen=True)
class Option:
    """One declared option: its type(s), default, bounds and an optional value check.

    Core config (``SCHEMA``) and every layer's ``[layers.NAME]`` options (``Layer.options``)
    are declared alike and validated by the same code, so their errors read alike: one line,
    starting with the option's dotted name (``layers.my_layer.interval_seconds: ...``).
    ``types`` is a type or a tuple of them; ``float`` also takes an integer (stored as a
    float). A number with bounds (``above``: greater than; ``minimum`` / ``maximum``: at
    least / at most) must also be finite, and a value out of them is refused with what it
    must be: ``must be a finite number greater than 0, got 0``. ``check`` returns what is
    wrong with a value of the right type, or None.
    """

    types: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None
    doc: str = ""
    above: float | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def accepted(self) -> tuple[type, ...]:
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        return FLOAT if types == (float,) else types

    @property
    def bounded(self) -> bool:
        return (self.above, self.minimum, self.maximum) != (None, None, None)

    def describe(self) -> str:
        """What a value must be: ``an integer greater than 0``, ``a finite number``, ..."""
        if not self.bounded:
            return _type_name(self.accepted)
        kind = "an integer" if self.accepted == (int,) else "a finite number"
        limits = [
            *([f"greater than {self.above:g}"] if self.above is not None else []),
            *([f"at least {self.minimum:g}"] if self.minimum is not None else []),
            *([f"at most {self.maximum:g}"] if self.maximum is not None else []),
        ]
        return f"{kind} {' and '.join(limits)}"

    def within(self, value: float) -> bool:
        return (
            math.isfinite(value)
            and (self.above is None or value > self.above)
            and (self.minimum is None or value >= self.minimum)
            and (self.maximum is None or value <= self.maximum)
        )


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def _fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be between 0 and 1"


def _http_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "must be an http:// or https:// URL"
    return None


def _http_urls(value: str | list[Any]) -> str | None:
    """One URL, or a non-empty list of them."""
    if isinstance(value, str):
        return _http_url(value)
    if not value:
        return "must name at least one URL"
    for index, item in enumerate(value):
        problem = _http_url(item) if isinstance(item, str) else "must be a string"
        if problem:
            return f"entry #{index + 1} {problem}"
    return None


def _strings(value: list[Any]) -> str | None:
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            return f"entry #{index + 1} must be a non-empty string"
    return None


def _optional_http_url(value: str) -> str | None:
    return None if value == "" else _http_url(value)


def _listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return 'must be "host:port", e.g. "127.0.0.1:8700"'
    return None


def _host_names(value: list[Any]) -> str | None:
    for name in value:
        if not isinstance(name, str) or not re.fullmatch(
            r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name
        ):
            return f'must be host names without a port, e.g. ["trainguard.internal"], not {name!r}'
    return None


def _db_url(value: str) -> str | None:
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in ("sqlite", "postgresql", "postgres"):
        return "must be sqlite:///PATH or postgresql://..."
    return None


def _instance_id(value: str) -> str | None:
    """Empty (one is made up at each start) or a plain name of at most 64 characters."""
    if value and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        return "must be empty or up to 64 letters, digits, '.', '_' or '-'"
    return None


def _level(value: str) -> str | None:
    levels = ("debug", "info", "warning", "error", "critical")
    return None if value.lower() in levels else f"must be one of {', '.join(levels)}"


def _mode(value: str) -> str | None:
    return None if value in ("complete", "fail") else 'must be "complete" or "fail"'


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _template(value: str) -> str | None:
    return _placeholders(value, {"name", "request_id"})


def _placeholders(value: str, allowed: set[str]) -> str | None:
    """What is wrong with ``value`` as a ``str.format`` template using only ``allowed``."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as exc:
        return f"is not a valid template ({exc})"
    unknown = fields - allowed
    if unknown:
        names = " and ".join(f"{{{name}}}" for name in sorted(allowed))
        return f"may only use {names}, not {{{sorted(unknown)[0]}}} (write {{{{ for a brace)"
    return None


#: The placeholders of a string in ``[training_types.NAME] arguments``.
ARGUMENT_PLACEHOLDERS = {"name", "training_type"}


def _input_value(value: Any, where: str) -> str | None:
    """What is wrong with ``value`` as a model input field (JSON only; strings are
    templates), naming where inside it."""
    if isinstance(value, str):
        problem = _placeholders(value, ARGUMENT_PLACEHOLDERS)
        if problem is None:
            try:
                value.format(**dict.fromkeys(ARGUMENT_PLACEHOLDERS, "x"))
            except (ValueError, KeyError, IndexError, AttributeError) as exc:
                problem = f"is not a valid template ({exc})"
        return f"{where} {problem}" if problem else None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} must be a finite number"
    if isinstance(value, bool | int | float):
        return None
    if isinstance(value, list):
        items = (_input_value(item, f"{where}[{i}]") for i, item in enumerate(value))
        return next((problem for problem in items if problem), None)
    if isinstance(value, dict):
        items = (_input_value(item, f"{where}.{key}") for key, item in value.items())
        return next((problem for problem in items if problem), None)
    return f"{where} must be a JSON value (string, number, boolean, list or table)"


def _arguments(value: dict[str, Any]) -> str | None:
    items = (_input_value(item, f"field {key!r}") for key, item in value.items())
    return next((problem for problem in items if problem), None)


def _fill(value: Any, fields: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**fields)
    if isinstance(value, list):
        return [_fill(item, fields) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, fields) for key, item in value.items()}
    return value


FLOAT = (int, float)

#: Which of fal's hosts serves the webhook keys is unsourced (fal-api.md): ask both.
DEFAULT_JWKS_URLS = (
    "https://rest.alpha.fal.ai/.well-known/jwks.json",
    "https://rest.fal.ai/.well-known/jwks.json",
)

# Section -> key -> Option. Layers and training types are tables of tables, declared below.
SCHEMA: dict[str, dict[str, Option]] = {
    "database": {"url": Option((str,), None, _db_url)},
    "fal": {
        "queue_url": Option((str,), "https://queue.fal.run", _http_url),
        "jwks_url": Option((str, list), list(DEFAULT_JWKS_URLS), _http_urls),
        "max_requests_per_second": Option(FLOAT, 10.0, _positive),
        "timeout_seconds": Option(FLOAT, 30.0, _positive),
        "retries": Option((int,), 2, _non_negative),
        "backup_queue_url": Option((str,), "https://queue.falrun.com", _optional_http_url),
        "result_error_attempts": Option((int,), 5, _positive),
    },
    "webhook": {
        "listen": Option((str,), "127.0.0.1:8700", _listen),
        "public_url": Option((str,), "http://127.0.0.1:8700/fal/webhook", _http_url),
        "verify_signatures": Option((bool,), True),
        "max_body_bytes": Option((int,), 1024 * 1024, _positive),
        "timestamp_tolerance_seconds": Option(FLOAT, 300.0, _positive),
        "jwks_cache_seconds": Option(FLOAT, 86400.0, _positive),
        "rejected_kept": Option((int,), 1000, _non_negative),
        "allowed_user_ids": Option((list,), [], _strings),
        "rejected_kept_bytes": Option((int,), 4 * 1024 * 1024, _non_negative),
        "unknown_receipt_seconds": Option(FLOAT, 300.0, _positive),
        "unknown_receipts_kept": Option((int,), 1000, _non_negative),
        "unverified_kept": Option((int,), 10000, _non_negative),
        "unverified_kept_bytes": Option((int,), 64 * 1024 * 1024, _non_negative),
        "max_connections": Option((int,), 1024, _positive),
    },
    "metrics": {
        "listen": Option((str,), "127.0.0.1:9700", _listen),
        "max_connections": Option((int,), 64, _positive),
        "allowed_hosts": Option((list,), [], _host_names),
    },
    "log": {"level": Option((str,), "info", _level)},
    "fallback": {
        "mode": Option((str,), "complete", _mode),
        "trigger_phrase": Option((str,), "TOK", _non_empty),
    },
    "artifacts": {
        "enabled": Option((bool,), True),
        "dir": Option((str,), ""),
        "max_bytes": Option((int,), 2 * 1024**3, _positive),
        "timeout_seconds": Option(FLOAT, 300.0, _positive),
    },
    "delivery": {
        "enabled": Option((bool,), False),
        "url": Option((str,), "", _optional_http_url),
        "max_age_seconds": Option(FLOAT, 86400.0, _positive),
        "timeout_seconds": Option(FLOAT, 10.0, _positive),
    },
    # Several instances on one PostgreSQL database (issue 11); one instance on SQLite too.
    "cluster": {
        "instance_id": Option((str,), "", _instance_id),
        "heartbeat_seconds": Option(FLOAT, 5.0, _positive),
        "lease_seconds": Option(FLOAT, 15.0, _positive),
        "claim_seconds": Option(FLOAT, 60.0, _positive),
    },
}

LAYER_SCHEMA: dict[str, dict[str, Option]] = {
    "webhook": {},
    "poller": {
        "first_check_after_seconds": Option(FLOAT, 90.0, _non_negative),
        "interval_seconds": Option(FLOAT, 60.0, _positive),
        "jitter": Option(FLOAT, 0.1, _fraction),
        "concurrency": Option((int,), 8, _positive),
        "max_backoff_seconds": Option(FLOAT, 900.0, _positive),
    },
    "delayed": {
        "after_seconds": Option(FLOAT, 600.0, _non_negative),
        "verify_after_seconds": Option(FLOAT, 60.0, _non_negative),
    },
    "startup": {"concurrency": Option((int,), 8, _positive)},
    "completeness": {
        "interval_seconds": Option(FLOAT, 300.0, _positive),
        "check_lora_url": Option((bool,), True),
        "batch": Option((int,), 200, _positive),
    },
    "emergency": {"deadline_seconds": Option(FLOAT, 21600.0, _positive)},
}

DEFAULT_TRAINING_TYPES = {
    "portrait": {
        "endpoint": "fal-ai/flux-lora-portrait-trainer",
        "result_field": "diffusers_lora_file",
        "images_field": "images_data_url",
        "trigger_field": "trigger_phrase",
        "required": ["images_data_url"],
    },
    "fast": {
        "endpoint": "fal-ai/flux-lora-fast-training",
        "result_field": "diffusers_lora_file",
        "images_field": "images_data_url",
        "trigger_field": "trigger_word",
        "required": ["images_data_url"],
    },
    "style": {
        "endpoint": "fal-ai/flux-pro-trainer",
        "result_field": "finetune_id",
        "images_field": "data_url",
        "trigger_field": "trigger_word",
        "arguments": {"finetune_comment": "{name}"},
        "required": ["data_url", "finetune_comment"],
    },
}
TRAINING_TYPE_SCHEMA = {
    "endpoint": Option((str,), None, _non_empty),
    "result_field": Option((str,), None, _non_empty),
    "images_field": Option((str,), "images_data_url", _non_empty),
    "trigger_field": Option((str,), "trigger_phrase", _non_empty),
    "arguments": Option((dict,), {}, _arguments),
    "required": Option((list,), [], _strings),
}


@dataclass(frozen=True)
class TrainingType:
    name: str
    endpoint: str
    result_field: str
    images_field: str = "images_data_url"
    trigger_field: str = "trigger_phrase"
    arguments: Mapping[str, Any] = field(default_factory=dict)
    """Default model input fields, merged under the caller's; a string may use ``{name}``
    (the training's name) and ``{training_type}``."""
    required: tuple[str, ...] = ()
    """Input fields that must be present (not null, not empty) before a submit is sent."""

    def default_arguments(self, name: str) -> dict[str, Any]:
        """``arguments`` with the placeholders filled in for the training ``name``."""
        fields = {"name": name, "training_type": self.name}
        return {key: _fill(value, fields) for key, value in self.arguments.items()}


@dataclass(frozen=True)
class LayerSettings:
    """One `[layers.NAME]` table: `enabled` plus the layer's own options."""

    name: str
    enabled: bool
    options: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.options[key]


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration."""

    database: Mapping[str, Any]
    fal: Mapping[str, Any]
    webhook: Mapping[str, Any]
    metrics: Mapping[str, Any]
    log: Mapping[str, Any]
    fallback: Mapping[str, Any]
    artifacts: Mapping[str, Any]
    delivery: Mapping[str, Any]
    cluster: Mapping[str, Any]
    url_templates: Mapping[str, str]
    training_types: Mapping[str, TrainingType]
    layers: Mapping[str, LayerSettings]
    source: str
    fal_key: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    delivery_secret: str | None = field(default=None, repr=False)

    @property
    def secrets(self) -> list[str]:
        """Every secret from the environment, and the passwords in configured URLs (such as
        ``postgresql://user:PASSWORD@host/db``), for log redaction."""
        in_urls = [
            p
            for url in (self.database["url"], self.delivery["url"])
            if isinstance(url, str)
            for p in url_passwords(url)
        ]
        return [s for s in (self.fal_key, self.admin_token, self.delivery_secret, *in_urls) if s]

    def layer(self, name: str) -> LayerSettings:
        """The settings of a layer; a layer not named in the file is enabled with no options."""
        return self.layers.get(name) or LayerSettings(name, True)

    def training_type(self, name: str) -> TrainingType:
        try:
            return self.training_types[name]
        except KeyError:
            known = ", ".join(sorted(self.training_types))
            raise ConfigError(f"unknown training type {name!r} (known: {known})") from None

    def fallback_url(self, layer: str, *, name: str, request_id: str) -> str:
        template = self.url_templates.get(layer) or _default_template(layer)
        return template.format(name=name, request_id=request_id)


def _default_template(layer: str) -> str:
    host = FALLBACK_HOSTS.get(layer, f"{layer}-layer")
    return f"https://{host}.fallback.invalid/lora/{{name}}.safetensors"


def _type_name(types: tuple[type, ...]) -> str:
    if types == FLOAT:
        return "a number"
    if types == (list,):
        return "a list of strings"
    if list in types:
        return "a string or a list of strings"
    return {str: "a string", bool: "true or false", int: "an integer"}.get(types[0], "a table")


def _validate_table(table: Any, schema: Mapping[str, Option], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    unknown = sorted(set(table) - set(schema))
    if unknown:
        known = ", ".join(sorted(schema)) or "none"
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known keys: {known})")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        name = f"{where}.{key}"
        if key not in table:
            out[key] = spec.default
            continue
        value = table[key]
        # bool is an int in Python; a number key must not silently accept true/false.
        types = spec.accepted
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise ConfigError(f"{name}: must be {spec.describe()}, got {value!r}")
        if spec.bounded and not spec.within(value):
            raise ConfigError(f"{name}: must be {spec.describe()}, got {value!r}")
        if spec.check is not None:
            problem = spec.check(value)
            if problem:
                shown = redact_url(value) if isinstance(value, str) else value
                raise ConfigError(f"{name}: {problem} (got {shown!r})")
        out[key] = float(value) if types == FLOAT else value
    return out


def validate_options(
    layer: str, declared: Mapping[str, Option], raw: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``[layers.NAME]`` options ``raw`` (without ``enabled``) checked against what the
    layer declares, defaults filled in; ``ConfigError`` naming ``layers.NAME.KEY`` if not."""
    return _validate_table(dict(raw), declared, f"layers.{layer}")


def state_directory() -> Path:
    """systemd's $STATE_DIRECTORY (its first entry) when set, else ./var."""
    state = os.environ.get("STATE_DIRECTORY")
    return Path(state.split(":")[0]) if state else Path("var")


def default_database_url() -> str:
    return f"sqlite:///{state_directory() / 'trainguard.db'}"


def parse(
    data: Mapping[str, Any], *, source: str = "<defaults>", env: Mapping[str, str] | None = None
) -> Settings:
    """Validate a decoded TOML document into Settings."""
    env = os.environ if env is None else env
    tables = set(SCHEMA) | {"layers", "training_types"}
    unknown = sorted(set(data) - tables)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown table (known: {', '.join(sorted(tables))})")

    sections: dict[str, dict[str, Any]] = {}
    templates: Any = {}
    for section, schema in SCHEMA.items():
        raw = data.get(section, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{section}: must be a table")
        raw = dict(raw)
        if section == "fallback":
            templates = raw.pop("url_templates", {})
        sections[section] = _validate_table(raw, schema, section)
    url_templates = _validate_templates(templates)
    jwks_urls = sections["fal"]["jwks_url"]  # one URL stays valid: a list of one
    sections["fal"]["jwks_url"] = [jwks_urls] if isinstance(jwks_urls, str) else list(jwks_urls)
    sections["webhook"]["allowed_user_ids"] = list(sections["webhook"]["allowed_user_ids"])
    if sections["database"]["url"] is None:
        sections["database"]["url"] = default_database_url()
    if not sections["artifacts"]["dir"]:
        sections["artifacts"]["dir"] = str(state_directory() / "artifacts")
    if sections["delivery"]["enabled"] and not sections["delivery"]["url"]:
        raise ConfigError("delivery.url: required when delivery.enabled is true")

    types_raw = data.get("training_types", DEFAULT_TRAINING_TYPES)
    if not isinstance(types_raw, dict) or not types_raw:
        raise ConfigError("training_types: must be a table with at least one [training_types.NAME]")
    training_types = {}
    for name, table in types_raw.items():
        values = _validate_table(table, TRAINING_TYPE_SCHEMA, f"training_types.{name}")
        for key, value in values.items():
            if value is None:
                raise ConfigError(f"training_types.{name}.{key}: missing")
        values["arguments"] = dict(values["arguments"])
        values["required"] = tuple(values["required"])
        training_types[name] = TrainingType(name, **values)

    layers_raw = data.get("layers", {})
    if not isinstance(layers_raw, dict):
        raise ConfigError("layers: must be a table of [layers.NAME] tables")
    layers: dict[str, LayerSettings] = {}
    for name in (*BUILTIN_LAYERS, *sorted(set(layers_raw) - set(BUILTIN_LAYERS))):
        table = layers_raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"layers.{name}: must be a table")
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"layers.{name}.enabled: must be true or false, got {enabled!r}")
        rest = {k: v for k, v in table.items() if k != "enabled"}
        # The built-in layers' options are core policy (reconcile reads them): checked here.
        # A plugin layer's table is kept as given; the daemon checks it against what the
        # layer declares (``Layer.options``) at start and on reload.
        options = (
            _validate_table(rest, LAYER_SCHEMA[name], f"layers.{name}")
            if name in LAYER_SCHEMA
            else rest
        )
        layers[name] = LayerSettings(name, enabled, options)

    key = env.get("FAL_KEY") or None
    admin_token = env.get("TRAINGUARD_ADMIN_TOKEN") or None
    delivery_secret = env.get("TRAINGUARD_DELIVERY_SECRET") or None
    return Settings(
        database=sections["database"],
        fal=sections["fal"],
        webhook=sections["webhook"],
        metrics=sections["metrics"],
        log=sections["log"],
        fallback=sections["fallback"],
        artifacts=sections["artifacts"],
        delivery=sections["delivery"],
        cluster=sections["cluster"],
        url_templates=url_templates,
        training_types=training_types,
        layers=layers,
        source=source,
        fal_key=key,
        admin_token=admin_token,
        delivery_secret=delivery_secret,
    )


def _validate_templates(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError("fallback.url_templates: must be a table of layer = template")
    out = {layer: _default_template(layer) for layer in BUILTIN_LAYERS}
    for layer, template in raw.items():
        name = f"fallback.url_templates.{layer}"
        if not isinstance(template, str):
            raise ConfigError(f"{name}: must be a string, got {template!r}")
        problem = _template(template) or _http_url(template.format(name="n", request_id="r"))
        if problem:
            raise ConfigError(f"{name}: {problem} (got {template!r})")
        out[layer] = template
    return out


def resolve_path(explicit: str | None, env: Mapping[str, str] | None = None) -> tuple[Path, bool]:
    """Where the config comes from: --config, else $TRAINGUARD_CONFIG, else ./config.toml.

    Returns the path and whether it was asked for explicitly (then it must exist).
    """
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit), True
    if env.get("TRAINGUARD_CONFIG"):
        return Path(env["TRAINGUARD_CONFIG"]), True
    return Path("config.toml"), False


def load(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the configuration; the embedded defaults when no file exists."""
    path, required = resolve_path(explicit, env)
    if not path.exists():
        if required:
            raise ConfigError(f"{path}: config file not found")
        return parse({}, source="<embedded defaults>", env=env)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    return loads(text, source=str(path), env=env)


def loads(text: str, *, source: str = "<string>", env: Mapping[str, str] | None = None) -> Settings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    try:
        return parse(data, source=source, env=env)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
