"""daemon.logs: JSON lines in UTF-8, bound context, tags, redaction, level filtering."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from trainguard import config, logs

SECRET = "fal-key-0123456789abcdef"


class Output:
    """A non-terminal text stream whose locale encoding is ASCII, like a bare C locale."""

    def __init__(self) -> None:
        self.raw = io.BytesIO()
        self.stream = io.TextIOWrapper(self.raw, encoding="ascii")

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.raw.getvalue().decode().splitlines()]


@pytest.fixture
def out() -> Iterator[Output]:
    output = Output()
    yield output
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter):
            root.removeHandler(handler)


def test_json_lines_are_utf8_unescaped_and_flushed(out: Output) -> None:
    logs.configure(stream=out.stream)
    logs.get_logger().info(f"{logs.CHECK} status checked", note="café")
    raw = out.raw.getvalue()  # no flush by the test: every line is flushed when written
    assert "🔍".encode() in raw
    assert "café".encode() in raw
    assert b"\\u" not in raw
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    (line,) = out.lines()
    assert line["event"] == "🔍 status checked"
    assert line["level"] == "info"
    assert isinstance(line["timestamp"], str) and line["timestamp"].endswith("Z")


def test_bound_context_and_layer_tag(out: Output) -> None:
    logs.configure(stream=out.stream)
    log = logs.get_logger()
    with logs.bound(request_id="req-1", name="portrait", layer="poller"):
        log.info("polled")
    log.info("outside")
    log.info("plugin", layer="my_plugin")
    inside, outside, plugin = out.lines()
    assert inside["request_id"] == "req-1" and inside["name"] == "portrait"
    assert inside["tag"] == logs.CHECK
    assert "request_id" not in outside and "tag" not in outside
    assert "tag" not in plugin


def test_tags() -> None:
    assert logs.tag_for("webhook") == "[WEBHOOK]"
    assert logs.tag_for("poller") == logs.tag_for("startup") == "🔍"
    assert logs.tag_for("delayed") == logs.tag_for("completeness") == "🔄"
    assert logs.tag_for("emergency") == "⚠️"
    assert logs.tag_for("some_plugin") == ""


def test_secrets_redacted_everywhere(out: Output) -> None:
    quoted = 'tok"en\\with-quotes'
    logs.configure(stream=out.stream, secrets=[SECRET, quoted, "abc"])
    log = logs.get_logger()
    log.info(f"using {SECRET}", header={"Authorization": f"Key {SECRET}"}, other=quoted)
    try:
        raise RuntimeError(f"request failed with key {SECRET}")
    except RuntimeError:
        log.exception("boom")
    logging.getLogger("httpx.elsewhere").warning("stdlib record %s", SECRET)
    log.info("short secrets are not redacted: abc")
    raw = out.raw.getvalue().decode()
    assert SECRET not in raw
    assert json.dumps(quoted)[1:-1] not in raw
    assert "abc" in raw
    first, failure, stdlib_line, _ = out.lines()
    assert first["event"] == "using ***"
    assert first["header"] == {"Authorization": "Key ***"}
    assert first["other"] == "***"
    assert failure["exception"][0]["exc_value"] == "request failed with key ***"
    assert "locals" not in failure["exception"][0]["frames"][0]
    assert stdlib_line["event"] == "stdlib record ***"
    assert stdlib_line["logger"] == "httpx.elsewhere"


def test_console_renderer_redacts_exception_text(out: Output) -> None:
    logs.configure(stream=out.stream, json=False, secrets=[SECRET])
    try:
        raise ValueError(SECRET)
    except ValueError:
        logs.get_logger().exception("failed", layer="emergency")
    text = out.raw.getvalue().decode()
    assert "failed" in text and "ValueError: ***" in text and "⚠️" in text
    assert SECRET not in text
    assert not text.lstrip().startswith("{")


def test_level_filtering_and_reconfigure(out: Output) -> None:
    log = logs.get_logger()  # obtained before configure: follows it
    logs.configure("warning", stream=out.stream)
    log.info("dropped")
    log.warning("kept")
    logging.getLogger("hypercorn.error").info("dropped too")
    assert [line["event"] for line in out.lines()] == ["kept"]

    second = Output()
    logs.configure("debug", stream=second.stream)
    log.debug("now visible")
    assert [line["event"] for line in second.lines()] == ["now visible"]
    assert len(out.lines()) == 1


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        logs.configure("loud", stream=io.StringIO())


DB_PASSWORD = "Sup3r-Secret-Pw"


@pytest.mark.parametrize(
    ("command", "url"),
    [
        ("run", f"postgresql://tg:{DB_PASSWORD}@127.0.0.1:9/tg"),  # logged, then cannot connect
        ("run", f"postgresql://127.0.0.1:9/tg?sslmode=disable&password={DB_PASSWORD}"),
        ("check", f"mysql://tg:{DB_PASSWORD}@127.0.0.1:9/tg"),  # refused, the URL named
    ],
)
def test_a_database_password_is_never_printed(tmp_path: Path, command: str, url: str) -> None:
    """issue 9 item 12: the "trainguard starting" line printed a postgresql:// password."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[database]\nurl = "{url}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
        '[webhook]\nlisten = "127.0.0.1:0"\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINGUARD", "FAL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and DB_PASSWORD not in output, output
    assert config.redact_url(url) in output and "***" in config.redact_url(url), output
    if command == "run":
        starting = next(json.loads(x) for x in done.stdout.splitlines() if "starting" in x)
        assert starting["database"] == config.redact_url(url)


def test_url_passwords_are_secrets_to_redact() -> None:
    settings = config.parse(
        {
            "database": {"url": "postgresql://u:p%40ss-word@h/db"},
            "delivery": {"url": "https://bot:hook-pass@bot.example/in"},
        },
        env={},
    )
    assert {"p%40ss-word", "p@ss-word", "hook-pass"} <= set(settings.secrets)
    assert config.redact_url("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"
    assert config.redact_url("sqlite:///var/a:b@c.db") == "sqlite:///var/a:b@c.db"
