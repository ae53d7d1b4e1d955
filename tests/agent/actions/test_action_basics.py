"""The ACTIONS table, argument checks, ping, the policy hook, nft script inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from immune.agent.actions import (
    ACTIONS,
    ActionError,
    Responder,
    nft,
    set_policy_handler,
)

CONTRACT = {
    "ping", "kill", "freeze", "thaw", "jail", "release", "isolate", "unisolate",
    "block", "unblock", "quarantine", "restore", "collect", "policy",
}  # fmt: skip


def test_actions_match_the_bus_contract() -> None:
    assert set(ACTIONS) == CONTRACT


async def test_ping_answers_with_the_agent_pid(responder: Responder) -> None:
    import os

    result = await ACTIONS["ping"]({"echo": "hello"})
    assert result["pong"] is True
    assert result["echo"] == "hello"
    assert result["pid"] == os.getpid()
    assert responder.metrics.get("agent.actions_done") == 1


@pytest.mark.parametrize(
    ("action", "args", "words"),
    [
        ("ping", {"bogus": 1}, ["bogus"]),
        ("ping", ["not", "a", "dict"], ["JSON object", "list"]),
        ("kill", {}, ["pid"]),
        ("kill", {"pid": "12"}, ["pid", "int"]),
        ("kill", {"pid": 0}, ["pid"]),
        ("kill", {"pid": 12, "signal": "HUP"}, ["signal"]),
        ("freeze", {"pid": True}, ["pid"]),
        ("block", {"port": 70000}, ["port"]),
        ("block", {"address": "1.2.3.4; rm -rf /"}, ["not an IP address"]),
        ("block", {"address": "192.0.2.1", "port": 80}, ["one of them"]),
        ("block", {}, ["one of them"]),
        ("block", {"port": 80, "duration": 0}, ["duration"]),
        ("isolate", {"allow": [{"address": "192.0.2.1", "port": 0}]}, ["port"]),
        ("quarantine", {"path": 3}, ["path"]),
        ("restore", {"id": "../../etc/passwd"}, ["id"]),
        ("collect", {"pid": -5}, ["pid"]),
    ],
)
async def test_bad_arguments_are_refused_by_name(
    responder: Responder, action: str, args: Any, words: list[str]
) -> None:
    with pytest.raises(ActionError) as info:
        await ACTIONS[action](args)
    for word in words:
        assert word in str(info.value)
    assert responder.metrics.get("agent.actions_failed") == 1


async def test_policy_without_a_handler_is_refused(responder: Responder) -> None:
    with pytest.raises(ActionError, match="no local policy"):
        await ACTIONS["policy"]({"rules": []})


async def test_policy_reaches_the_handler(responder: Responder, tmp_path: Path) -> None:
    applied = tmp_path / "policy.json"

    def apply(policy: dict[str, Any]) -> dict[str, Any]:
        applied.write_text(json.dumps(policy))
        return {"version": policy["version"], "rules": len(policy["rules"])}

    set_policy_handler(apply)
    policy = {"version": 7, "rules": [{"id": "r1", "mode": "block"}]}
    result = await ACTIONS["policy"](policy)
    assert result == {"version": 7, "rules": 1}
    assert json.loads(applied.read_text()) == policy


async def test_policy_handler_may_be_async(responder: Responder) -> None:
    seen: list[dict[str, Any]] = []

    async def apply(policy: dict[str, Any]) -> dict[str, Any]:
        seen.append(policy)
        return {"ok": True}

    set_policy_handler(apply)
    assert await ACTIONS["policy"]({"v": 1}) == {"ok": True}
    assert seen == [{"v": 1}]


async def test_policy_handler_must_return_a_dict(responder: Responder) -> None:
    set_policy_handler(lambda policy: "applied")  # type: ignore[arg-type,return-value]
    with pytest.raises(ActionError, match="returned str"):
        await ACTIONS["policy"]({"v": 1})


async def test_block_in_a_missing_namespace_is_an_action_error(tmp_path: Path) -> None:
    import os

    from actionkit import make_responder, need

    need(os.geteuid() == 0, "needs root (setns)")
    lost = make_responder(tmp_path, netns="immune-test-does-not-exist")
    with pytest.raises(ActionError, match="immune-test-does-not-exist"):
        await lost.block({"port": 4444})


# --------------------------------------------------------------------------
# What may reach an nft script
# --------------------------------------------------------------------------


@given(st.text(max_size=60))
def test_only_addresses_reach_an_nft_script(value: str) -> None:
    import re

    try:
        net = nft.network(value)
    except ActionError as exc:
        assert repr(value) in str(exc)
        return
    line = nft.elements("add", nft.address_set(net), [nft.element(net)], 60)
    body = line.split("{", 1)[1]
    assert re.fullmatch(r" [0-9a-f.:/]+ timeout 60s }\n", body), line


@pytest.mark.parametrize("part", ['a"b', "a b", "..", "a;b", "", "x\n"])
def test_cgroup_paths_with_odd_characters_are_refused(part: str) -> None:
    with pytest.raises(ActionError):
        nft.quoted(f"immune/{part}")


async def test_broker_names_are_resolved_to_addresses() -> None:
    from immune.agent.actions.responder import _resolve

    allowed = await _resolve("localhost", 1883, "tcp")
    assert nft.Allowed(nft.network("127.0.0.1"), 1883, "tcp") in allowed
    with pytest.raises(ActionError, match="resolve"):
        await _resolve("no-such-host.invalid", 1883, "tcp")
