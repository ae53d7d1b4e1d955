"""What every sensor has in common, and how the agent picks them.

A sensor watches the host on a thread of its own (kernel sockets and /proc
are blocking interfaces, and a short-lived process must be read while it
still exists) and hands each :class:`~immune.events.Event` to an ``emit``
callback, on that thread. The agent's callback moves it to the event loop.

The agent runs several at once (:func:`open_sensors`): the first *telemetry*
sensor of its list that works on this host (eBPF, else the audit stream,
else CN_PROC, else /proc polling) and every *enforcement* sensor that works
(fanotify, which refuses execs and opens). Each one's events pass a
:class:`Gate` on the way out, which applies the local policy (severity, the
rule matched, a kill for a blocked command line) and the sensor's rate limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import msgspec

from immune.agent.policy import PolicyStore, Rules, current
from immune.errors import ImmuneError
from immune.events import Event, Outcome
from immune.metrics import Metrics

logger = logging.getLogger(__name__)


class SensorUnavailableError(ImmuneError):
    """A sensor cannot run on this host; the message says why.

    Args:
        sensor: the sensor's name.
        reason: why, for a person ("needs root: ...").
    """

    def __init__(self, sensor: str, reason: str) -> None:
        super().__init__(f"sensor {sensor!r} unavailable: {reason}")
        self.sensor = sensor
        self.reason = reason


class Sensor:
    """Base class of the agent's sensors.

    Subclasses set ``name``, implement :meth:`open` (probe and acquire, or
    raise :class:`SensorUnavailableError`) and :meth:`_run` (the thread's
    body, which returns once ``_stopping`` is set), and may override
    :meth:`_wakeup` to interrupt a blocking call.

    Args:
        agent_id: stamped on every event.
        host: the host name stamped on every event.
        emit: called on the sensor's thread with each event; must not block.
        metrics: where counters such as ``agent.sensor_overruns`` go.
        on_error: called on the sensor's thread if it dies of an exception.
    """

    name = "sensor"

    def __init__(
        self,
        *,
        agent_id: str,
        host: str,
        emit: Callable[[Event], None],
        metrics: Metrics | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.host = host
        self.emit = emit
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_error = on_error
        #: Set when the thread died of an exception, which is kept here.
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        """A short phrase for the log ("netlink process connector")."""
        return self.name

    @property
    def names(self) -> list[str]:
        """The names of the sensors running under this one."""
        return [self.name]

    def unavailable(self, reason: str) -> NoReturn:
        raise SensorUnavailableError(self.name, reason)

    def open(self) -> None:
        """Acquire what the sensor needs; raise SensorUnavailableError if it can't."""

    def close(self) -> None:
        """Release what :meth:`open` acquired (called after the thread ended)."""

    def _run(self) -> None:
        raise NotImplementedError

    def _wakeup(self) -> None:
        """Interrupt the thread's blocking call so that it sees the stop."""

    def start(self) -> None:
        """Run the sensor on a thread of its own."""
        self._thread = threading.Thread(
            target=self._main, name=f"immune-sensor-{self.name}", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
            logger.exception("Sensor %s failed; no more events from it.", self.name)
            if self.on_error is not None:
                self.on_error(exc)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, wait for it, and release the sensor's resources."""
        self._stopping.set()
        self._wakeup()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning(
                    "Sensor %s did not stop within %.1f s.", self.name, timeout
                )
                return
        self.close()

    def __enter__(self) -> Sensor:
        self.open()
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


SensorFactory = Callable[..., Sensor]


def registry() -> dict[str, SensorFactory]:
    """The sensors this agent knows, by the name used in ``[agent] sensors``."""
    from immune.agent.audit import AuditSensor
    from immune.agent.cnproc import CnProcSensor
    from immune.agent.ebpf import EbpfSensor
    from immune.agent.fanotify import FanotifySensor
    from immune.agent.kmod import KmodSensor
    from immune.agent.procfs import ProcPollSensor

    found: list[SensorFactory] = [KmodSensor, EbpfSensor, FanotifySensor]
    found += [AuditSensor, CnProcSensor, ProcPollSensor]
    return {factory.name: factory for factory in found}  # type: ignore[attr-defined]


def open_first(
    names: Sequence[str],
    options: dict[str, dict[str, Any]] | None = None,
    **common: Any,
) -> Sensor:
    """Open the first sensor of ``names`` that works on this host.

    Each one that does not is logged with its reason, and the one chosen is
    logged with the reasons the others were passed over.

    Args:
        names: sensor names in order of preference (``["cn_proc", "proc"]``).
        options: keyword arguments for one sensor, by name.
        **common: keyword arguments for every sensor (agent_id, host, emit,
            metrics).

    Raises:
        SensorUnavailableError: none of them works; the message has every
            reason.
    """
    known = registry()
    options = options or {}
    passed: list[str] = []
    for name in names:
        factory = known.get(name)
        if factory is None:
            passed.append(f"{name}: unknown sensor (known: {', '.join(known)})")
            continue
        sensor = factory(**common, **options.get(name, {}))
        try:
            sensor.open()
        except SensorUnavailableError as exc:
            sensor.close()
            passed.append(f"{name} unavailable ({exc.reason})")
            continue
        if passed:
            logger.warning(
                "%s; falling back to %s.", "; ".join(passed), sensor.describe()
            )
        else:
            logger.info("Sensor %s running (%s).", name, sensor.describe())
        return sensor
    raise SensorUnavailableError(",".join(names) or "none", "; ".join(passed))


# --- Several sensors at once ---------------------------------------------------

#: Sensors that report what processes do; one of them runs, the first that works.
TELEMETRY = ("kmod", "ebpf", "audit", "cn_proc", "proc")
#: Sensors that refuse what the policy blocks; each one that works runs too.
ENFORCEMENT = ("fanotify",)
DEFAULT_SENSORS = ["ebpf", "fanotify", "cn_proc", "proc"]
#: The least time between two warnings about a sensor's rate limit.
LIMIT_LOG_EVERY = 10.0


class RateLimiter:
    """A token bucket: ``rate`` events a second on average, ``burst`` at once.

    Args:
        rate: tokens added per second.
        burst: the most tokens held.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Gate:
    """What a sensor's events pass through: the local policy and a rate limit.

    Counts ``agent.sensor.<name>.seen``, ``.sent``, ``.blocked`` and
    ``.dropped``. An event a rule matched is never dropped by the limit.

    Args:
        sensor: the sensor's name.
        emit: where events go next (the agent's callback).
        policy: the rules in force.
        metrics: where the counters go.
    """

    def __init__(
        self,
        sensor: str,
        emit: Callable[[Event], None],
        policy: PolicyStore,
        metrics: Metrics,
    ) -> None:
        self.sensor = sensor
        self.emit = emit
        self.policy = policy
        self.metrics = metrics
        self.prefix = f"agent.sensor.{sensor}."
        limits = policy.rules.policy.limits
        self.limiter = RateLimiter(limits.events_per_second, limits.burst)
        self._last_log = -LIMIT_LOG_EVERY
        for counter in ("seen", "sent", "blocked", "dropped"):
            metrics.inc(self.prefix + counter, 0)
        policy.subscribe(self._limits)

    def _limits(self, rules: Rules) -> None:
        limits = rules.policy.limits
        self.limiter = RateLimiter(limits.events_per_second, limits.burst)

    def __call__(self, event: Event) -> None:
        self.metrics.inc(self.prefix + "seen")
        if event.extra is None or "rule" not in event.extra:
            event = self._judge(event)
        matched = event.extra is not None and "rule" in event.extra
        if event.outcome == "blocked":
            self.metrics.inc(self.prefix + "blocked")
        if not matched and not self.limiter.allow():
            self._drop()
            return
        self.metrics.inc(self.prefix + "sent")
        self.emit(event)

    def _drop(self) -> None:
        self.metrics.inc(self.prefix + "dropped")
        self.metrics.inc("agent.dropped")
        now = time.monotonic()
        if now - self._last_log >= LIMIT_LOG_EVERY:
            self._last_log = now
            logger.warning(
                "Sensor %s over its rate limit: dropping events, %d so far.",
                self.sensor,
                self.metrics.get(self.prefix + "dropped"),
            )

    def _judge(self, event: Event) -> Event:
        verdict = self.policy.rules.verdict(event)
        if verdict is None:
            return event
        extra = dict(event.extra or {})
        extra.update(rule=verdict.rule, mode=verdict.mode)
        outcome = event.outcome
        if verdict.block and verdict.rule == "reverse_shell" and event.pid:
            # Already exec'd: the refusal is to kill it before it does more.
            outcome, extra["enforced"] = kill(event.pid)
        return msgspec.structs.replace(
            event, severity=verdict.severity, outcome=outcome, extra=extra
        )


def kill(pid: int) -> tuple[Outcome, str]:
    """SIGKILL a process a blocking rule matched; the outcome and what was done."""
    if pid == os.getpid():
        return "allowed", "not the agent itself"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "unknown", "already gone"
    except OSError as exc:
        return "unknown", f"kill failed: {exc.strerror}"
    return "blocked", "killed"


class SensorSet(Sensor):
    """Several sensors run and stopped as one, for the agent.

    Args:
        sensors: the open sensors.
        off: why each sensor of the list is not running, by name.
        policy: the store the sensors read; reloaded on SIGHUP while running.
    """

    name = "set"

    def __init__(
        self,
        sensors: list[Sensor],
        off: dict[str, str],
        policy: PolicyStore,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.sensors = sensors
        self.off = off
        self.policy = policy
        self.name = "+".join(s.name for s in sensors)
        self._sighup: asyncio.AbstractEventLoop | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sensors]

    def describe(self) -> str:
        return "; ".join(f"{s.name}: {s.describe()}" for s in self.sensors)

    def start(self) -> None:
        for sensor in self.sensors:
            sensor.start()
        self.policy.watch()
        try:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self.policy.reload)
            self._sighup = loop
        except (RuntimeError, ValueError, NotImplementedError):
            logger.debug("No SIGHUP handler: not on the main thread's event loop.")

    @property
    def running(self) -> bool:
        return any(sensor.running for sensor in self.sensors)

    def stop(self, timeout: float = 5.0) -> None:
        for sensor in self.sensors:
            sensor.stop(timeout)
        self.policy.close()
        # Only the main thread may change signal handlers; the agent stops
        # its sensors once from a worker thread and again from the loop's.
        main = threading.current_thread() is threading.main_thread()
        if self._sighup is not None and main:
            self._sighup.remove_signal_handler(signal.SIGHUP)
            self._sighup = None

    def close(self) -> None:
        for sensor in self.sensors:
            sensor.close()


def open_sensors(
    names: Sequence[str],
    options: dict[str, dict[str, Any]] | None = None,
    *,
    policy: PolicyStore | None = None,
    **common: Any,
) -> SensorSet:
    """Open the sensors of ``names`` this host allows, and say which and why.

    The first telemetry sensor that works is opened and the later ones are
    left off; each enforcement sensor that works is opened as well (with
    ``block_only`` when a telemetry sensor already reports). The log says
    which sensors run and why each other one is off.

    Args:
        names: sensor names in order of preference.
        options: keyword arguments for one sensor, by name.
        policy: the local policy (the default store when None).
        **common: keyword arguments for every sensor (agent_id, host, emit,
            metrics, on_error).

    Raises:
        SensorUnavailableError: no sensor works; the message has every reason.
    """
    known = registry()
    options = options or {}
    store = policy if policy is not None else current()
    emit: Callable[[Event], None] = common.pop("emit")
    metrics: Metrics = common.setdefault("metrics", Metrics())
    running: list[Sensor] = []
    off: dict[str, str] = {}
    telemetry: str | None = None
    for name in names:
        factory = known.get(name)
        if factory is None:
            off[name] = f"unknown sensor (known: {', '.join(known)})"
            continue
        if name in TELEMETRY and telemetry is not None:
            off[name] = f"not needed, {telemetry} reports process events"
            continue
        kwargs = dict(options.get(name, {}))
        if name in ("ebpf", "fanotify", "audit"):
            kwargs["policy"] = store
        if name in ENFORCEMENT and telemetry is not None:
            kwargs.setdefault("block_only", True)
        gate = Gate(name, emit, store, metrics)
        sensor = factory(emit=gate, **common, **kwargs)
        try:
            sensor.open()
        except SensorUnavailableError as exc:
            sensor.close()
            off[name] = exc.reason
            continue
        running.append(sensor)
        if name in TELEMETRY:
            telemetry = name
    if not running:
        reasons = "; ".join(f"{n}: {why}" for n, why in off.items())
        raise SensorUnavailableError(",".join(names) or "none", reasons)
    _log_choice(running, off)
    return SensorSet(running, off, store, emit=emit, **common)


def _log_choice(running: list[Sensor], off: dict[str, str]) -> None:
    on = "; ".join(f"{s.name} ({s.describe()})" for s in running)
    logger.info("Sensors running: %s.", on)
    for name, why in off.items():
        log = logger.info if why.startswith("not needed") else logger.warning
        log("Sensor %s off: %s.", name, why)
