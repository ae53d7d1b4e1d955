"""The endpoint agent: sensors that watch a host, and the link that reports it.

:class:`Agent` runs the sensors this host allows (the first telemetry sensor
that works: ``kmod``, ``ebpf``, ``audit``, ``cn_proc`` or ``proc``, beside
``fanotify`` for blocking), spools and batches its events, publishes them
over MQTT and carries out the hive's signed commands; ``immune agent``
runs one alone and ``immune up`` runs one beside the hive, sharing its
:class:`~immune.metrics.Metrics`.
"""

from immune.agent.agent import Agent
from immune.agent.sensors import Sensor, SensorUnavailableError

__all__ = ["Agent", "Sensor", "SensorUnavailableError"]
