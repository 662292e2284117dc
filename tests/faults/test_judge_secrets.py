"""The LLM judge never lets a secret reach a log, at any level: a base_url with credentials or a query string
is refused (httpx logs every request's URL at INFO), error messages show base_url redacted, and an API key
that an HTTP header cannot carry is refused before a request is built (httpcore's DEBUG log quoted it)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rewards.base import RewardInput
from rewards.llm_judge import LLMJudge

PASSWORD = "hunter2-pw-0123"
KEY_VAR = "DUALRL_FAULTS_JUDGE_KEY"


class Judge(BaseHTTPRequestHandler):
    """Answers every chat completion with "Score: 5" and counts the requests."""

    requests = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests += 1
        body = json.dumps({"choices": [{"message": {"content": "Score: 5"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local judge's /v1 URL, with no proxy in the way and no key in the environment."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", KEY_VAR):
        monkeypatch.delenv(name, raising=False)
    Judge.requests = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def batch() -> RewardInput:
    return RewardInput(
        captions=["a red car"],
        caption_ids=[torch.zeros(1, dtype=torch.long)],
        region=torch.arange(1),
        images=torch.zeros(1, 3, 2, 2, dtype=torch.uint8),
        masks=torch.zeros(1, 2, 2, dtype=torch.bool),
        references=[["the red car"]],
    )


def shown(caplog: pytest.LogCaptureFixture, secret: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if secret in r.getMessage() or secret in str(r.args)]


def test_a_judge_without_secrets_in_its_url_still_logs_its_requests(server, caplog):
    """The INFO request line the other tests guard against: what httpx logs for every request."""
    with caplog.at_level(logging.DEBUG):
        out = asyncio.run(LLMJudge(base_url=f"http://{server}", model="m", api_key_env=KEY_VAR)(batch()))
    assert out.scores == [0.5] and Judge.requests == 1
    assert any("HTTP Request: POST" in r.getMessage() and server in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "url",
    [
        f"http://bob:{PASSWORD}@{{server}}",  # user:password@
        f"https://{PASSWORD}@{{server}}",  # a token as the user name
        f"http://{{server}}?api_key={PASSWORD}",  # a key in the query string
        f"http://{{server}}#{PASSWORD}",
    ],
)
def test_credentials_in_base_url_are_refused_without_showing_them(server, caplog, url):
    with caplog.at_level(logging.DEBUG), pytest.raises(ValueError, match="llm_judge: base_url") as err:
        LLMJudge(base_url=url.format(server=server), model="m", api_key_env=KEY_VAR)
    assert PASSWORD not in str(err.value) and "***" in str(err.value)
    assert Judge.requests == 0 and shown(caplog, PASSWORD) == []


@pytest.mark.parametrize("url", [f"ftp://bob:{PASSWORD}@host/v1", f"bob:{PASSWORD}@host/v1"])
def test_other_base_url_errors_show_it_redacted(url):
    with pytest.raises(ValueError, match="must start with http") as err:
        LLMJudge(base_url=url, model="m")
    assert PASSWORD not in str(err.value)


@pytest.mark.parametrize(
    "key",
    ["sk-abc\n", "sk-abc\r\nX-Injected: 1", "sk-abc def", "sk-abc\t", "sk-\u00e9t\u00e9", "sk-\x7fabc"],
)
def test_a_key_that_a_header_cannot_carry_is_refused_by_name(server, caplog, monkeypatch, key):
    monkeypatch.setenv(KEY_VAR, key)
    with pytest.raises(ValueError, match=f"API key in \\${KEY_VAR}") as err:
        LLMJudge(base_url=f"http://{server}", model="m", api_key_env=KEY_VAR)
    assert "sk-" not in str(err.value)


def test_a_bad_key_exported_after_construction_fails_the_call_before_any_request(server, caplog, monkeypatch):
    """The key is read at every call: one with a newline fails the call (the reward runner counts and logs
    the plugin's failure) and never reaches the HTTP library, whose DEBUG log quoted the header."""
    plugin = LLMJudge(base_url=f"http://{server}", model="m", api_key_env=KEY_VAR, max_retries=0)
    monkeypatch.setenv(KEY_VAR, "sk-secret-0123\nmore")
    with caplog.at_level(logging.DEBUG), pytest.raises(ValueError, match="cannot carry") as err:
        asyncio.run(plugin(batch()))
    assert "sk-secret" not in str(err.value) and shown(caplog, "sk-secret") == []
    assert Judge.requests == 0
