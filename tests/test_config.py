"""Configuration: defaults, the shipped config.toml, and one clear error per bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard import config
from trainguard.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_documented_ones() -> None:
    s = config.parse({}, env={})
    assert s.fal["queue_url"] == "https://queue.fal.run"
    assert s.layer("poller")["first_check_after_seconds"] == 90
    assert s.layer("poller")["interval_seconds"] == 60
    assert s.layer("delayed")["after_seconds"] == 600
    assert s.layer("completeness")["interval_seconds"] == 300
    assert s.layer("emergency")["deadline_seconds"] == 21600
    assert s.fallback == {"mode": "complete", "trigger_phrase": "TOK"}
    assert s.training_type("portrait").endpoint == "fal-ai/flux-lora-portrait-trainer"
    assert s.training_type("style").result_field == "finetune_id"
    assert s.metrics["listen"].startswith("127.0.0.1:")
    assert s.fal_key is None


def test_shipped_config_toml_equals_the_embedded_defaults() -> None:
    shipped = config.load(str(ROOT / "config.toml"), env={})
    embedded = config.parse({}, env={})
    for section in (
        "fal",
        "webhook",
        "metrics",
        "log",
        "fallback",
        "artifacts",
        "delivery",
        "url_templates",
    ):
        assert getattr(shipped, section) == getattr(embedded, section), section
    for name in config.BUILTIN_LAYERS:
        assert shipped.layer(name) == embedded.layer(name), name
    # the built-in plugin layer's table documents its own defaults
    from dataclasses import asdict

    from trainguard.plugins.artifacts import Options

    artifacts = shipped.layer("artifacts")
    assert artifacts.enabled and asdict(Options.parse(artifacts.options)) == asdict(Options())
    assert shipped.training_types == embedded.training_types


def test_database_default_follows_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/trainguard")
    assert config.parse({}, env={}).database["url"] == "sqlite:////var/lib/trainguard/trainguard.db"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert config.parse({}, env={}).database["url"] == "sqlite:///var/trainguard.db"


def test_secret_comes_from_environment_only() -> None:
    s = config.parse({}, env={"FAL_KEY": "sekrit-key-123"})
    assert s.fal_key == "sekrit-key-123"
    assert "sekrit" not in repr(s)
    with pytest.raises(ConfigError, match=r"fal\.key: unknown key"):
        config.parse({"fal": {"key": "x"}}, env={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[fal]\nqueue_url = 3", r"fal\.queue_url: must be a string"),
        ("[fal]\nqueue_url = 'ftp://x'", r"fal\.queue_url: must be an http"),
        ("[fal]\nmax_requests_per_second = 0", r"fal\.max_requests_per_second: must be greater"),
        ("[fal]\ntimeout_seconds = true", r"fal\.timeout_seconds: must be a number"),
        ("[webhook]\nlisten = 'localhost'", r"webhook\.listen: must be \"host:port\""),
        (
            "[webhook]\nverify_signatures = 'yes'",
            r"webhook\.verify_signatures: must be true or false",
        ),
        (
            "[layers.poller]\ninterval_seconds = -1",
            r"layers\.poller\.interval_seconds: must be greater",
        ),
        ("[layers.poller]\nenabled = 1", r"layers\.poller\.enabled: must be true or false"),
        (
            "[layers.poller]\nintervall_seconds = 5",
            r"layers\.poller\.intervall_seconds: unknown key",
        ),
        ("[fallback]\nmode = 'maybe'", r"fallback\.mode: must be \"complete\" or \"fail\""),
        (
            "[fallback.url_templates]\npoller = 'https://x/{user}'",
            r"fallback\.url_templates\.poller",
        ),
        ("[training_types.x]\nendpoint = 'a/b'", r"training_types\.x\.result_field: missing"),
        ("[database]\nurl = 'mysql://x'", r"database\.url: must be sqlite"),
        ("[nonsense]\na = 1", r"nonsense: unknown table"),
        ("layers = 3", r"layers: must be a table"),
        ("[log]\nlevel = 'loud'", r"log\.level: must be one of"),
        ("x = ", r"not valid TOML"),
        ("[fal]\njwks_url = []", r"fal\.jwks_url: must name at least one URL"),
        ("[fal]\njwks_url = ['https://a/k', 3]", r"fal\.jwks_url: entry #2 must be a string"),
        ("[fal]\njwks_url = ['ftp://a/k']", r"fal\.jwks_url: entry #1 must be an http"),
        ("[fal]\njwks_url = 3", r"fal\.jwks_url: must be a string or a list of strings"),
        ("[webhook]\nallowed_user_ids = 'u'", r"webhook\.allowed_user_ids: must be a list"),
        (
            "[training_types.x]\nendpoint = 'a/b'\nresult_field = 'r'\narguments = 3",
            r"training_types\.x\.arguments: must be a table",
        ),
        (
            "[training_types.x]\nendpoint = 'a/b'\nresult_field = 'r'\n"
            "arguments = { note = 'for {user}' }",
            r"training_types\.x\.arguments: field 'note' may only use \{name\} and "
            r"\{training_type\}, not \{user\}",
        ),
        (
            "[training_types.x]\nendpoint = 'a/b'\nresult_field = 'r'\n"
            "arguments = { opts = { tags = ['{name:d}'] } }",
            r"training_types\.x\.arguments: field 'opts'\.tags\[0\] is not a valid template",
        ),
        (
            "[training_types.x]\nendpoint = 'a/b'\nresult_field = 'r'\n"
            "arguments = { when = 2026-12-01 }",
            r"training_types\.x\.arguments: field 'when' must be a JSON value",
        ),
        (
            "[training_types.x]\nendpoint = 'a/b'\nresult_field = 'r'\narguments = { lr = nan }",
            r"training_types\.x\.arguments: field 'lr' must be a finite number",
        ),
        (
            "[training_types.x]\nendpoint = 'a/b'\nresult_field = 'r'\nrequired = [1]",
            r"training_types\.x\.required: entry #1 must be a non-empty string",
        ),
        ("[webhook]\nallowed_user_ids = ['u', '']", r"allowed_user_ids: entry #2 must be a non"),
        ("[metrics]\nallowed_hosts = 'x'", r"metrics\.allowed_hosts: must be a list"),
        ("[metrics]\nallowed_hosts = ['a:80']", r"metrics\.allowed_hosts: must be host names"),
        ("[metrics]\nmax_connections = 0", r"metrics\.max_connections: must be greater"),
        ("[webhook]\nmax_connections = 1.5", r"webhook\.max_connections: must be an integer"),
    ],
)
def test_bad_config_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.loads(text, env={})


def test_training_type_arguments_and_required() -> None:
    style = config.parse({}, env={}).training_type("style")
    assert style.required == ("data_url", "finetune_comment")
    assert style.default_arguments("ann") == {"finetune_comment": "ann"}
    assert config.parse({}, env={}).training_type("portrait").default_arguments("ann") == {}
    custom = config.loads(
        "[training_types.x]\nendpoint = 'a/b'\nresult_field = 'r'\nrequired = ['mask_url']\n"
        "arguments = { steps = 200, note = '{{{name}}} via {training_type}',"
        " opts = { tags = ['{name}', 1.5, true] } }\n",
        env={},
    ).training_type("x")
    assert custom.required == ("mask_url",)
    assert custom.default_arguments("bo") == {
        "steps": 200,
        "note": "{bo} via x",
        "opts": {"tags": ["bo", 1.5, True]},
    }


def test_jwks_url_takes_a_list_and_one_string_stays_valid() -> None:
    assert config.parse({}, env={}).fal["jwks_url"] == [
        "https://rest.alpha.fal.ai/.well-known/jwks.json",
        "https://rest.fal.ai/.well-known/jwks.json",
    ]
    one = config.loads("[fal]\njwks_url = 'https://keys.example/jwks.json'", env={})
    assert one.fal["jwks_url"] == ["https://keys.example/jwks.json"]
    two = config.loads("[fal]\njwks_url = ['https://a/k.json', 'http://b/k.json']", env={})
    assert two.fal["jwks_url"] == ["https://a/k.json", "http://b/k.json"]


def test_fractional_timings_and_plugin_layer_tables() -> None:
    s = config.loads(
        "[layers.poller]\ninterval_seconds = 0.25\n[layers.my_layer]\nenabled = false\nthreshold = 3\n",
        env={},
    )
    assert s.layer("poller")["interval_seconds"] == 0.25
    assert s.layer("my_layer").enabled is False
    assert s.layer("my_layer")["threshold"] == 3


def test_fallback_templates_default_to_invalid_tld() -> None:
    s = config.parse({}, env={})
    for layer in config.BUILTIN_LAYERS:
        url = s.fallback_url(layer, name="ann", request_id="r-1")
        assert ".fallback.invalid/" in url
    assert s.fallback_url("poller", name="ann", request_id="r") == (
        "https://status-checker.fallback.invalid/lora/ann.safetensors"
    )
    custom = config.loads(
        "[fallback.url_templates]\nemergency = 'https://cdn.example.org/house/{request_id}.safetensors'",
        env={},
    )
    assert custom.fallback_url("emergency", name="x", request_id="r9").endswith(
        "/house/r9.safetensors"
    )


def test_config_path_resolution(tmp_path: Path) -> None:
    assert config.resolve_path(None, env={}) == (Path("config.toml"), False)
    assert config.resolve_path(None, env={"TRAINGUARD_CONFIG": "/etc/x.toml"}) == (
        Path("/etc/x.toml"),
        True,
    )
    assert config.resolve_path("a.toml", env={"TRAINGUARD_CONFIG": "/etc/x.toml"}) == (
        Path("a.toml"),
        True,
    )
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(str(tmp_path / "missing.toml"), env={})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_either_valid_or_a_config_error(text: str) -> None:
    try:
        config.loads(text, env={})
    except ConfigError as exc:
        assert str(exc)


def test_the_cluster_table_has_its_defaults_and_refuses_a_bad_instance_id() -> None:
    settings = config.parse({}, env={})
    assert dict(settings.cluster) == {
        "instance_id": "",
        "heartbeat_seconds": 5.0,
        "lease_seconds": 15.0,
        "claim_seconds": 60.0,
    }
    assert config.parse({"cluster": {"instance_id": "eu-1.a_b"}}, env={}).cluster[
        "instance_id"
    ] == ("eu-1.a_b")
    with pytest.raises(ConfigError, match=r"^cluster\.instance_id: must be empty or up to 64"):
        config.parse({"cluster": {"instance_id": "has space"}}, env={})
    with pytest.raises(ConfigError, match=r"^cluster\.lease_seconds: "):
        config.parse({"cluster": {"lease_seconds": 0}}, env={})
