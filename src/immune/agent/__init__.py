"""The endpoint agent: sensors that watch a host, and the link that reports it.

:class:`Agent` runs the first sensor that works here (``cn_proc``, then
``proc``), batches its events and publishes them over MQTT; ``immune agent``
runs one alone and ``immune up`` runs one beside the hive, sharing its
:class:`~immune.metrics.Metrics`.
"""

from immune.agent.agent import Agent
from immune.agent.sensors import Sensor, SensorUnavailableError

__all__ = ["Agent", "Sensor", "SensorUnavailableError"]
