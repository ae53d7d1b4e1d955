"""The documentation against the code: hooks, API, schema and every example.

A hook added to ``immune.hookspecs`` without a section in docs/plugins.md, a
section whose signature differs from the spec, an event field missing from
docs/events.md or an example that no longer runs fails here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import orjson
import pytest

import immune.config
from immune import hookspecs
from immune.events import Alert, Event, decode_batch
from immune.hive import Hive
from immune.manager import ENTRY_POINT_GROUP

DOCS = Path(__file__).resolve().parent.parent / "docs"
PLUGINS_MD = (DOCS / "plugins.md").read_text(encoding="utf-8")
EVENTS_MD = (DOCS / "events.md").read_text(encoding="utf-8")

_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_HOOK_HEADING = re.compile(r"^#{2,4} (immune_\w+)\((.*)\)\s*$", re.MULTILINE)
_PLUGIN_FILE = re.compile(r"\A# plugins/(\w+)\.py\n")


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in _BLOCK.findall(text) if lang == language]


def hook_specs() -> dict[str, list[str]]:
    return {
        name: list(inspect.signature(fn).parameters)
        for name, fn in vars(hookspecs).items()
        if name.startswith("immune_") and hasattr(fn, "immune_spec")
    }


def documented_hooks() -> dict[str, list[str]]:
    return {
        name: [a.strip() for a in args.split(",") if a.strip()]
        for name, args in _HOOK_HEADING.findall(PLUGINS_MD)
    }


def plugin_examples() -> dict[str, str]:
    found = {}
    for body in blocks(PLUGINS_MD, "python"):
        match = _PLUGIN_FILE.match(body)
        if match:
            found[match.group(1)] = body
    return found


def headings(text: str, level: str) -> set[str]:
    return set(re.findall(rf"^{level} (\S+)\s*$", text, re.MULTILINE))


# -- hooks -------------------------------------------------------------------


def test_hookspecs_are_found():
    # Guard against the test passing on nothing, should pluggy's marker change.
    assert {"immune_configure", "immune_subscriptions"} <= set(hook_specs())


@pytest.mark.parametrize("hook", sorted(hook_specs()))
def test_hook_is_documented_with_its_signature(hook):
    documented = documented_hooks()
    assert hook in documented, f"docs/plugins.md has no '### {hook}(...)' section"
    assert documented[hook] == hook_specs()[hook], (
        f"docs/plugins.md documents {hook}({', '.join(documented[hook])}) but "
        f"the spec is {hook}({', '.join(hook_specs()[hook])})"
    )


def test_documented_hooks_exist():
    stale = set(documented_hooks()) - set(hook_specs())
    assert not stale, f"docs/plugins.md documents hooks that do not exist: {stale}"


# -- the Hive API --------------------------------------------------------------


def documented_methods() -> dict[str, list[str]]:
    """``await hive.name(args)`` signatures shown in text blocks."""
    found = {}
    for body in blocks(PLUGINS_MD, "text"):
        if not body.startswith("await hive."):
            continue
        source = body.strip().replace("await hive.", "def ", 1) + ": ..."
        func = ast.parse(source).body[0]
        assert isinstance(func, ast.FunctionDef)
        args = func.args
        found[func.name] = [a.arg for a in args.args + args.kwonlyargs]
    return found


def test_hive_methods_are_documented_with_their_signature():
    documented = documented_methods()
    assert {"raise_alert", "publish", "dead_letter"} <= set(documented)
    for name, args in documented.items():
        actual = list(inspect.signature(getattr(Hive, name)).parameters)[1:]
        assert args == actual, f"hive.{name}: documented {args}, actual {actual}"


# -- the event schema ----------------------------------------------------------


@pytest.mark.parametrize("field", [f.name for f in msgspec.structs.fields(Event)])
def test_event_field_is_documented(field):
    assert field in headings(EVENTS_MD, "###"), f"no '### {field}' in events.md"
    assert f"\n| `{field}` | " in EVENTS_MD, f"{field} has no row in the ECS table"


@pytest.mark.parametrize("field", [f.name for f in msgspec.structs.fields(Alert)])
def test_alert_field_is_documented(field):
    alerts = EVENTS_MD[EVENTS_MD.index("\n## Alerts") :]
    assert f"\n| `{field}` | " in alerts


def test_events_md_quotes_real_rejection_reasons():
    base = {"id": "e1", "agent_id": "web-1", "host": "web-1", "ts": 1, "kind": "exec"}
    payload = orjson.dumps({"events": [base, {**base, "id": "e2", "pid": "12"}]})
    _good, bad = decode_batch(payload, max_bytes=10_000, agent_id="web-1")
    assert [r.reason for r in bad] == [
        "Expected `int | null`, got `str` at $.events[1].pid"
    ]
    assert bad[0].reason in EVENTS_MD


# -- examples ------------------------------------------------------------------


@pytest.mark.parametrize("doc", ["plugins.md", "events.md"])
def test_examples_parse(doc):
    text = (DOCS / doc).read_text(encoding="utf-8")
    for body in blocks(text, "python"):
        ast.parse(body)
    for body in blocks(text, "toml"):
        tomllib.loads(body)
    for body in blocks(text, "json"):
        json.loads(body)


def hive_with_plugin_dir(tmp_path: Path, files: dict[str, str]) -> Hive:
    """A hive loading ``files`` from a plugin directory, and nothing else."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    for name, body in files.items():
        (plugin_dir / f"{name}.py").write_text(body, encoding="utf-8")
    config = immune.config.load(environ={})
    config.hive.database = f"sqlite:///{tmp_path}/docs.db"
    config.hive.plugin_dirs = [str(plugin_dir)]
    installed = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    config.hive.disabled_plugins = [ep.name for ep in installed]
    return Hive(config)


def exec_event(event_id: str, comm: str) -> Event:
    return Event(id=event_id, agent_id="lab", host="lab", ts=1, kind="exec", comm=comm)


def test_plugin_examples_are_found():
    assert {"hello", "ticker_example", "counter_example"} <= set(plugin_examples())


@pytest.mark.parametrize("name", sorted(plugin_examples()))
async def test_plugin_example_runs_in_a_hive(tmp_path, name):
    hive = hive_with_plugin_dir(tmp_path, {name: plugin_examples()[name]})
    await hive.start()
    try:
        info = hive.plugins.plugins[name]
        assert info.state == "running", info.error
        await hive.ingest([exec_event("e1", "whoami"), exec_event("e2", "nmap")])
        await hive.bus.join()
    finally:
        await hive.stop()

    assert info.state == "stopped", info.error
    assert hive.metrics.get("bus.handler_errors") == 0


async def test_first_plugin_raises_its_alert(tmp_path):
    hive = hive_with_plugin_dir(tmp_path, {"hello": plugin_examples()["hello"]})
    alerts: list[Alert] = []
    hive.bus.subscribe("alert.#", alerts.append, owner="test")
    async with hive:
        await hive.ingest([exec_event("e1", "id"), exec_event("e2", "whoami")])
        await hive.bus.join()
        await hive.store.flush()
        stored = hive.store.alerts()

    assert [(a.rule, a.severity, a.event_ids) for a in alerts] == [
        ("hello-whoami", "low", ["e2"])
    ]
    assert [row["rule"] for row in stored] == ["hello-whoami"]


def test_testing_example_passes(tmp_path):
    test_code = next(
        body
        for body in blocks(PLUGINS_MD, "python")
        if body.startswith("# tests/test_hello.py")
    )
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "hello.py").write_text(plugin_examples()["hello"])
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_hello.py").write_text(test_code)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function"
        "\npythonpath = plugins\nfilterwarnings = error\n"
    )

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
