"""The hooks a plugin may implement.

Every IMMUNE module, built in or third party, is a pluggy plugin: a module or
a class whose functions carry ``@hookimpl`` and are named after the hooks
below. A plugin implements only the hooks it needs, and each hook
implementation may take fewer arguments than the spec lists.

Use in plugins::

    from immune import hookimpl

    @hookimpl
    def immune_subscriptions(hive):
        return [("event.exec", on_exec)]

Hooks are called once per plugin at lifecycle points, never per event: events
reach plugins through the handlers they return from ``immune_subscriptions``,
which the bus indexes by topic. A hook that raises disables that plugin alone;
the hive logs the reason and carries on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from immune.bus import Handler
    from immune.hive import Hive

hookspec = pluggy.HookspecMarker("immune")
hookimpl = pluggy.HookimplMarker("immune")


# -- lifecycle --------------------------------------------------------------


@hookspec
def immune_configure(hive: Hive, config: dict[str, Any]) -> None:
    """Called once, after the plugin is loaded and before it is started.

    Args:
        hive: the running hive (publish, alerts, commands, storage, metrics).
        config: this plugin's table from the configuration file,
            ``[plugins.<name>]``, or an empty dict.

    Raise :class:`immune.errors.PluginError` (or any exception) to refuse a
    bad configuration: the plugin is then disabled with that reason, and the
    hive runs without it.

    Example::

        @hookimpl
        def immune_configure(config):
            global THRESHOLD
            THRESHOLD = int(config.get("threshold", 5))
    """


@hookspec
def immune_subscriptions(hive: Hive) -> Iterable[tuple[str, Handler]]:
    """Return the bus topics this plugin listens to, with their handlers.

    Called once at start. Each item is ``(pattern, handler)``: a dotted topic
    pattern (``event.exec``, ``event.*``, ``alert.#``) and a function or
    coroutine function that takes the message. Events are
    :class:`immune.events.Event`, alerts :class:`immune.events.Alert`.

    Handlers run on the bus's tasks: they should be quick, and must await
    (not block on) anything slow. An exception in a handler is logged and
    counted; the message is kept as a dead letter and other plugins still get
    it.

    Example::

        @hookimpl
        def immune_subscriptions(hive):
            async def on_connect(event):
                if event.port == 4444:
                    await hive.raise_alert(rule="port-4444", title="...",
                                           severity="high", events=[event],
                                           plugin="myplugin")
            return [("event.connect", on_connect)]
    """


@hookspec
def immune_start(hive: Hive) -> Awaitable[None] | None:
    """Called when the hive starts, after subscriptions are in place.

    May return a coroutine, which the hive awaits; start long-running work
    with ``hive.create_task`` so that the hive cancels it at stop. Sources of
    events (the MQTT transport) start here.
    """


@hookspec
def immune_stop(hive: Hive) -> Awaitable[None] | None:
    """Called when the hive stops, in reverse order of start.

    May return a coroutine, which the hive awaits. Flush and close what the
    plugin holds; the bus has already delivered every queued message.
    """


# -- description ------------------------------------------------------------


@hookspec
def immune_describe() -> dict[str, Any]:
    """Describe the plugin for ``immune plugins`` and the API.

    Return a dict with any of ``description`` (one line) and ``version``.
    """
