"""`llm_judge`: score region captions with a judge LLM behind an OpenAI-compatible chat-completions API.

For every caption whose region has reference descriptions, the plugin renders a prompt, POSTs it to
`{base_url}/chat/completions` as `{"model", "messages", "temperature", "max_tokens"}` and reads
`choices[0].message.content`. The answer is parsed (`parse_score`) into a number on a 0-10 scale and
returned to dualrl divided by 10, so scores lie in [0, 1]. A caption whose region has no references gets
`None` (not applicable, not a failure) and no request is sent for it.

Prompt
    `DEFAULT_PROMPT` asks the judge to rate how well the candidate caption matches the reference
    description(s) of the same image region, as an integer from 0 (unrelated or wrong) to 10 (as accurate
    and specific as the references), answering with only the number or `Score: N`. Override it with the
    `prompt` option: a template with a `{references}` placeholder (one `- reference` line each) and a
    `{caption}` placeholder. Only those two placeholders are substituted, so other braces (a JSON example
    in the prompt) are left as written.

Parsing
    `7`, `7/10`, `7 out of 10`, `Score: 7`, `score = 7.5`, `{"score": 7}` (also inside ``` fences) and
    free text ending in `Score: 8` are accepted. An explicit "score" label wins (the last one); otherwise
    the last number between 0 and 10 is taken. A labelled number outside [0, 10], an empty answer or an
    answer without any usable number is unparsable.

Failures
    Requests run concurrently, at most `max_concurrency` at a time per call, each limited to
    `request_timeout_s`. HTTP 429, 5xx, timeouts and connection errors are retried up to `max_retries`
    times with exponential backoff (`backoff_s * 2**attempt`, capped at `max_backoff_s`, with jitter); a
    numeric `Retry-After` header is honoured (also capped at `max_backoff_s`). Other 4xx answers are not
    retried; an unparsable answer is asked again once. Whatever is not scored within `deadline_s` of the
    start of the batch is cancelled. Each such caption scores `None` and is counted in
    `RewardOutput.failures`; nothing is raised for a single caption. The first failure of each kind
    (`HTTP 503`, `timeout`, `connection error`, `unparsable answer`, `deadline`, ...) is logged at WARNING,
    later ones at DEBUG. Keep `deadline_s` below the reward entry's `timeout_s` in the recipe (60 s by
    default): past that timeout dualrl fails the whole plugin for the step, scores already obtained included.

Cache
    Successful scores are kept in an LRU cache of `cache_size` entries keyed on (model, rendered prompt):
    a (caption, references) pair already judged is not asked again, in the same batch (duplicates share
    one request) or in a later step. Failures are not cached. `cache_size=0` disables the cache.

Metrics (per call)
    `requests` (HTTP requests sent, retries included), `retries`, `cache_hits` (captions answered without
    a request of their own: cached earlier, or a duplicate of another caption in the batch) and
    `latency_ms` (mean time to a response, 0 when none was sent).

Knobs
    `base_url`, `model`, `api_key_env`, `prompt`, `max_concurrency`, `request_timeout_s`, `max_retries`,
    `backoff_s`, `max_backoff_s`, `deadline_s`, `cache_size`, `temperature`, `max_tokens` (the signature of
    `LLMJudge`).

Serving a judge
    vLLM: `vllm serve <model>`, then `base_url: http://127.0.0.1:8000/v1` and `model: <model>`.
    SGLang: `python -m sglang.launch_server --model-path <model>`, then `base_url: http://127.0.0.1:30000/v1`.
    Ollama: `ollama serve` (and `ollama pull <model>`), then `base_url: http://127.0.0.1:11434/v1`.
    A hosted API: its `/v1` base URL, with the key exported in the environment.

API key
    The key is read only from the environment variable named by `api_key_env` (default `OPENAI_API_KEY`),
    at construction and at every call, and sent as `Authorization: Bearer <key>` when the variable is set.
    It is never stored on the plugin, logged, or put in an error message; `repr` shows only `base_url` and
    `model`. A key that an HTTP header cannot carry (a newline, a space, a control or non-ASCII character:
    often a trailing newline from the file it was read from) is refused with a ValueError that names the
    variable, not the key; sent, it would fail in the HTTP library, whose debug log quotes the header.
    A `base_url` with credentials (`https://user:password@host/v1`) or a query string is refused: the HTTP
    library logs every request's URL at INFO. Error messages about `base_url` show it without them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx

from rewards.base import RewardInput, RewardOutput

logger = logging.getLogger(__name__)

MAX_SCORE = 10.0

DEFAULT_PROMPT = """You are grading a caption written for one region of an image.

Reference description(s) of the same image region:
{references}

Candidate caption:
{caption}

Rate how well the candidate caption matches the reference description(s): does it describe the same \
object or region, with the right category, attributes (colour, size, material), position, count and action? \
Use an integer scale from 0 (unrelated or wrong) to 10 (as accurate and specific as the references).
Answer with only the number, or "Score: N"."""

_PLACEHOLDER = re.compile(r"\{(references|caption)\}")
_NUMBER = r"-?\d+(?:\.\d+)?"
# "Score: 7", "score = 7.5", '"score": "7"', "**Score:** 7", "The score is 7".
_LABELLED = re.compile(r"\bscore\b[\"'*\s]*(?:[:=]|\bis\b)?[\"'*\s]*(" + _NUMBER + ")", re.IGNORECASE)
# "7/10", "7 / 10", "7 out of 10" -> "7", so that the denominator is not taken for the score.
_OUT_OF_TEN = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|\bout of\b)\s*10(?!\d|\.\d)", re.IGNORECASE)
_BARE = re.compile(r"(?<![\w.])" + _NUMBER + r"(?!\w)")


def parse_score(text: str | None) -> float | None:
    """The 0-10 score in a judge's answer, or None when there is no usable one (see the module docstring)."""
    if text is None or not text.strip():
        return None
    labelled = _LABELLED.findall(text)
    if labelled:
        return _in_range(float(labelled[-1]))
    numbers = [float(n) for n in _BARE.findall(_OUT_OF_TEN.sub(r"\1", text))]
    in_range = [n for n in numbers if _in_range(n) is not None]
    return in_range[-1] if in_range else None


def _in_range(value: float) -> float | None:
    return value if 0.0 <= value <= MAX_SCORE else None


def render_prompt(template: str, caption: str, references: list[str]) -> str:
    """`template` with `{references}` (one "- reference" line each) and `{caption}` filled in, in one pass."""
    values = {"references": "\n".join(f"- {ref}" for ref in references), "caption": caption}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


class _Failure(Exception):
    """A caption's score could not be obtained. `kind` is a short, secret-free label used for logging."""

    def __init__(
        self, kind: str, transient: bool = False, bad_answer: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(kind)
        self.kind = kind
        self.transient = transient  # 429, 5xx, timeout, connection error: worth retrying
        self.bad_answer = bad_answer  # the server answered, but not with a usable score: retried once
        self.retry_after = retry_after


@dataclass
class _Stats:
    """Counters for one call."""

    requests: int = 0
    retries: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def metrics(self, cache_hits: int) -> dict[str, float]:
        latency = sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else 0.0
        return {
            "requests": float(self.requests),
            "retries": float(self.retries),
            "cache_hits": float(cache_hits),
            "latency_ms": latency,
        }


class LLMJudge:
    """Reward plugin: a judge LLM rates each caption against its region's references (0-10, returned / 10)."""

    name = "llm_judge"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        prompt: str | None = None,
        max_concurrency: int = 8,
        request_timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        deadline_s: float = 45.0,
        cache_size: int = 10_000,
        temperature: float = 0.0,
        max_tokens: int = 16,
    ) -> None:
        _check_config(
            base_url,
            model,
            prompt,
            max_concurrency=max_concurrency,
            request_timeout_s=request_timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            deadline_s=deadline_s,
            cache_size=cache_size,
            max_tokens=max_tokens,
        )
        _api_key(api_key_env)  # a key that cannot be sent fails here, before training starts
        self.base_url = base_url.strip().rstrip("/")
        self.model = model
        self.api_key_env = api_key_env  # the variable's name only; its value is read at call time
        self.prompt = DEFAULT_PROMPT if prompt is None else prompt
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.deadline_s = deadline_s
        self.cache_size = cache_size
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._logged_kinds: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    async def __call__(self, batch: RewardInput) -> RewardOutput:
        prompts = [
            render_prompt(self.prompt, caption, refs) if refs else None
            for caption, refs in zip(batch.captions, batch.references)
        ]
        needed = [p for p in prompts if p is not None]
        known = {p: s for p in set(needed) if (s := self._cache_get(p)) is not None}
        to_ask = list(dict.fromkeys(p for p in needed if p not in known))
        stats = _Stats()
        asked = await self._ask_all(to_ask, stats) if to_ask else {}
        for prompt, outcome in asked.items():
            if isinstance(outcome, float):
                known[prompt] = outcome
                self._cache_put(prompt, outcome)
            else:
                self._log_failure(outcome)
        scores = [None if p is None else known.get(p) for p in prompts]
        failures = sum(p is not None and known.get(p) is None for p in prompts)
        return RewardOutput(scores=scores, failures=failures, metrics=stats.metrics(len(needed) - len(to_ask)))

    # --- requests -----------------------------------------------------------------------------------------

    async def _ask_all(self, prompts: list[str], stats: _Stats) -> dict[str, float | str]:
        """Score each distinct prompt; the value is the score in [0, 1] or the failure kind."""
        gate = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(headers=self._headers(), timeout=self.request_timeout_s, limits=limits) as client:
            tasks = {p: asyncio.create_task(self._score(client, gate, p, stats)) for p in prompts}
            try:
                await asyncio.wait(tasks.values(), timeout=self.deadline_s)
            finally:  # past the deadline, or this call was cancelled: stop what is still running
                for task in tasks.values():
                    task.cancel()
                await asyncio.gather(*tasks.values(), return_exceptions=True)
        return {prompt: _outcome(task) for prompt, task in tasks.items()}

    def _headers(self) -> dict[str, str]:
        key = _api_key(self.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _score(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, prompt: str, stats: _Stats) -> float:
        """One prompt's score in [0, 1], retrying transient failures; raises `_Failure` when out of tries."""
        attempt = bad_answers = 0
        while True:
            try:
                return await self._attempt(client, gate, prompt, stats)
            except _Failure as failure:
                bad_answers += failure.bad_answer
                retry = failure.transient or (failure.bad_answer and bad_answers == 1)
                if not retry or attempt >= self.max_retries:
                    raise
                delay = self._backoff(attempt, failure.retry_after)
                logger.debug("%s: %s, retrying in %.2f s", self.name, failure.kind, delay)
            stats.retries += 1
            attempt += 1
            await asyncio.sleep(delay)

    async def _attempt(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, prompt: str, stats: _Stats) -> float:
        """Send one request (holding a concurrency slot) and read the score from its answer."""
        async with gate:
            stats.requests += 1
            start = time.perf_counter()
            try:
                request = client.post(f"{self.base_url}/chat/completions", json=self._payload(prompt))
                response = await asyncio.wait_for(request, self.request_timeout_s)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                raise _Failure("timeout", transient=True) from None
            except httpx.TransportError:
                raise _Failure("connection error", transient=True) from None
            stats.latencies_ms.append((time.perf_counter() - start) * 1000.0)
        return _read_score(response)

    def _payload(self, prompt: str) -> dict[str, object]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt + 1`: the server's Retry-After, else exponential + jitter."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)

    # --- cache and logging ----------------------------------------------------------------------------------

    def _cache_get(self, prompt: str) -> float | None:
        with self._cache_lock:
            score = self._cache.get((self.model, prompt))
            if score is not None:
                self._cache.move_to_end((self.model, prompt))
            return score

    def _cache_put(self, prompt: str, score: float) -> None:
        if self.cache_size == 0:
            return
        with self._cache_lock:
            self._cache[(self.model, prompt)] = score
            self._cache.move_to_end((self.model, prompt))
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _log_failure(self, kind: str) -> None:
        """The first failure of each kind at WARNING, later ones at DEBUG."""
        if kind in self._logged_kinds:
            logger.debug("%s: a caption could not be scored (%s)", self.name, kind)
            return
        self._logged_kinds.add(kind)
        logger.warning(
            "%s: a caption could not be scored (%s); further '%s' failures are logged at DEBUG", self.name, kind, kind
        )


def _read_score(response: httpx.Response) -> float:
    """The normalised score in a chat-completions response, or `_Failure` saying why there is none."""
    status = response.status_code
    if status == 429 or status >= 500:
        raise _Failure(f"HTTP {status}", transient=True, retry_after=_retry_after(response))
    if not response.is_success:
        raise _Failure(f"HTTP {status}")
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):
        raise _Failure("malformed response", bad_answer=True) from None
    score = parse_score(content) if isinstance(content, str) else None
    if score is None:
        raise _Failure("unparsable answer", bad_answer=True)
    return score / MAX_SCORE


def _retry_after(response: httpx.Response) -> float | None:
    """A numeric Retry-After header in seconds (an HTTP date is ignored: the usual backoff applies)."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _outcome(task: asyncio.Task[float]) -> float | str:
    """A finished or cancelled task's score, or the kind of its failure."""
    if task.cancelled():
        return "deadline"
    error = task.exception()
    if error is None:
        return task.result()
    if isinstance(error, _Failure):
        return error.kind
    return f"unexpected {type(error).__name__}"  # never the message: it could quote a header


def _api_key(variable: str | None) -> str | None:
    """The key in the environment variable `variable` (None when unset or empty); ValueError, naming the
    variable and never the key, when an HTTP header cannot carry it."""
    key = os.environ.get(variable) if variable else None
    if key and not (key.isascii() and key.isprintable() and " " not in key):
        raise ValueError(
            f"llm_judge: the API key in ${variable} holds a newline, a space or another character that an HTTP "
            "header cannot carry; export the key alone (e.g. without the trailing newline of the file it came from)"
        )
    return key or None


_USERINFO = re.compile(r"^([A-Za-z][\w+.-]*://)?.*@", re.DOTALL)  # to the last "@": user:password, whatever it holds


def _redacted(url: str) -> str:
    """`url` for an error message: credentials, query and fragment replaced, as they may hold secrets."""
    url = _USERINFO.sub(lambda m: f"{m.group(1) or ''}***@", url)
    return re.sub(r"[?#].*", "?***", url, flags=re.DOTALL)


def _check_base_url(base_url: str) -> None:
    """Raise ValueError for a base_url that cannot work or would put a secret in the HTTP library's logs."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise ValueError("llm_judge: base_url is empty; set it to the server's /v1 URL, e.g. http://127.0.0.1:8000/v1")
    shown = _redacted(base_url.strip())
    if not base_url.strip().startswith(("http://", "https://")):
        raise ValueError(f"llm_judge: base_url must start with http:// or https://, got {shown!r}")
    try:
        url = httpx.URL(base_url.strip())
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ValueError(f"llm_judge: base_url {shown!r} is not a valid URL") from None
    if url.userinfo:
        raise ValueError(
            f"llm_judge: base_url {shown!r} carries credentials (user:password@), which the HTTP library logs with "
            "every request; remove them and export the key in the variable named by api_key_env (sent as a "
            "Bearer token)"
        )
    if url.query or url.fragment or "?" in base_url or "#" in base_url:
        raise ValueError(
            f"llm_judge: base_url {shown!r} has a query or fragment; give the server's bare /v1 URL (requests go "
            "to <base_url>/chat/completions, and a key in a query string would be logged with every request)"
        )


def _check_config(base_url: str, model: str, prompt: str | None, **numbers: float) -> None:
    """Raise ValueError for options that cannot work."""
    _check_base_url(base_url)
    if not isinstance(model, str) or not model.strip():
        raise ValueError("llm_judge: model is empty; set it to the model name the server serves")
    if prompt is not None and not all(f"{{{name}}}" in prompt for name in ("references", "caption")):
        raise ValueError("llm_judge: prompt must contain the placeholders {references} and {caption}")
    positive = ("max_concurrency", "request_timeout_s", "deadline_s", "max_tokens")
    for name, value in numbers.items():
        if value < 0 or (value == 0 and name in positive):
            bound = "> 0" if name in positive else ">= 0"
            raise ValueError(f"llm_judge: {name} must be {bound}, got {value}")
