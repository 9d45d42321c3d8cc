"""Resilient model calls: the breaker and retry decisions as pure tables, then every path end to end
against real fake-LLM HTTP servers (errors, stalls, drops), through ChatOpenAI and the agent graph."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing
from typing import Any

import httpx2  # the openai SDK's HTTP client, whose Response its errors carry
import openai
import pytest
from langchain_core.exceptions import (
    ContextOverflowError,
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelError,
    ModelInvalidRequestError,
    ModelNotFoundError,
    ModelRateLimitError,
    ModelTimeoutError,
)
from langchain_openai import ChatOpenAI

from agent_worker.graph import Item, Text, build_graph, stream_answer
from agent_worker.model import ModelConfig, build_chat_model
from agent_worker.resilience import (
    BreakerRegistry,
    CircuitBreaker,
    CircuitOpen,
    RetryPolicy,
    endpoint_key,
    failure_code,
    resilient,
)
from tests.fake_llm import FakeLLM, split_words
from tests.support import WAIT_S, History

Answer = Callable[[History], AsyncIterator[Item]]
HELLO = [("user", "hello")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the breaker, as a table ------------------------------------------------------------------

# Steps: ("allow", expected) asks for admission; "ok"/"fail"/"release" give an admitted call's
# verdict; ("tick", s) moves the clock; ("state", expected) checks the state. Threshold 3, reset 30 s.
BREAKER_CASES: dict[str, list[tuple[Any, ...]]] = {
    "stays closed below the threshold": [
        ("allow", True), ("fail",), ("allow", True), ("fail",), ("state", "closed"), ("allow", True),
    ],
    "a success resets the consecutive count": [
        ("fail",), ("fail",), ("ok",), ("fail",), ("fail",), ("state", "closed"), ("allow", True),
    ],
    "opens at the threshold and refuses": [
        ("fail",), ("fail",), ("fail",), ("state", "open"), ("allow", False),
        ("tick", 29.9), ("allow", False),
    ],
    "half-open after the reset lets exactly one trial through": [
        ("fail",), ("fail",), ("fail",), ("tick", 30), ("allow", True), ("state", "half_open"),
        ("allow", False), ("allow", False),
    ],
    "a successful trial closes": [
        ("fail",), ("fail",), ("fail",), ("tick", 30), ("allow", True), ("ok",), ("state", "closed"),
        ("allow", True), ("allow", True),
    ],
    "a failed trial re-opens for a whole reset period": [
        ("fail",), ("fail",), ("fail",), ("tick", 30), ("allow", True), ("fail",), ("state", "open"),
        ("tick", 29), ("allow", False), ("tick", 1), ("allow", True), ("state", "half_open"),
    ],
    "a released trial hands its slot back": [
        ("fail",), ("fail",), ("fail",), ("tick", 31), ("allow", True), ("allow", False), ("release",),
        ("state", "half_open"), ("allow", True), ("allow", False),
    ],
    "a late failure while open does not push the trial back": [
        ("fail",), ("fail",), ("fail",), ("tick", 20), ("fail",), ("tick", 10), ("allow", True),
    ],
    "release while closed changes nothing": [
        ("fail",), ("fail",), ("release",), ("fail",), ("state", "open"),
    ],
}


@pytest.mark.parametrize("steps", BREAKER_CASES.values(), ids=BREAKER_CASES.keys())
def test_breaker_transitions(steps: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 30.0, clock=clock)
    for number, (action, *arg) in enumerate(steps):
        where = f"step {number}: {action} {arg}"
        if action == "allow":
            assert breaker.allow() is arg[0], where
        elif action == "state":
            assert breaker.state == arg[0], where
        elif action == "tick":
            clock.now += arg[0]
        elif action == "ok":
            breaker.record_success()
        elif action == "fail":
            breaker.record_failure()
        else:
            breaker.release()


def test_breaker_reports_when_it_opens_and_how_long_until_a_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(2, 30.0, clock=clock)
    assert breaker.record_failure() is False
    assert breaker.record_failure() is True
    clock.now += 12
    assert breaker.retry_in_s() == pytest.approx(18)
    assert breaker.record_failure() is False  # already open


def test_registry_keeps_one_breaker_per_endpoint() -> None:
    registry = BreakerRegistry(failure_threshold=1, reset_after_s=5)
    a, b = endpoint_key("http://a/v1/", "m"), endpoint_key("http://a/v1", "other")
    registry.get(a).record_failure()

    assert registry.get(a) is registry.get(endpoint_key("http://a/v1", "m"))
    assert registry.states() == {a: "open"}
    assert registry.get(b).allow() is True
    assert registry.states() == {a: "open", b: "closed"}


# -- retry decisions, as a table ---------------------------------------------------------------


def _status_error(kind: type[openai.APIStatusError], status: int, **headers: str) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://llm/v1/chat/completions")
    return kind("boom", response=httpx2.Response(status, headers=headers, request=request), body=None)


RETRY_CASES = [
    # error, attempt (1-based) that failed, output started, retry?
    (ModelRateLimitError("429"), 1, False, True),
    (ModelAPIError("500"), 2, False, True),
    (ModelConnectionError("refused"), 1, False, True),
    (ModelTimeoutError("stalled"), 1, False, True),
    (ModelAPIError("500"), 3, False, False),  # attempts used up
    (ModelConnectionError("dropped"), 1, True, False),  # tokens already out: never duplicate
    (ModelTimeoutError("stalled mid-answer"), 1, True, False),
    (ModelAuthenticationError("401"), 1, False, False),
    (ModelNotFoundError("404"), 1, False, False),
    (ModelInvalidRequestError("400"), 1, False, False),
    (ContextOverflowError("too long"), 1, False, False),
    (CircuitOpen("e", 3.0), 1, False, False),
    (ValueError("bad history"), 1, False, False),
    (_status_error(openai.UnprocessableEntityError, 422), 1, False, False),  # not a ModelError
]


@pytest.mark.parametrize(("exc", "attempt", "started", "expected"), RETRY_CASES,
                         ids=[f"{type(c[0]).__name__}-{c[1]}-{c[2]}" for c in RETRY_CASES])
def test_retry_decisions(exc: BaseException, attempt: int, started: bool, expected: bool) -> None:
    assert RetryPolicy(3, 0.2, 5.0).should_retry(exc, attempt=attempt, output_started=started) is expected


@pytest.mark.parametrize(("headers", "jitter_s", "expected_s"), [
    ({}, 0.3, 0.3),
    ({"retry-after-ms": "1500"}, 0.3, 1.5),  # the server's floor wins over a shorter jitter
    ({"retry-after": "2"}, 0.3, 2.0),
    ({"retry-after": "2"}, 2.5, 2.5),  # a longer jitter stands
    ({"retry-after": "120"}, 0.3, 5.0),  # capped: one hostile header must not park a run
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.3, 0.3),
])
def test_wait_honours_retry_after_up_to_the_cap(
    headers: dict[str, str], jitter_s: float, expected_s: float
) -> None:
    exc = _status_error(openai.RateLimitError, 429, **headers)
    assert RetryPolicy(3, 0.2, 5.0).wait_s(exc, jitter_s) == pytest.approx(expected_s)


def test_backoff_is_full_jitter_under_a_growing_capped_window() -> None:
    policy = RetryPolicy(attempts=10, base_s=0.1, cap_s=0.5)
    for _ in range(50):
        delays = policy.delays_s()
        for n in range(6):
            assert 0 <= next(delays) <= min(0.5, 0.1 * 2**n)


@pytest.mark.parametrize("bad", [dict(attempts=0), dict(base_s=-1), dict(base_s=2, cap_s=1)])
def test_retry_policy_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**{"attempts": 3, "base_s": 0.2, "cap_s": 5.0, **bad})


@pytest.mark.parametrize(("exc", "code"), [
    (CircuitOpen("e", 1.0), "llm_circuit_open"),
    (ModelRateLimitError(), "llm_rate_limited"),
    (ModelTimeoutError(), "llm_timeout"),
    (ModelConnectionError(), "llm_unreachable"),
    (ModelAuthenticationError(), "llm_auth"),
    (ContextOverflowError(), "llm_context_overflow"),
    (ModelAPIError(), "llm_error"),
    (ModelNotFoundError(), "llm_error"),
    (RuntimeError(), "internal"),
])
def test_failure_codes(exc: BaseException, code: str) -> None:
    assert failure_code(exc)[0] == code
    assert failure_code(CircuitOpen("e", 1.0))[1] == "the model is temporarily unavailable"


async def test_closing_the_answer_closes_the_model_stream_before_returning() -> None:
    # Not left to the garbage collector: closing the model's generator is what aborts its HTTP
    # request (agent_worker.graph.stream_answer), and the worker relies on that happening now.
    closed = asyncio.Event()

    async def endless(history: History) -> AsyncIterator[str]:
        try:
            while True:
                yield "piece "
                await asyncio.sleep(0)
        finally:
            closed.set()

    answer = resilient(endless, endpoint="p", fallback=endless, fallback_endpoint="f",
                       policy=RetryPolicy(), breakers=BreakerRegistry())
    pieces = answer(HELLO)
    assert await anext(pieces) == "piece "
    await pieces.aclose()

    assert closed.is_set()


def test_fallback_needs_its_endpoint() -> None:
    async def nothing(history: History) -> AsyncIterator[str]:
        yield "x"

    with pytest.raises(ValueError, match="fallback_endpoint"):
        resilient(nothing, endpoint="a", fallback=nothing, policy=RetryPolicy(), breakers=BreakerRegistry())


# -- end to end against the fake LLM -------------------------------------------------------


class Sleeps:
    """Records every backoff the wrapper asks for, and really waits it."""

    def __init__(self) -> None:
        self.delays_s: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays_s.append(delay_s)
        await asyncio.sleep(delay_s)


@pytest.fixture
def servers() -> Iterator[Callable[[], FakeLLM]]:
    started: list[FakeLLM] = []

    def start() -> FakeLLM:
        fake = FakeLLM(token_delay_s=0.002)
        fake.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
async def answers() -> AsyncIterator[Callable[..., Answer]]:
    """``answers(base_url, directives=..., **config)``: a worker-style answer callable over
    ChatOpenAI (SDK retries off) and the agent graph. ``directives[n]`` is appended to the last
    user message of the n-th call, so one server can fail a first attempt and answer the next."""
    models: list[ChatOpenAI] = []

    def make(base_url: str, *, directives: Sequence[str] = (), **config: Any) -> Answer:
        model = build_chat_model(ModelConfig(base_url=base_url, api_key=None, max_retries=0, **config))
        assert isinstance(model, ChatOpenAI)
        models.append(model)
        graph = build_graph(model)
        calls = 0

        def answer(history: History) -> AsyncIterator[Item]:
            nonlocal calls
            extra = directives[calls] if calls < len(directives) else ""
            calls += 1
            *before, (role, text) = history
            return stream_answer(graph, [*before, (role, f"{text} {extra}".strip())])

        return answer

    yield make
    for model in models:
        await model.root_async_client.close()


async def collect(answer: Answer, history: History = HELLO, into: list[str] | None = None) -> list[str]:
    """The answer's text pieces, as yielded (no tools here, so every item is text)."""
    pieces = [] if into is None else into
    async with asyncio.timeout(WAIT_S):
        async for item in answer(history):
            assert isinstance(item, Text)
            pieces.append(item.text)
    return pieces


def expected(fake: FakeLLM, history: History = HELLO) -> str:
    return fake.answer_for([{"role": role, "content": text} for role, text in history])


def last_user_text(request: dict[str, Any]) -> str:
    return str(request["messages"][-1]["content"])


async def test_429_is_retried_with_backoff_and_then_answers(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake, sleeps, breakers = servers(), Sleeps(), BreakerRegistry()
    primary = answers(fake.base_url, directives=["[[status:429]]", "[[status:429]]"])
    # Jitter of at most 1 ms, so the waits show the server's retry-after-ms (10) being honoured.
    policy = RetryPolicy(attempts=3, base_s=0.0005, cap_s=1.0)
    answer = resilient(primary, endpoint="p", policy=policy, breakers=breakers, sleep=sleeps)

    pieces = await collect(answer)

    assert "".join(pieces) == expected(fake)
    assert [last_user_text(r) for r in fake.requests] == ["hello [[status:429]]"] * 2 + ["hello"]
    assert sleeps.delays_s == [pytest.approx(0.01)] * 2
    assert breakers.get("p").state == "closed" and breakers.get("p").failures == 0


async def test_5xx_is_retried_attempts_times_then_fails_as_a_model_api_error(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake, sleeps, breakers = servers(), Sleeps(), BreakerRegistry(failure_threshold=10)
    answer = resilient(answers(fake.base_url), endpoint="p", policy=RetryPolicy(4, 0.02, 1.0),
                       breakers=breakers, sleep=sleeps)

    with pytest.raises(ModelAPIError) as caught:
        await collect(answer, [("user", "boom [[status:503]]")])

    assert isinstance(caught.value, openai.InternalServerError)  # type preserved for the worker
    assert caught.value.status_code == 503
    assert failure_code(caught.value)[0] == "llm_error"
    assert len(fake.requests) == 4
    assert len(sleeps.delays_s) == 3
    for n, delay_s in enumerate(sleeps.delays_s):  # jitter windows of 20, 40, 80 ms; retry-after 10 ms
        assert 0.01 <= delay_s <= max(0.01, 0.02 * 2**n)
    assert breakers.get("p").failures == 4


async def test_a_stalled_response_times_out_and_is_retried(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake, sleeps = servers(), Sleeps()
    primary = answers(fake.base_url, directives=["[[stall:5]]"], timeout_s=0.3)
    answer = resilient(primary, endpoint="p", policy=RetryPolicy(2, 0.01, 0.1), breakers=BreakerRegistry(),
                       sleep=sleeps)

    began = time.monotonic()
    pieces = await collect(answer)

    assert "".join(pieces) == expected(fake)
    assert time.monotonic() - began >= 0.3
    assert [last_user_text(r) for r in fake.requests] == ["hello [[stall:5]]", "hello"]
    assert len(sleeps.delays_s) == 1
    # The timed-out request was abandoned, not left running on the server.
    await fake.wait_until_async(lambda f: f.disconnects == 1, WAIT_S)


async def test_stalling_on_every_attempt_fails_as_a_timeout(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake = servers()
    answer = resilient(answers(fake.base_url, timeout_s=0.2), endpoint="p", policy=RetryPolicy(2, 0.01, 0.1),
                       breakers=BreakerRegistry())

    with pytest.raises(ModelTimeoutError) as caught:
        await collect(answer, [("user", "[[stall:5]]")])

    assert failure_code(caught.value)[0] == "llm_timeout"
    assert len(fake.requests) == 2


async def test_a_drop_after_output_began_is_not_retried_nor_falls_back(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake, spare, sleeps, breakers = servers(), servers(), Sleeps(), BreakerRegistry()
    answer = resilient(answers(fake.base_url), endpoint="p", fallback=answers(spare.base_url),
                       fallback_endpoint="f", policy=RetryPolicy(3, 0.01, 0.1), breakers=breakers,
                       sleep=sleeps)
    pieces: list[str] = []

    with pytest.raises(ModelConnectionError):
        await collect(answer, [("user", "[[tokens:10]] [[die_after:3]]")], into=pieces)

    assert pieces == ["word1 ", "word2 ", "word3 "]  # each piece once, nothing after the drop
    assert len(fake.requests) == 1
    assert spare.requests == []
    assert sleeps.delays_s == []
    assert breakers.get("p").failures == 1  # the drop still says something about the endpoint


async def test_non_retryable_errors_fail_at_once_and_do_not_count_against_the_endpoint(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake, breakers = servers(), BreakerRegistry(failure_threshold=1)
    policy = RetryPolicy(attempts=3, base_s=0.01, cap_s=0.1)
    answer = resilient(answers(fake.base_url), endpoint="p", policy=policy, breakers=breakers)

    with pytest.raises(ModelAuthenticationError) as caught:
        await collect(answer, [("user", "[[status:401]]")])

    assert failure_code(caught.value)[0] == "llm_auth"
    assert len(fake.requests) == 1
    assert breakers.get("p").state == "closed"


async def test_breaker_opens_fails_fast_without_requests_and_closes_after_reset(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake, clock = servers(), Clock()
    breakers = BreakerRegistry(failure_threshold=3, reset_after_s=30, clock=clock)
    policy = RetryPolicy(attempts=1, base_s=0.01, cap_s=0.1)
    answer = resilient(answers(fake.base_url), endpoint="p", policy=policy, breakers=breakers)

    for _ in range(3):
        with pytest.raises(ModelAPIError):
            await collect(answer, [("user", "[[status:500]]")])
    assert breakers.states() == {"p": "open"}

    began = time.monotonic()
    for _ in range(5):
        with pytest.raises(CircuitOpen) as caught:
            await collect(answer)  # a healthy request, refused without reaching the server
    assert time.monotonic() - began < 1.0
    assert len(fake.requests) == 3
    assert failure_code(caught.value) == ("llm_circuit_open", "the model is temporarily unavailable")
    assert isinstance(caught.value, ModelError)

    clock.now += 30  # half-open: the next call is the trial
    assert "".join(await collect(answer)) == expected(fake)
    assert breakers.states() == {"p": "closed"}
    assert "".join(await collect(answer)) == expected(fake)
    assert len(fake.requests) == 5


async def test_retries_stop_when_the_breaker_opens_mid_run(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake = servers()
    breakers = BreakerRegistry(failure_threshold=2, reset_after_s=30)
    policy = RetryPolicy(attempts=5, base_s=0.01, cap_s=0.1)
    answer = resilient(answers(fake.base_url), endpoint="p", policy=policy, breakers=breakers)

    with pytest.raises(CircuitOpen) as caught:
        await collect(answer, [("user", "[[status:502]]")])

    assert len(fake.requests) == 2
    assert isinstance(caught.value.__cause__, ModelAPIError)  # what opened it stays visible


async def test_fallback_answers_when_the_primary_is_down(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    down, spare, sleeps, breakers = servers(), servers(), Sleeps(), BreakerRegistry()
    down_url = down.base_url
    down.stop()  # connection refused from now on
    answer = resilient(answers(down_url), endpoint=endpoint_key(down_url, "m"),
                       fallback=answers(spare.base_url), fallback_endpoint=endpoint_key(spare.base_url, "m"),
                       policy=RetryPolicy(2, 0.01, 0.1), breakers=breakers, sleep=sleeps)

    pieces = await collect(answer)

    assert pieces == split_words(expected(spare))
    assert len(spare.requests) == 1
    assert len(sleeps.delays_s) == 1  # the primary got its retry first
    assert breakers.get(endpoint_key(down_url, "m")).failures == 2


async def test_an_open_primary_breaker_goes_straight_to_the_fallback(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    primary, spare = servers(), servers()
    breakers = BreakerRegistry(failure_threshold=1, reset_after_s=30)
    breakers.get("p").record_failure()
    answer = resilient(answers(primary.base_url), endpoint="p", fallback=answers(spare.base_url),
                       fallback_endpoint="f", policy=RetryPolicy(3, 0.01, 0.1), breakers=breakers)

    assert "".join(await collect(answer)) == expected(spare)
    assert primary.requests == []
    assert len(spare.requests) == 1


async def test_when_both_fail_the_fallback_error_propagates_naming_the_primary_one(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    primary, spare = servers(), servers()
    answer = resilient(answers(primary.base_url, directives=["[[status:500]]"] * 2), endpoint="p",
                       fallback=answers(spare.base_url, directives=["[[status:429]]"] * 2),
                       fallback_endpoint="f", policy=RetryPolicy(2, 0.01, 0.1), breakers=BreakerRegistry())

    with pytest.raises(ModelRateLimitError) as caught:
        await collect(answer)

    assert failure_code(caught.value)[0] == "llm_rate_limited"
    assert any("p failed with" in note and "500" in note for note in caught.value.__notes__)
    assert (len(primary.requests), len(spare.requests)) == (2, 2)


async def test_closing_the_answer_mid_stream_aborts_the_http_request(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake, breakers = servers(), BreakerRegistry()
    answer = resilient(answers(fake.base_url), endpoint="p", policy=RetryPolicy(), breakers=breakers)

    async with asyncio.timeout(WAIT_S):
        async with aclosing(answer([("user", "[[tokens:1000]] [[slow:0.02]]")])) as pieces:
            assert await anext(pieces) == Text("word1 ")

    await fake.wait_until_async(lambda f: f.disconnects == 1, WAIT_S)
    assert breakers.get("p").state == "closed"


async def test_a_trial_cancelled_before_output_gives_its_slot_back(
    servers: Callable[[], FakeLLM], answers: Callable[..., Answer]
) -> None:
    fake, clock = servers(), Clock()
    breakers = BreakerRegistry(failure_threshold=1, reset_after_s=30, clock=clock)
    breakers.get("p").record_failure()
    clock.now += 30
    answer = resilient(answers(fake.base_url), endpoint="p", policy=RetryPolicy(), breakers=breakers)

    task = asyncio.create_task(collect(answer, [("user", "[[stall:5]]")]))
    await fake.wait_until_async(lambda f: len(f.requests) == 1, WAIT_S)
    assert breakers.get("p").allow() is False  # the trial is out
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)

    assert breakers.get("p").state == "half_open"
    assert "".join(await collect(answer)) == expected(fake)  # the next call is the new trial
    assert breakers.get("p").state == "closed"
