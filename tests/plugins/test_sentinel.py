"""sentinel against a real HTTP server on 127.0.0.1: up, down, slow, garbled."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from response_kit import SimulatedAgent, alert, make_hive, until

from immune.plugins.response import ResponsePlugin
from immune.plugins.sentinel import SentinelPlugin, action_for
from immune.plugins.sentinel_bridge import SentinelBridgePlugin

API_KEY = "s3cret-key-never-logged"


class Service:
    """A verdict service: answers each item with ``alert.data["risk"]``.

    ``mode`` is ``ok``, ``slow``, ``garbage``, ``invalid``, ``401``, or
    ``500`` (the next ``failures`` requests fail, then ok).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.failures = 0
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                service.requests.append((dict(self.headers), body))
                status, reply = service.answer(self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        if path != "/api/v1/analyze":
            return 404, b"{}"
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "garbage":
            return 200, b"<html>Service temporarily confused</html>"
        if self.mode == "invalid":
            return 200, json.dumps({"results": [{"id": "x", "risk_score": 7}]}).encode()
        if self.mode == "401":
            return 401, b'{"error": "bad key"}'
        if self.mode == "500" and self.failures > 0:
            self.failures -= 1
            return 500, b"{}"
        results = [
            {
                "id": item["id"],
                "risk_score": item["alert"]["data"].get("risk", 0.0),
                "classification": "malicious",
                "action": "quarantine",
            }
            for item in body["items"]
        ]
        return 200, json.dumps({"results": results}).encode()


@pytest.fixture
def service() -> Iterator[Service]:
    svc = Service()
    svc.thread.start()
    yield svc
    svc.server.shutdown()
    svc.server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start(db_url: str, url: str, **config: Any) -> tuple[Any, list[Any]]:
    table = {
        "url": url,
        "api_key": API_KEY,
        "timeout_s": 0.3,
        "retries": 1,
        "backoff_s": 0.01,
        "batch_wait_s": 0.05,
        **config,
    }
    hive = make_hive(db_url, [("sentinel", SentinelPlugin())], sentinel=table)
    verdicts: list[dict[str, Any]] = []
    hive.bus.subscribe("verdict.*", verdicts.append)
    await hive.start()
    return hive, verdicts


async def ask(hive: Any, *alerts: Any) -> None:
    for one in alerts:
        await hive.publish("sentinel.request", {"alert": one, "key": one.id})


async def stop(hive: Any) -> None:
    await hive.stop()
    hive.store.close()


def test_sentinel_risk_thresholds() -> None:
    assert [action_for(r) for r in (1.0, 0.9, 0.89, 0.7, 0.5, 0.49, 0.0)] == [
        "isolate",
        "isolate",
        "block",
        "block",
        "alert",
        "log",
        "log",
    ]


async def test_sentinel_asks_in_batches_with_the_api_key(
    sqlite_url: str, service: Service
) -> None:
    hive, verdicts = await start(sqlite_url, service.url, batch_wait_s=0.3)
    try:
        risks = [0.95, 0.75, 0.55, 0.1]
        alerts = [alert(data={"risk": r}) for r in risks]
        await ask(hive, *alerts)
        await until(lambda: len(verdicts) == 4)
        assert len(service.requests) == 1  # one batch
        headers, body = service.requests[0]
        assert headers["X-API-Key"] == API_KEY
        assert [item["id"] for item in body["items"]] == [a.id for a in alerts]
        by_alert = {v["alert"].id: v for v in verdicts}
        assert [by_alert[a.id]["action"] for a in alerts] == [
            "isolate",
            "block",
            "alert",
            "log",
        ]
        first = by_alert[alerts[0].id]
        assert (first["source"], first["risk"], first["classification"]) == (
            "service",
            0.95,
            "malicious",
        )
        assert first["service_action"] == "quarantine"
        assert hive.metrics.get("sentinel.verdicts") == 4
    finally:
        await stop(hive)


async def test_sentinel_service_down_falls_back_to_severity(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hive, verdicts = await start(sqlite_url, f"http://127.0.0.1:{closed_port()}")
    try:
        alerts = [alert(severity=s) for s in ("critical", "high", "medium", "low")]
        await ask(hive, *alerts)
        await until(lambda: len(verdicts) == 4)
        assert [v["action"] for v in verdicts] == ["isolate", "block", "alert", "log"]
        assert {v["source"] for v in verdicts} == {"fallback"}
        assert hive.metrics.get("sentinel.unreachable") == 1
        assert hive.metrics.get("sentinel.retries") == 1
        assert "cannot reach" in caplog.text
        assert API_KEY not in caplog.text
    finally:
        await stop(hive)


async def test_sentinel_slow_service_times_out(
    sqlite_url: str, service: Service
) -> None:
    service.mode = "slow"
    hive, verdicts = await start(sqlite_url, service.url, retries=0)
    try:
        began = time.monotonic()
        await ask(hive, alert(severity="high"))
        await until(lambda: verdicts)
        assert time.monotonic() - began < 1.0  # did not wait for the answer
        assert verdicts[0]["source"] == "fallback" and verdicts[0]["action"] == "block"
        assert hive.metrics.get("sentinel.timeouts") == 1
    finally:
        await stop(hive)


@pytest.mark.parametrize("mode", ["garbage", "invalid"])
async def test_sentinel_garbled_reply_is_a_clear_error(
    sqlite_url: str, service: Service, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service.mode = mode
    hive, verdicts = await start(sqlite_url, service.url)
    try:
        await ask(hive, alert(severity="medium"))
        await until(lambda: verdicts)
        assert verdicts[0]["source"] == "fallback" and verdicts[0]["action"] == "alert"
        assert hive.metrics.get("sentinel.bad_replies") == 1
        assert len(service.requests) == 1  # garbage is not retried
        assert "returned an unusable reply" in caplog.text
        assert API_KEY not in caplog.text
        await hive.store.flush()
        (dead,) = hive.store.dead_letters()
        assert dead["source"] == f"sentinel:{service.url}"
        assert "unusable verdict reply" in dead["reason"]
    finally:
        await stop(hive)


async def test_sentinel_retries_a_server_error(
    sqlite_url: str, service: Service
) -> None:
    service.mode, service.failures = "500", 1
    hive, verdicts = await start(sqlite_url, service.url)
    try:
        await ask(hive, alert(data={"risk": 0.92}))
        await until(lambda: verdicts)
        assert verdicts[0]["source"] == "service"
        assert verdicts[0]["action"] == "isolate"
        assert len(service.requests) == 2
        assert hive.metrics.get("sentinel.retries") == 1
    finally:
        await stop(hive)


async def test_sentinel_refused_key_is_not_retried_and_service_rests(
    sqlite_url: str, service: Service
) -> None:
    service.mode = "401"
    hive, verdicts = await start(sqlite_url, service.url, down_s=60)
    try:
        await ask(hive, alert(severity="critical"))
        await until(lambda: verdicts)
        assert hive.metrics.get("sentinel.http_errors") == 1
        assert len(service.requests) == 1
        # While it is considered down, verdicts fall back without a request.
        await ask(hive, alert(severity="low"))
        await until(lambda: len(verdicts) == 2)
        assert len(service.requests) == 1
        assert [v["action"] for v in verdicts] == ["isolate", "log"]
    finally:
        await stop(hive)


def test_sentinel_bad_url_is_refused(sqlite_url: str) -> None:
    hive = make_hive(sqlite_url, [])
    with pytest.raises(ValueError, match="http://"):
        SentinelPlugin().immune_configure(hive, {"url": "ftp://x"})


async def test_sentinel_verdict_is_acted_on_end_to_end(
    sqlite_url: str, service: Service
) -> None:
    hive = make_hive(
        sqlite_url,
        [
            ("sentinel_bridge", SentinelBridgePlugin()),
            ("sentinel", SentinelPlugin()),
            ("response", ResponsePlugin()),
        ],
        sentinel_bridge={"indicators": ["203.0.113.7"]},
        sentinel={"url": service.url, "api_key": API_KEY, "batch_wait_s": 0.01},
        response={"mode": "on", "tick_s": 0.05},
    )
    await hive.start()
    agent = SimulatedAgent(hive)
    try:
        bad = alert(severity="low", data={"addr": "203.0.113.7", "risk": 0.97})
        await hive.publish(bad.topic, bad)
        await until(lambda: ("web-1", "isolate") in agent.actions())
        await until(
            lambda: any(r["playbook"] == "verdict:isolate" for r in hive.store.runs())
        )
        assert hive.metrics.get("sentinel_bridge.asked") == 1
    finally:
        await stop(hive)


async def test_sentinel_bad_request_is_kept_and_counted(
    sqlite_url: str, service: Service
) -> None:
    hive, verdicts = await start(sqlite_url, service.url)
    try:
        await hive.publish("sentinel.request", {"alert": "not an alert"})
        await until(lambda: hive.metrics.get("sentinel.bad_requests") == 1)
        await hive.store.flush()
        (dead,) = hive.store.dead_letters()
        assert dead["source"] == "bus:sentinel.request"
        # The worker still answers what comes next.
        await ask(hive, alert(data={"risk": 0.75}))
        await until(lambda: verdicts)
        assert verdicts[0]["action"] == "block"
    finally:
        await stop(hive)


async def test_sentinel_without_url_is_idle(sqlite_url: str) -> None:
    hive, verdicts = await start(sqlite_url, "")
    try:
        await ask(hive, alert(severity="critical"))
        await until(lambda: hive.metrics.get("sentinel.not_configured") == 1)
        await hive.bus.join()
        assert verdicts == []
    finally:
        await stop(hive)
