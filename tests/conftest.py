"""Fixtures shared by the whole test suite.

Keep each group under its own banner; add new groups at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

# --------------------------------------------------------------------------
# Databases
#
# ``sqlite_url`` is a SQLite file in the test's tmp_path; ``pg_url`` is a
# PostgreSQL database created for the test and dropped after it; ``db_url``
# runs a test once with each. PostgreSQL is looked for at 127.0.0.1:5432
# (database ``test``, trust authentication, user postgres or root), or at the
# URL in IMMUNE_TEST_POSTGRES. When it cannot be reached, its tests are
# skipped, unless IMMUNE_REQUIRE_SERVICES=1 (CI), which makes them fail.
# --------------------------------------------------------------------------

PG_ADMIN_URLS = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)


def _services_required() -> bool:
    return os.environ.get("IMMUNE_REQUIRE_SERVICES") == "1"


def _unavailable(reason: str) -> None:
    if _services_required():
        pytest.fail(f"{reason} (IMMUNE_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """A URL to a PostgreSQL database from which test databases are made."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed: pip install 'immune[test]'")
    candidates = (
        [os.environ["IMMUNE_TEST_POSTGRES"]]
        if os.environ.get("IMMUNE_TEST_POSTGRES")
        else list(PG_ADMIN_URLS)
    )
    errors = []
    for url in candidates:
        try:
            with psycopg.connect(url, connect_timeout=3):
                return url
        except psycopg.Error as exc:
            errors.append(f"{url}: {str(exc).strip()}")
    _unavailable("PostgreSQL is unreachable: " + "; ".join(errors))
    raise AssertionError("unreachable")  # pytest.skip/fail raise


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped after the test."""
    import psycopg

    name = f"immune_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(pg_admin_url).set(database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file (not yet created) in the test's tmp_path."""
    return f"sqlite:///{tmp_path / 'immune.db'}"


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """Each database in turn: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


# --------------------------------------------------------------------------
# --- MQTT broker fixtures ---
#
# ``mqtt_broker`` is the URL of a real Mosquitto, as aiomqtt's own tests use:
# the one at 127.0.0.1:1883 when it answers MQTT, else a private one started
# on a free port (``mosquitto`` binary), else a skip (a failure when
# IMMUNE_REQUIRE_SERVICES=1). Tests share it and keep apart by topic prefix:
# ``mqtt_prefix`` is unique per test.
# --------------------------------------------------------------------------

# An MQTT 3.1.1 CONNECT: clean session, keepalive 5 s, client id "immune-probe".
_MQTT_CONNECT = bytes([0x10, 24, 0, 4, *b"MQTT", 4, 2, 0, 5, 0, 12, *b"immune-probe"])


def mqtt_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when an MQTT broker at host:port accepts a connection."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_MQTT_CONNECT)
            reply = sock.recv(4)
    except OSError:
        return False
    return reply[:1] == b"\x20" and reply[3:4] == b"\x00"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_mosquitto(directory: Path, port: int):  # -> subprocess.Popen[bytes]
    import subprocess
    import time

    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n",
        encoding="utf-8",
    )
    with (directory / "mosquitto.log").open("wb") as log:
        proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 10
    while not mqtt_answers("127.0.0.1", port, 0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_process(proc)
            pytest.fail(f"mosquitto did not start on port {port}; see {directory}")
        time.sleep(0.05)
    return proc


def _stop_process(proc) -> None:
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL (``mqtt://127.0.0.1:<port>``) of a real MQTT broker."""
    import shutil

    if mqtt_answers("127.0.0.1", 1883):
        yield "mqtt://127.0.0.1:1883"
        return
    if shutil.which("mosquitto") is None:
        _unavailable("no MQTT broker at 127.0.0.1:1883 and no mosquitto binary")
    port = _free_port()
    proc = _start_mosquitto(tmp_path_factory.mktemp("mosquitto"), port)
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        _stop_process(proc)


@pytest.fixture
def mqtt_prefix() -> str:
    """A topic prefix of this test's own, so tests never see each other."""
    return f"immune-test/{uuid.uuid4().hex}"


# --------------------------------------------------------------------------
# --- State files ---
#
# Agents' spools and the hive's command key default to files in
# ``$IMMUNE_STATE_DIR`` (else the user's state directory): every test gets
# its own, so no test writes outside its tmp_path.
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("IMMUNE_STATE_DIR", str(state))
    return state
