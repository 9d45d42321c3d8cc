"""Resilient model calls: retries with jittered backoff, a circuit breaker per endpoint, a fallback.

:func:`resilient` wraps an answer stream (``history -> AsyncIterator``, e.g. a closure over
:func:`agent_worker.graph.stream_answer`) and returns one with the same contract::

    primary endpoint ──(breaker allows?)──▶ attempt 1 ─┐ retryable error, nothing yielded yet:
                          │ no: CircuitOpen            ├─ back off (full jitter, Retry-After as a floor)
                          ▼                            ▼  and try again, up to policy.attempts
                  fallback endpoint, same rules  ◀── still failing before any output
                          │
                          ▼
                  the last error propagates, its type preserved (``failure_code`` maps it)

Rules, and why:

- **Nothing is ever yielded twice.** An error after the first item (a dropped or stalled stream)
  propagates as is: the devices already showed those tokens, and a second request would stream
  a different answer from its beginning.
- **Only retryable** ``ModelError``\\ s are retried (``.is_retryable``: 429, 5xx, connection,
  timeout). Auth, not-found and invalid-request errors fail at once (but may still fall back).
  Anything that is not a ``ModelError`` (a bug, a bad history) propagates untouched.
- **The breaker counts endpoint health, not request quality**: every retryable error, including
  one after output began, is a failure; the first item (or a clean empty answer) is a success;
  a 400 or a cancelled call is neither. Each attempt asks the breaker, so retries count too.
  Once open, calls fail fast with :class:`CircuitOpen` without a request, until ``reset_after_s``
  has passed; then one trial call goes through (half-open) and its verdict closes or re-opens it.
- The openai SDK's own retries (``ModelConfig.max_retries``) should be 0 under this layer, so a
  request is retried once, here, with jitter, and every attempt reaches the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

from langchain_core import exceptions as llm_errors
from langchain_core.exceptions import ModelError

from agent_worker.graph import InputTimeout
from common.backoff import delays_s

T = TypeVar("T")
History: TypeAlias = Sequence[tuple[str, str]]
BreakerState: TypeAlias = Literal["closed", "open", "half_open"]
log = logging.getLogger(__name__)


class CircuitOpen(ModelError):
    """The endpoint's circuit breaker is open: the call failed fast, no request was sent.

    A ``ModelError`` so that callers treating "every LLM failure is a ModelError" keep working;
    ``is_retryable`` is False because an immediate retry is refused just the same.
    """

    is_retryable = False

    def __init__(self, endpoint: str, retry_in_s: float) -> None:
        super().__init__(f"circuit open for {endpoint}: failing fast, next trial in {retry_in_s:.1f}s")


def endpoint_key(base_url: str | None, model: str) -> str:
    """The breaker key of a model endpoint: one breaker per (base URL, model name)."""
    return f"{(base_url or 'demo').rstrip('/')}#{model}"


# -- the breaker: a pure state machine -----------------------------------------------------


class CircuitBreaker:
    """Closed → open after ``failure_threshold`` consecutive failures → half-open once
    ``reset_after_s`` has passed, letting exactly one trial call through → closed on its success,
    open again (for another ``reset_after_s``) on its failure.

    No I/O and no awaits: every method is a state transition at ``clock()``. A caller that was
    allowed must end with exactly one of :meth:`record_success`, :meth:`record_failure` or
    :meth:`release` (no verdict, e.g. cancelled), or a half-open breaker stays shut.
    """

    def __init__(
        self, failure_threshold: int, reset_after_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failure_threshold < 1 or reset_after_s < 0:
            raise ValueError("failure_threshold must be >= 1 and reset_after_s >= 0")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_out = False

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far."""
        return self._failures

    def retry_in_s(self) -> float:
        """Seconds until an open breaker admits a trial (0 if it would now)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.reset_after_s - self._clock())

    def allow(self) -> bool:
        """May a call go to the endpoint now? In half-open, True hands out the one trial."""
        if self._state == "open" and self.retry_in_s() <= 0:
            self._state = "half_open"
        if self._state == "half_open":
            if self._trial_out:
                return False
            self._trial_out = True
        return self._state != "open"

    def record_success(self) -> None:
        """The endpoint answered: close, whatever the state (a late success is still news)."""
        self._state, self._failures, self._trial_out = "closed", 0, False

    def record_failure(self) -> bool:
        """Count a failure; True if this one opened (or re-opened) the breaker. A failure while
        open (a call admitted before it opened) is counted but does not push the trial back."""
        self._failures += 1
        self._trial_out = False
        tripped = self._state == "closed" and self._failures >= self.failure_threshold
        if tripped or self._state == "half_open":
            self._state, self._opened_at = "open", self._clock()
            return True
        return False

    def release(self) -> None:
        """An allowed call ended without a verdict: give a half-open trial slot back."""
        self._trial_out = False


@dataclass
class BreakerRegistry:
    """One :class:`CircuitBreaker` per endpoint key, created on first use; share one per process."""

    failure_threshold: int = 5
    reset_after_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _breakers: dict[str, CircuitBreaker] = field(default_factory=dict, repr=False)

    def get(self, endpoint: str) -> CircuitBreaker:
        breaker = self._breakers.get(endpoint)
        if breaker is None:
            breaker = CircuitBreaker(self.failure_threshold, self.reset_after_s, clock=self.clock)
            self._breakers[endpoint] = breaker
        return breaker

    def states(self) -> dict[str, BreakerState]:
        """Every known endpoint's state, e.g. for a readiness or metrics endpoint."""
        return {key: breaker.state for key, breaker in self._breakers.items()}


# -- retries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``attempts`` calls per endpoint (1 = no retry), spaced by full-jitter exponential
    backoff: the n-th wait is uniform in ``[0, min(cap_s, base_s * 2**n)]``, but never shorter
    than the server's ``Retry-After`` (itself capped at ``cap_s``)."""

    attempts: int = 3
    base_s: float = 0.2
    cap_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < self.base_s:
            raise ValueError(f"invalid RetryPolicy {self}: need attempts >= 1 and 0 <= base_s <= cap_s")

    def should_retry(self, exc: BaseException, *, attempt: int, output_started: bool) -> bool:
        """After ``attempt`` (1-based) failed with ``exc``: is another attempt allowed?"""
        return (
            not output_started
            and attempt < self.attempts
            and isinstance(exc, ModelError)
            and exc.is_retryable
        )

    def delays_s(self) -> Iterator[float]:
        """The jittered waits before attempts 2, 3, ... (without the Retry-After floor)."""
        return delays_s(base_s=self.base_s, cap_s=self.cap_s)

    def wait_s(self, exc: BaseException, jitter_s: float) -> float:
        """The wait before the next attempt: ``jitter_s``, raised to ``exc``'s Retry-After."""
        return max(jitter_s, min(self.cap_s, _retry_after_s(exc)))


def _retry_after_s(exc: BaseException) -> float:
    # openai's status errors carry the httpx response; OpenAI and most proxies send one of these.
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return 0.0
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name, "")) * scale)
        except ValueError:
            continue  # absent, or an HTTP date: not worth parsing for a capped floor
    return 0.0


# -- the wrapper -----------------------------------------------------------------------------


def resilient(
    primary: Callable[[History], AsyncIterator[T]],
    *,
    endpoint: str,
    policy: RetryPolicy,
    breakers: BreakerRegistry,
    fallback: Callable[[History], AsyncIterator[T]] | None = None,
    fallback_endpoint: str | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    on_result: Callable[[str, str], None] | None = None,
) -> Callable[[History], AsyncGenerator[T, None]]:
    """Wrap ``primary`` in retries under ``breakers.get(endpoint)``, then ``fallback``, if given,
    under its own breaker with the same policy. See the module docstring for the rules.

    The returned callable yields ``primary``'s (or ``fallback``'s) items unchanged and raises the
    last ``ModelError`` (type preserved; a note names an earlier endpoint's error). Closing or
    cancelling its generator closes the underlying stream. ``sleep`` is injectable for tests;
    ``on_result(endpoint, "ok" or the failure code)`` is told how each model call ended (metrics).
    """
    if (fallback is None) != (fallback_endpoint is None):
        raise ValueError("fallback and fallback_endpoint go together")
    routes = [(primary, endpoint)]
    if fallback is not None and fallback_endpoint is not None:
        routes.append((fallback, fallback_endpoint))

    async def answer(history: History) -> AsyncGenerator[T, None]:
        earlier: ModelError | None = None
        for number, (call, key) in enumerate(routes, 1):
            started = False
            try:
                attempts = _attempts(call, history, key, breakers.get(key), policy, sleep, on_result)
                async with aclosing(attempts):
                    async for item in attempts:
                        started = True
                        yield item
                return
            except ModelError as exc:
                if earlier is not None:
                    exc.add_note(f"after {routes[0][1]} failed with {earlier!r}")
                if started or number == len(routes):
                    raise
                log.warning("model %s failed (%r); falling back to %s", key, exc, routes[number][1])
                earlier = exc

    return answer


async def _attempts(
    call: Callable[[History], AsyncIterator[T]],
    history: History,
    key: str,
    breaker: CircuitBreaker,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[Any]],
    on_result: Callable[[str, str], None] | None = None,
) -> AsyncGenerator[T, None]:
    """One endpoint: up to ``policy.attempts`` calls, each admitted and judged by ``breaker``;
    ``on_result(key, "ok" or the failure code)`` hears how each call ended."""
    jitter = policy.delays_s()
    last: ModelError | None = None
    for attempt in range(1, policy.attempts + 1):
        if not breaker.allow():
            raise CircuitOpen(key, breaker.retry_in_s()) from last
        started = judged = False
        try:
            async with _closing(call(history)) as stream:
                async for item in stream:
                    if not started:
                        started = judged = True
                        breaker.record_success()
                    yield item
            if not started:
                judged = True
                breaker.record_success()  # an empty answer is still an answer
            if on_result is not None:
                on_result(key, "ok")
            return
        except ModelError as exc:
            if on_result is not None:
                on_result(key, failure_code(exc)[0])
            if exc.is_retryable:
                judged = True
                if breaker.record_failure():
                    log.warning("circuit for %s opened after %d failures", key, breaker.failures)
            if not policy.should_retry(exc, attempt=attempt, output_started=started):
                raise
            last, delay_s = exc, policy.wait_s(exc, next(jitter))
        finally:
            if not judged:
                breaker.release()  # non-retryable error, cancelled or closed before any output
        log.warning("model %s attempt %d/%d failed (%r); retrying in %.2fs",
                    key, attempt, policy.attempts, last, delay_s)
        await sleep(delay_s)
    raise AssertionError("unreachable: the last attempt returns or raises")


@asynccontextmanager
async def _closing(stream: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    # Close the model's generator here, in this task: that aborts its HTTP request at once
    # (see stream_answer's docstring) instead of whenever it is garbage-collected.
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


# -- run.failed codes ----------------------------------------------------------------------


def failure_code(exc: BaseException) -> tuple[str, str]:
    """A user-readable ``run.failed`` code and message for the error that ended a run."""
    for kind, code, message in _FAILURE_CODES:
        if isinstance(exc, kind):
            return code, message
    return "internal", f"the run failed ({type(exc).__name__})"


# First match wins: subclasses before ModelError. The codes are documented in docs/protocol.md.
_FAILURE_CODES: list[tuple[type[BaseException], str, str]] = [
    (CircuitOpen, "llm_circuit_open", "the model is temporarily unavailable"),
    (llm_errors.ModelRateLimitError, "llm_rate_limited", "the model is rate limited; try again shortly"),
    (llm_errors.ModelTimeoutError, "llm_timeout", "the model did not answer in time"),
    (llm_errors.ModelConnectionError, "llm_unreachable", "the model endpoint could not be reached"),
    (llm_errors.ModelAuthenticationError, "llm_auth", "the model endpoint refused our credentials"),
    (llm_errors.ContextOverflowError, "llm_context_overflow", "the conversation is too long for the model"),
    (ModelError, "llm_error", "the model endpoint returned an error"),
    # agents.UnknownAgent: the conversation names an agent no worker serves (any more).
    (LookupError, "unknown_agent", "this conversation's agent is not configured"),
    (InputTimeout, "input_timeout", "nobody answered the agent's question in time"),
]
