"""JSON logs (issue 13, item 4): each line a JSON object; a request's lines carry the
x-request-id its client got; no line holds the prompt or a key."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_backends import FakeBackend, Reply, gateway_config, serve, tier

from greenroute.backends.base import BadGateway
from greenroute.gateway import cli, logs
from greenroute.gateway.config import GatewayConfig

PROMPT = "my very private prompt"
KEY = "sk-team-secret-0123456789"


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, given back as it was (pytest's own capture handler included)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def fallback_config() -> GatewayConfig:
    return gateway_config(tier("small", fallbacks=["large"]), tier("large", 2.0),
                          keys=[{"id": "team", "key": KEY}], health={"interval_s": 0})


def test_json_lines_carry_the_request_id_and_no_prompt_or_key(
        root_logger: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure("info", "json", out)
    small = FakeBackend("small", reply=Reply(fail=BadGateway("upstream said 500")))
    with serve(fallback_config(), small, FakeBackend("large")) as http:
        answer = http.post("/v1/chat/completions",
                           json={"model": "small",
                                 "messages": [{"role": "user", "content": PROMPT}]},
                           headers={"authorization": f"Bearer {KEY}"})
    logging.getLogger("greenroute.gateway").info("outside any request")
    assert answer.status_code == 200
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    mine = [line for line in lines if line.get("request_id") == answer.headers["x-request-id"]]
    assert [line["message"] for line in mine] == [
        "tier small failed before its first byte (bad_gateway)"]
    assert mine[0]["level"] == "WARNING" and mine[0]["logger"] == "greenroute.gateway"
    outside = lines[-1]
    assert outside["message"] == "outside any request" and "request_id" not in outside
    assert PROMPT not in out.getvalue() and KEY not in out.getvalue()


def test_text_lines_carry_the_request_id_too(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure("warning", "text", out)
    small = FakeBackend("small", reply=Reply(fail=BadGateway("down")))
    with serve(fallback_config(), small, FakeBackend("large")) as http:
        answer = http.post("/v1/completions", json={"model": "small", "prompt": PROMPT},
                           headers={"authorization": f"Bearer {KEY}"})
    assert f"[{answer.headers['x-request-id']}]: tier small failed" in out.getvalue()
    assert PROMPT not in out.getvalue()


def test_an_exception_is_one_json_line_with_its_traceback(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure("info", "json", out)
    token = logs.request_id.set("req-1")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("greenroute.gateway").exception("failed")
    finally:
        logs.request_id.reset(token)
    [line] = [json.loads(text) for text in out.getvalue().splitlines()]
    assert line["request_id"] == "req-1" and "ValueError: boom" in line["exception"]


def test_log_format_comes_from_the_config_or_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[server]\nlog_format = "json"\n\n[[tiers]]\nname = "small"\n'
                    'backend = "openai"\nurl = "http://h/v1"\nmodel = "m"\n')
    args = cli.build_parser(["serve"]).parse_args(["serve", "--config", str(path)])
    assert cli._with_overrides(cli.load_config(args.config), args).server.log_format == "json"
    args = cli.build_parser(["serve"]).parse_args(["serve", "--config", str(path),
                                                   "--log-format", "text"])
    assert cli._with_overrides(cli.load_config(args.config), args).server.log_format == "text"
