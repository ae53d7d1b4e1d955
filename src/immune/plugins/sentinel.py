"""sentinel: asks an external verdict service about alerts, over HTTP.

Requests come from ``sentinel_bridge`` (``sentinel.request``), wait in a
bounded queue and go out in batches: ``POST <url>/api/v1/analyze`` with the
API key in a header, a timeout, and retries with exponential backoff and
jitter. Each answer's risk score gives the action (at least 0.9 isolate, 0.7
block, 0.5 alert, else log), published as ``verdict.<action>`` for
``response`` to act on. When the service is down, slow or talks nonsense,
the verdict falls back to the alert's severity (critical isolate, high
block, medium alert), says so in ``source``, and the failure is counted and
logged once per failure, never with the API key.

Configuration (``[plugins.sentinel]``)::

    url = "https://verdicts.example"   # empty (the default): sentinel is idle
    api_key_env = "IMMUNE_SENTINEL_API_KEY"   # or api_key = "..." (avoid)
    api_key_header = "X-API-Key"
    timeout_s = 5.0
    retries = 2
    backoff_s = 0.5
    batch_size = 20
    batch_wait_s = 0.2
    queue_size = 1000
    down_s = 30.0     # after a batch failed, fall back at once this long

The service's reply: ``{"results": [{"id", "risk_score" (0..1),
"classification", "action"}]}``, one result per item sent (see
docs/response.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import msgspec

from immune.errors import ImmuneError
from immune.events import Alert, to_dict
from immune.hookspecs import hookimpl
from immune.safe import printable

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

PATH = "/api/v1/analyze"
THRESHOLDS = (("isolate", 0.9), ("block", 0.7), ("alert", 0.5))
FALLBACK = {"critical": "isolate", "high": "block", "medium": "alert"}
_SETTINGS = {"url", "api_key", "api_key_env", "api_key_header", "timeout_s"}
_SETTINGS |= {"retries", "backoff_s", "batch_size", "batch_wait_s"}
_SETTINGS |= {"queue_size", "down_s"}


class SentinelError(ImmuneError):
    """The verdict service could not give verdicts (down, slow or garbled)."""

    def __init__(self, message: str, *, counter: str, retry: bool) -> None:
        super().__init__(message)
        self.counter, self.retry = counter, retry


class Result(msgspec.Struct, kw_only=True):
    """One answer of the service."""

    id: Annotated[str, msgspec.Meta(max_length=128)]
    risk_score: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    classification: Annotated[str, msgspec.Meta(max_length=64)] = "unknown"
    action: Annotated[str, msgspec.Meta(max_length=32)] | None = None


class Reply(msgspec.Struct, kw_only=True):
    results: Annotated[list[Result], msgspec.Meta(max_length=10_000)]


_reply = msgspec.json.Decoder(Reply)


def action_for(risk: float) -> str:
    """The action a risk score calls for."""
    for action, floor in THRESHOLDS:
        if risk >= floor:
            return action
    return "log"


class SentinelPlugin:
    """The HTTP client of the verdict service."""

    name = "sentinel"

    def __init__(self) -> None:
        self.hive: Hive
        self.url = ""
        self.headers: dict[str, str] = {}
        self.timeout_s = 5.0
        self.retries = 2
        self.backoff_s = 0.5
        self.batch_size = 20
        self.batch_wait_s = 0.2
        self.down_s = 30.0
        self.down_until = 0.0
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(1000)
        self.client: httpx.AsyncClient | None = None

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        where = self.url or "nowhere: no url configured, so it is idle"
        return {"description": f"verdicts from {where}"}

    @hookimpl
    def immune_configure(self, hive: Hive, config: dict[str, Any]) -> None:
        self.hive = hive
        unknown = set(config) - _SETTINGS
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {_SETTINGS}")
        url = str(config.get("url", "")).rstrip("/")
        if url and not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        self.url = url
        env = str(config.get("api_key_env", "IMMUNE_SENTINEL_API_KEY"))
        key = config.get("api_key") or os.environ.get(env, "")
        header = str(config.get("api_key_header", "X-API-Key"))
        self.headers = {header: str(key)} if key else {}
        self.timeout_s = float(config.get("timeout_s", 5.0))
        self.retries = int(config.get("retries", 2))
        self.backoff_s = float(config.get("backoff_s", 0.5))
        self.batch_size = int(config.get("batch_size", 20))
        self.batch_wait_s = float(config.get("batch_wait_s", 0.2))
        self.down_s = float(config.get("down_s", 30.0))
        self.queue = asyncio.Queue(int(config.get("queue_size", 1000)))

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        return [("sentinel.request", self.on_request)]

    @hookimpl
    def immune_start(self, hive: Hive) -> None:
        if not self.url:
            logger.info("No verdict service configured ([plugins.sentinel] url).")
        if self.url:
            self.client = httpx.AsyncClient(
                base_url=self.url, headers=self.headers, timeout=self.timeout_s
            )
        hive.create_task(self._worker(), name="immune-sentinel-batches")

    @hookimpl
    async def immune_stop(self) -> None:
        left = self.queue.qsize()
        if left:
            self.hive.metrics.inc("sentinel.unanswered", left)
            logger.warning("Stopping with %d verdict requests unanswered.", left)
        if self.client is not None:
            await self.client.aclose()

    async def on_request(self, request: Any) -> None:
        """Queue a request; with the queue full, decide by severity now."""
        if not isinstance(request, dict) or not isinstance(request.get("alert"), Alert):
            self.hive.metrics.inc("sentinel.bad_requests")
            reason = "a sentinel.request must be a dict with an Alert under 'alert'"
            await self.hive.dead_letter("bus:sentinel.request", reason, raw=request)
            return
        if not self.url:
            self.hive.metrics.inc("sentinel.not_configured")
            return
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            self.hive.metrics.inc("sentinel.queue_full")
            await self._publish(request, None, "fallback")

    # -- batches -----------------------------------------------------------

    async def _worker(self) -> None:
        while not self.hive.stopping.is_set():
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                await self.handle(batch)
            except Exception:  # noqa: BLE001 - the worker must outlive a bug
                self.hive.metrics.inc("sentinel.errors")
                logger.exception("Handling %d verdict requests failed.", len(batch))

    async def _next_batch(self) -> list[dict[str, Any]]:
        """Wait for a request, then for more up to batch_size or batch_wait_s."""
        try:
            first = await asyncio.wait_for(self.queue.get(), 0.2)
        except TimeoutError:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def handle(self, batch: list[dict[str, Any]]) -> None:
        """Ask about a batch and publish a verdict for each request of it."""
        metrics = self.hive.metrics
        if self.client is None or time.monotonic() < self.down_until:
            metrics.inc("sentinel.fallbacks", len(batch))
            for request in batch:
                await self._publish(request, None, "fallback")
            return
        try:
            results = await self._ask(batch)
        except SentinelError as exc:
            self.down_until = time.monotonic() + self.down_s
            metrics.inc(f"sentinel.{exc.counter}")
            metrics.inc("sentinel.fallbacks", len(batch))
            logger.error("Verdict service failed, falling back to severity: %s.", exc)
            results = {}
        metrics.inc("sentinel.verdicts", len(results))
        for request in batch:
            result = results.get(request["alert"].id)
            if result is None and results:
                metrics.inc("sentinel.missing_results")
            await self._publish(request, result, "service" if result else "fallback")

    async def _ask(self, batch: list[dict[str, Any]]) -> dict[str, Result]:
        """POST the batch, retrying what may pass on a second try."""
        body = {"items": [_item(request) for request in batch]}
        attempt = 0
        while True:
            try:
                return await self._post(body)
            except SentinelError as exc:
                if not exc.retry or attempt >= self.retries:
                    raise
                attempt += 1
                self.hive.metrics.inc("sentinel.retries")
                delay = self.backoff_s * 2 ** (attempt - 1)
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311

    async def _post(self, body: dict[str, Any]) -> dict[str, Result]:
        assert self.client is not None
        try:
            response = await self.client.post(PATH, json=body)
        except httpx.TimeoutException:
            msg = f"no answer from {self.url} within {self.timeout_s} s"
            raise SentinelError(msg, counter="timeouts", retry=True) from None
        except httpx.TransportError as exc:
            msg = f"cannot reach {self.url}: {type(exc).__name__}: {exc}"
            raise SentinelError(msg, counter="unreachable", retry=True) from None
        if response.status_code >= 500 or response.status_code == 429:
            msg = f"{self.url} answered HTTP {response.status_code}"
            raise SentinelError(msg, counter="http_errors", retry=True)
        if response.status_code != 200:
            msg = (
                f"{self.url} refused the request with HTTP {response.status_code}; "
                "check url, api_key_env and api_key_header"
            )
            raise SentinelError(msg, counter="http_errors", retry=False)
        return await self._decode(response.content)

    async def _decode(self, content: bytes) -> dict[str, Result]:
        try:
            reply = _reply.decode(content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.hive.dead_letter(
                f"sentinel:{self.url}", f"unusable verdict reply: {exc}", content
            )
            msg = f"{self.url} returned an unusable reply ({printable(exc, 200)})"
            raise SentinelError(msg, counter="bad_replies", retry=False) from None
        return {result.id: result for result in reply.results}

    async def _publish(
        self, request: dict[str, Any], result: Result | None, source: str
    ) -> None:
        alert: Alert = request["alert"]
        if result is None:
            action = FALLBACK.get(alert.severity, "log")
            risk, classification = None, "unknown"
        else:
            action = action_for(result.risk_score)
            risk, classification = result.risk_score, result.classification
        verdict = {
            "alert": alert,
            "action": action,
            "risk": risk,
            "classification": classification,
            "service_action": result.action if result else None,
            "source": source,
            "key": request.get("key"),
            "reasons": request.get("reasons", []),
        }
        await self.hive.publish(f"verdict.{action}", verdict, key=alert.agent_id)


def _item(request: dict[str, Any]) -> dict[str, Any]:
    alert: Alert = request["alert"]
    return {
        "id": alert.id,
        "kind": "alert",
        "alert": to_dict(alert),
        "indicators": request.get("indicators", {}),
        "reasons": request.get("reasons", []),
    }
