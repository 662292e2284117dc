"""Tests for rewards.llm_judge against a real local HTTP server speaking the chat-completions protocol.

The server picks its behaviour from the caption inside the prompt: the tests use a prompt that wraps the
caption in `CAPTION<<...>>`, and the caption's first word is the mode, its second (if any) the 0-10 score
to answer with, e.g. "ok 7 a red car" -> "Score: 7". Modes: ok, plain, json, hold (answers after a short
pause), slow (sleeps past the request timeout), flaky500 / flaky429 / throttle (first request fails with 500,
429 + Retry-After: 0, 429 + Retry-After: 100), down (always 503), reject (400), garbage (no number).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rewards.base import RewardInput, RewardOutput
from rewards.llm_judge import DEFAULT_PROMPT, LLMJudge, parse_score, render_prompt

TEST_PROMPT = "REFS:\n{references}\nCAPTION<<{caption}>>"
CAPTION_RE = re.compile(r"CAPTION<<(.*?)>>", re.DOTALL)
SLOW_S = 1.0  # how long "slow" answers take; every test's request timeout / deadline is well below
HOLD_S = 0.05  # how long "hold" answers take, so that concurrent requests overlap
SECRET = "sk-test-secret-0123456789"


class JudgeServer(ThreadingHTTPServer):
    """A chat-completions server on 127.0.0.1 that records what it was sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.lock = threading.Lock()
        self.generation = 0
        self.reset()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def reset(self) -> None:
        """Forget everything; requests still running from an earlier test no longer count."""
        with self.lock:
            self.generation += 1
            self.seen: Counter[str] = Counter()  # requests per caption
            self.bodies: list[dict] = []
            self.auth: list[str | None] = []
            self.in_flight = 0
            self.max_in_flight = 0

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def enter(self, caption: str, body: dict, auth: str | None) -> tuple[int, int]:
        """Record a request; returns (generation, how many requests this caption has had)."""
        with self.lock:
            self.seen[caption] += 1
            self.bodies.append(body)
            self.auth.append(auth)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.generation, self.seen[caption]

    def leave(self, generation: int) -> None:
        with self.lock:
            if generation == self.generation:
                self.in_flight -= 1

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that gave up (timeouts, cancelled requests) close their socket: not worth a traceback."""


class JudgeHandler(BaseHTTPRequestHandler):
    server: JudgeServer

    def log_message(self, *args: object) -> None:
        """Keep the test output quiet."""

    generation: int | None = None  # the server generation this request entered in, until it leaves

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": "not found"})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        match = CAPTION_RE.search(body["messages"][-1]["content"])
        caption = match.group(1) if match else ""
        self.generation, count = self.server.enter(caption, body, self.headers.get("Authorization"))
        try:
            self._respond(caption, count)
        except OSError:
            pass  # the client hung up
        finally:
            self._leave()

    def _leave(self) -> None:
        """The request stops counting as in flight before its answer is written: once the client has the answer
        it may send the next request, which this thread could otherwise still count with it."""
        if self.generation is not None:
            self.server.leave(self.generation)
            self.generation = None

    def _respond(self, caption: str, count: int) -> None:
        mode, _, rest = caption.partition(" ")
        score = rest.split(" ")[0] if rest else "5"
        if mode == "hold":
            time.sleep(HOLD_S)
        if mode == "slow":
            time.sleep(SLOW_S)
        if mode == "down" or (mode == "flaky500" and count == 1):
            status = 503 if mode == "down" else 500
            self._send(status, {"error": "unavailable"})
        elif mode in ("flaky429", "throttle") and count == 1:
            self._send(429, {"error": "slow down"}, {"Retry-After": "0" if mode == "flaky429" else "100"})
        elif mode == "reject":
            self._send(400, {"error": "bad request"})
        elif mode == "garbage":
            self._answer("I cannot help with that.")
        elif mode == "plain":
            self._answer(score)
        elif mode == "json":
            self._answer(f'```json\n{{"score": {score}}}\n```')
        else:
            self._answer(f"Score: {score}")

    def _answer(self, content: str) -> None:
        message = {"role": "assistant", "content": content}
        self._send(200, {"object": "chat.completion", "choices": [{"index": 0, "message": message}]})

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self._leave()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def judge_server() -> Iterator[JudgeServer]:
    server = JudgeServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(judge_server: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> JudgeServer:
    """The shared server, reset, with no proxy settings that could divert requests to 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    judge_server.reset()
    return judge_server


def make_judge(server: JudgeServer, **options: object) -> LLMJudge:
    settings: dict = {
        "base_url": server.base_url + "/",
        "model": "judge-test",
        "prompt": TEST_PROMPT,
        "api_key_env": "DUALRL_TEST_JUDGE_KEY",
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "request_timeout_s": 2.0,
        "deadline_s": 10.0,
    }
    return LLMJudge(**{**settings, **options})


def make_batch(captions: list[str], references: list[list[str]] | None = None) -> RewardInput:
    """One region per caption; tensors are tiny dummies (the judge reads only captions and references)."""
    n = len(captions)
    return RewardInput(
        captions=captions,
        caption_ids=[torch.zeros(1, dtype=torch.long) for _ in captions],
        region=torch.arange(n),
        images=torch.zeros(n, 3, 2, 2, dtype=torch.uint8),
        masks=torch.zeros(n, 2, 2, dtype=torch.bool),
        references=references if references is not None else [["a reference"] for _ in captions],
    )


def judge(plugin: LLMJudge, batch: RewardInput) -> RewardOutput:
    return asyncio.run(plugin(batch))


# --- parsing and prompts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7", 7.0),
        ("0", 0.0),
        ("10", 10.0),
        ("7.", 7.0),
        ("7/10", 7.0),
        ("7 / 10", 7.0),
        ("I would rate it 6 out of 10.", 6.0),
        ("Score: 7", 7.0),
        ("score = 7.5", 7.5),
        ("The score is 4", 4.0),
        ("**Score:** 9", 9.0),
        ("Score: 10/10", 10.0),
        ('{"score": 7}', 7.0),
        ('{"score": "6", "reason": "misses 2 of the 3 objects"}', 6.0),
        ('```json\n{"score": 8}\n```', 8.0),
        ("The caption names the right object (1 car) but the wrong colour.\nScore: 8", 8.0),
        ("Score: 3. A score of 10 would need the colour too.", 3.0),
        ("Considering 2 references, I'd give it 5", 5.0),
        ("In 2024 terms: 4", 4.0),  # numbers outside 0..10 are skipped when there is no label
    ],
)
def test_parse_score_accepts(text: str, expected: float) -> None:
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "   \n",
        "I cannot help with that.",
        "Score: seven",
        "11",
        "-3",
        "-0.5",
        "100/10",
        "Score: 11",
        "Score: -1",
        '{"score": 42}',
    ],
)
def test_parse_score_rejects(text: str | None) -> None:
    assert parse_score(text) is None


def test_render_prompt_fills_both_placeholders_only() -> None:
    text = render_prompt(DEFAULT_PROMPT, "a red car", ["the red car on the left", "red vehicle"])
    assert "a red car" in text and "- the red car on the left\n- red vehicle" in text
    assert "{caption}" not in text and "{references}" not in text
    assert render_prompt('Say {"score": N}. {caption} | {references}', "{references}", ["r"]) == (
        'Say {"score": N}. {references} | - r'
    )


@pytest.mark.parametrize(
    "options",
    [
        {"base_url": ""},
        {"base_url": "   "},
        {"base_url": "127.0.0.1:8000/v1"},
        {"model": ""},
        {"prompt": "Rate {caption}."},
        {"max_concurrency": 0},
        {"request_timeout_s": 0},
        {"deadline_s": -1},
        {"max_retries": -1},
        {"cache_size": -5},
        {"max_tokens": 0},
    ],
)
def test_bad_configuration_raises(options: dict) -> None:
    settings = {"base_url": "http://127.0.0.1:8000/v1", "model": "m", **options}
    with pytest.raises(ValueError, match="llm_judge"):
        LLMJudge(**settings)


# --- scoring ----------------------------------------------------------------------------------------------------


def test_scores_are_normalised_and_in_caption_order(server: JudgeServer) -> None:
    captions = ["ok 7 a dog", "ok 0 a cat", "ok 10 a bus", "plain 3 a cup", "json 9 a hat", "hold 2 a pen"]
    out = judge(make_judge(server), make_batch(captions))
    assert out.scores == pytest.approx([0.7, 0.0, 1.0, 0.3, 0.9, 0.2])
    assert out.failures == 0
    assert out.metrics["requests"] == 6 and out.metrics["retries"] == 0 and out.metrics["cache_hits"] == 0
    assert out.metrics["latency_ms"] > 0


def test_request_payload_and_default_prompt(server: JudgeServer) -> None:
    plugin = LLMJudge(
        base_url=server.base_url,
        model="judge-test",
        api_key_env="DUALRL_TEST_JUDGE_KEY",
        temperature=0.0,
        max_tokens=16,
    )
    out = judge(plugin, make_batch(["a small red car"], [["the red car", "a toy car"]]))
    assert out.scores == [0.5]  # the default prompt has no CAPTION<<>> marker: the server answers "Score: 5"
    body = server.bodies[-1]
    assert body["model"] == "judge-test" and body["temperature"] == 0.0 and body["max_tokens"] == 16
    prompt = body["messages"][0]["content"]
    assert body["messages"][0]["role"] == "user"
    assert "a small red car" in prompt and "- the red car\n- a toy car" in prompt and "0" in prompt


def test_captions_without_references_get_none_and_no_request(server: JudgeServer) -> None:
    out = judge(make_judge(server), make_batch(["ok 4 x", "ok 6 y", "ok 8 z"], [[], ["ref"], []]))
    assert out.scores == [None, pytest.approx(0.6), None]
    assert out.failures == 0
    assert server.total == 1 and server.seen["ok 6 y"] == 1


def test_retries_after_500_and_429(server: JudgeServer) -> None:
    out = judge(make_judge(server), make_batch(["flaky500 6 a", "flaky429 9 b"]))
    assert out.scores == pytest.approx([0.6, 0.9])
    assert out.failures == 0
    assert server.seen["flaky500 6 a"] == 2 and server.seen["flaky429 9 b"] == 2
    assert out.metrics["requests"] == 4 and out.metrics["retries"] == 2


def test_retry_after_is_honoured_and_capped(server: JudgeServer) -> None:
    """Retry-After: 0 beats a 5 s backoff; Retry-After: 100 is capped by max_backoff_s."""
    plugin = make_judge(server, backoff_s=5.0, max_backoff_s=0.1)
    start = time.perf_counter()
    out = judge(plugin, make_batch(["flaky429 3 c"]))
    assert out.scores == pytest.approx([0.3])
    out = judge(plugin, make_batch(["throttle 4 d"]))
    assert out.scores == pytest.approx([0.4])
    assert time.perf_counter() - start < 1.0


def test_always_failing_server_gives_none_after_bounded_retries(server: JudgeServer) -> None:
    start = time.perf_counter()
    out = judge(make_judge(server, max_retries=2), make_batch(["down a", "down b", "down c"]))
    assert out.scores == [None, None, None]
    assert out.failures == 3
    assert all(server.seen[c] == 3 for c in ("down a", "down b", "down c"))  # 1 try + 2 retries each
    assert out.metrics["requests"] == 9 and out.metrics["retries"] == 6
    assert time.perf_counter() - start < 1.0


def test_client_errors_are_not_retried(server: JudgeServer) -> None:
    out = judge(make_judge(server), make_batch(["reject a", "ok 5 b"]))
    assert out.scores == [None, pytest.approx(0.5)]
    assert out.failures == 1 and server.seen["reject a"] == 1


def test_connection_errors_are_retried_then_counted(server: JudgeServer) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    plugin = make_judge(server, base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    out = judge(plugin, make_batch(["ok 5 nowhere"]))
    assert out.scores == [None] and out.failures == 1
    assert out.metrics["requests"] == 2 and out.metrics["retries"] == 1


def test_slow_answers_time_out_and_fail(server: JudgeServer) -> None:
    plugin = make_judge(server, request_timeout_s=0.2, max_retries=1)
    start = time.perf_counter()
    out = judge(plugin, make_batch(["slow a", "slow b", "ok 7 c"]))
    elapsed = time.perf_counter() - start
    assert out.scores == [None, None, pytest.approx(0.7)]
    assert out.failures == 2
    assert server.seen["slow a"] == 2 and server.seen["slow b"] == 2
    assert 0.4 <= elapsed < 0.9  # two 0.2 s timeouts (plus a short backoff) per slow caption, run concurrently


def test_deadline_cancels_what_is_left(server: JudgeServer, caplog: pytest.LogCaptureFixture) -> None:
    plugin = make_judge(server, request_timeout_s=5.0, deadline_s=0.3)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="rewards.llm_judge"):
        out = judge(plugin, make_batch(["slow d", "ok 4 e"]))
    elapsed = time.perf_counter() - start
    assert out.scores == [None, pytest.approx(0.4)]
    assert out.failures == 1
    assert 0.3 <= elapsed < 0.8
    assert any("deadline" in r.getMessage() and "llm_judge" in r.getMessage() for r in caplog.records)


def test_garbage_answer_is_a_failure_asked_twice_at_most(server: JudgeServer) -> None:
    plugin = make_judge(server, max_retries=3)
    out = judge(plugin, make_batch(["garbage a", "ok 1 b"]))
    assert out.scores == [None, pytest.approx(0.1)]
    assert out.failures == 1
    assert server.seen["garbage a"] == 2
    judge(plugin, make_batch(["garbage a"]))  # failures are not cached: asked again next step
    assert server.seen["garbage a"] == 4


# --- cache and concurrency -----------------------------------------------------------------------------------


def test_cache_answers_a_repeated_batch_without_requests(server: JudgeServer) -> None:
    plugin = make_judge(server)
    batch = make_batch(["ok 6 cached", "ok 2 cached"])
    first = judge(plugin, batch)
    second = judge(plugin, batch)  # a new event loop: the plugin is not tied to one
    assert first.scores == second.scores == pytest.approx([0.6, 0.2])
    assert server.total == 2
    assert second.metrics["requests"] == 0 and second.metrics["cache_hits"] == 2


def test_duplicates_in_a_batch_share_one_request(server: JudgeServer) -> None:
    captions = ["ok 3 dup", "ok 3 dup", "ok 3 dup", "ok 3 dup"]
    references = [["r1"], ["r1"], ["r1"], ["r2"]]  # the last one has other references: a different question
    out = judge(make_judge(server), make_batch(captions, references))
    assert out.scores == pytest.approx([0.3] * 4)
    assert server.seen["ok 3 dup"] == 2
    assert out.metrics["requests"] == 2 and out.metrics["cache_hits"] == 2


def test_cache_is_bounded_lru(server: JudgeServer) -> None:
    plugin = make_judge(server, cache_size=2)
    for caption in ["ok 1 a", "ok 2 b", "ok 1 a", "ok 3 c", "ok 1 a", "ok 2 b"]:
        judge(plugin, make_batch([caption]))
    # "a" is refreshed before "c" arrives, so "b" is evicted and asked again; "a" stays cached.
    assert server.seen == Counter({"ok 1 a": 1, "ok 2 b": 2, "ok 3 c": 1})


def test_concurrency_limit_is_respected(server: JudgeServer) -> None:
    captions = [f"hold {i} region {i}" for i in range(8)]
    out = judge(make_judge(server, max_concurrency=2), make_batch(captions))
    assert out.scores == pytest.approx([i / 10 for i in range(8)])
    assert server.max_in_flight == 2


# --- secrets and logging -------------------------------------------------------------------------------------


def test_api_key_is_sent_but_never_shown(
    server: JudgeServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DUALRL_TEST_JUDGE_KEY", SECRET)
    plugin = make_judge(server, max_retries=1)
    with caplog.at_level(logging.DEBUG):
        out = judge(plugin, make_batch(["ok 8 auth", "down auth", "garbage auth", "reject auth"]))
    assert out.scores[0] == pytest.approx(0.8) and out.failures == 3
    assert server.auth and all(header == f"Bearer {SECRET}" for header in server.auth)
    assert repr(plugin) == f"LLMJudge(base_url={server.base_url!r}, model='judge-test')"
    assert SECRET not in repr(vars(plugin))
    assert caplog.records  # failures were logged
    assert not [r for r in caplog.records if SECRET in r.getMessage() or SECRET in str(r.args)]


def test_no_authorization_header_without_a_key(server: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DUALRL_TEST_JUDGE_KEY", raising=False)
    judge(make_judge(server), make_batch(["ok 5 anonymous"]))
    assert server.auth == [None]


def test_each_failure_kind_warns_once(server: JudgeServer, caplog: pytest.LogCaptureFixture) -> None:
    plugin = make_judge(server, max_retries=0)
    with caplog.at_level(logging.DEBUG, logger="rewards.llm_judge"):
        judge(plugin, make_batch(["down 1", "down 2", "garbage 1"]))
        judge(plugin, make_batch(["down 3"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert sum("HTTP 503" in w for w in warnings) == 1 and sum("unparsable answer" in w for w in warnings) == 1
    later = [r for r in caplog.records if r.levelno == logging.DEBUG and "HTTP 503" in r.getMessage()]
    assert len(later) == 2
