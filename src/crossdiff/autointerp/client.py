"""A robust chat client for any OpenAI-compatible endpoint, with an on-disk response cache.

Every response is stored under the SHA-256 of its request (model, messages, sampling params), one
atomically written file per request, as soon as it arrives: a killed or failed run loses nothing,
and the rerun asks the endpoint only for what is missing. The endpoint URL is not part of the key,
so a local server restarted on another port still hits the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import openai
from tqdm import tqdm

from .. import io

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class EndpointError(RuntimeError):
    """The endpoint failed for good (down after all retries, or refused the request)."""


def api_key_from_env(name: str, required: bool) -> str:
    """The API key from the environment variable `name` (the key itself is never logged)."""
    key = os.environ.get(name, "") if name else ""
    if required and not key:
        raise EndpointError(f"environment variable {name!r} (autointerp.endpoint.api_key_env) is not set; "
                            "export the endpoint's API key there")
    return key or "not-needed"  # the openai client insists on a non-empty key; local servers ignore it


def request_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _retryable(err: Exception) -> bool:
    """Connection errors, timeouts, 429 and 5xx are transient; other 4xx are our bug and are not retried."""
    if isinstance(err, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError)):
        return True
    return isinstance(err, openai.APIStatusError) and err.status_code >= 500


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class LLMClient:
    """Chat completions with a concurrency limit, timeouts, retries with exponential backoff, and a cache."""

    def __init__(self, base_url: str, model: str, cache_dir: str | os.PathLike, api_key: str = "not-needed",
                 concurrency: int = 4, timeout_s: float = 120.0, retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, max_tokens: int = 200, temperature: float = 0.0):
        if not base_url or not model:
            raise EndpointError(f"an endpoint needs both base_url and model (got base_url={base_url!r}, model={model!r})")
        self.base_url, self.model = base_url, model
        self.cache_dir = Path(cache_dir)
        self.concurrency, self.retries = concurrency, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_tokens, self.temperature = max_tokens, temperature
        # Retries are ours (max_retries=0), so the give-up message can name the endpoint.
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.server = None  # set by pipeline.open_endpoint when this run started a local server

    def payload(self, messages: Messages, extra: dict | None = None) -> dict:
        """The request body; `extra` adds or overrides fields (response_format, logit_bias, stop, max_tokens)."""
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, **(extra or {})}

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def cached(self, messages: Messages, extra: dict | None = None) -> str | None:
        path = self._path(request_key(self.payload(messages, extra)))
        return json.loads(path.read_text())["content"] if path.exists() else None

    def complete(self, messages: Messages, extra: dict | None = None) -> str:
        """The assistant message for `messages`: from the cache, else from the endpoint (then cached)."""
        payload = self.payload(messages, extra)
        key = request_key(payload)
        path = self._path(key)
        if path.exists():
            with self._lock:
                self.hits += 1
            return json.loads(path.read_text())["content"]
        response = self._call(payload)
        content = response.choices[0].message.content or ""
        io.write_json(path, {"key": key, "request": payload, "content": content,
                             "response": response.model_dump(mode="json")})
        with self._lock:
            self.misses += 1
        return content

    def _call(self, payload: dict):
        for attempt in range(self.retries + 1):
            try:
                return self._client.chat.completions.create(**payload)
            except openai.APIError as err:
                if not _retryable(err):
                    hint = (" (check the API key in the variable named by autointerp.endpoint.api_key_env)"
                            if getattr(err, "status_code", None) in (401, 403) else "")
                    raise EndpointError(f"endpoint {self.base_url} (model {self.model!r}) refused the request: "
                                        f"{err}{hint}") from err
                if attempt == self.retries:
                    raise EndpointError(f"endpoint {self.base_url} (model {self.model!r}) still failing after "
                                        f"{self.retries + 1} attempts: {type(err).__name__}: {err}") from err
                delay = _retry_after(err) or min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
                delay *= 1 + 0.25 * random.random()  # jitter, so concurrent workers do not retry in lockstep
                log.warning("endpoint %s: %s; retry %d/%d in %.1f s", self.base_url, type(err).__name__,
                            attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def complete_many(self, requests: Sequence[Messages], desc: str = "LLM calls",
                      on_result: Callable[[int, str], None] | None = None,
                      extras: Sequence[dict | None] | None = None) -> list[str]:
        """Complete all `requests` (with `extras[i]` added to request i) with at most `concurrency` in
        flight; results in request order.

        The first failure cancels what has not started and is raised; everything answered before it
        is already in the cache. `on_result(i, content)` is called as each answer arrives.
        """
        results: list[str | None] = [None] * len(requests)
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(requests), desc=desc) as bar:
            extras = extras if extras is not None else [None] * len(requests)
            futures = {pool.submit(self.complete, m, x): i for i, (m, x) in enumerate(zip(requests, extras))}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise fut.exception()
                    i = futures[fut]
                    results[i] = fut.result()
                    bar.update()
                    if on_result is not None:
                        on_result(i, results[i])
        log.info("%s: %d answers (%d from cache, %d from %s)", desc, len(requests), self.hits, self.misses,
                 self.base_url)
        return results  # type: ignore[return-value]
