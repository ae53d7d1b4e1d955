"""What every sensor has in common, and how the agent picks one.

A sensor watches the host on a thread of its own (kernel sockets and /proc
are blocking interfaces, and a short-lived process must be read while it
still exists) and hands each :class:`~immune.events.Event` to an ``emit``
callback, on that thread. The agent's callback moves it to the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from immune.errors import ImmuneError
from immune.events import Event
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
    from immune.agent.cnproc import CnProcSensor
    from immune.agent.kmod import KmodSensor
    from immune.agent.procfs import ProcPollSensor

    return {
        CnProcSensor.name: CnProcSensor,
        ProcPollSensor.name: ProcPollSensor,
        KmodSensor.name: KmodSensor,
    }


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
