"""The local policy: defaults, validation, the file, and apply_policy."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from immune.agent import policy
from immune.agent.policy import Policy, PolicyError, PolicyStore, Rules, parse


def test_defaults_are_the_original_rules() -> None:
    rules = Rules(Policy())
    assert rules.exec_dirs == ("/tmp/", "/dev/shm/", "/var/tmp/")
    assert rules.ports == {4444, 5555, 6666, 31337, 12345}
    assert rules.file_verdict("/etc/shadow") is not None
    assert rules.file_verdict("/home/alice/.ssh/id_rsa") is not None
    assert rules.file_verdict("/home/alice/x/.ssh/id_rsa") is None
    assert rules.setuid_verdict(1000, 0) is not None
    assert rules.setuid_verdict(0, 1000) is None
    for line in (["bash", "-i"], ["nc", "-e", "/bin/sh", "h", "1"], ["curl", "x"]):
        assert rules.cmdline_verdict(line) is not None, line
    assert rules.cmdline_verdict(["ls", "-l"]) is None
    assert {Policy().exec.mode, Policy().files.mode} == {"audit"}


def test_unknown_key_is_named() -> None:
    with pytest.raises(PolicyError, match=r"unknown field `wat` - at `\$\.exec`"):
        parse({"exec": {"wat": 1}})


def test_bad_mode_port_and_pattern_are_refused() -> None:
    with pytest.raises(PolicyError, match="exec.mode"):
        parse({"exec": {"mode": "maybe"}})
    with pytest.raises(PolicyError, match="ports"):
        parse({"ports": {"ports": [70000]}})
    with pytest.raises(PolicyError, match=r"cmdline.patterns\[0\].*not RE2"):
        parse({"cmdline": {"patterns": ["(unclosed"]}})
    with pytest.raises(PolicyError, match="not an absolute path"):
        parse({"files": {"paths": ["etc/shadow"]}})


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        policy.load(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[exec\n")
    with pytest.raises(PolicyError, match=f"{bad} is not valid TOML"):
        policy.load(bad)


def test_dump_round_trips_through_the_file(tmp_path: Path) -> None:
    text = policy.dump(Policy())
    assert tomllib.loads(text)["ports"]["ports"] == [4444, 5555, 6666, 31337, 12345]
    path = tmp_path / "policy.toml"
    path.write_text(text)
    assert policy.load(path).policy == Policy()


def test_apply_policy_swaps_saves_and_tells_subscribers(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    store = PolicyStore(path)
    seen: list[Rules] = []
    store.subscribe(seen.append)
    policy.install(store)
    try:
        result = policy.apply_policy({"exec": {"mode": "block"}})
    finally:
        policy.install(PolicyStore())
    assert result == {"applied": True, "saved": str(path)}
    assert store.rules.policy.exec.mode == "block"
    assert seen and seen[0] is store.rules
    assert policy.load(path).policy.exec.mode == "block"


def test_refused_policy_leaves_the_rules_in_force() -> None:
    store = PolicyStore()
    before = store.rules
    with pytest.raises(PolicyError):
        store.apply({"ports": {"ports": "4444"}})
    assert store.rules is before and store.refused == 1


def test_sighup_reload_keeps_rules_on_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[exec]\nmode = "block"\n')
    store = PolicyStore(path)
    path.write_text('[exec]\nmode = "audit"\n')
    assert store.reload() and store.rules.policy.exec.mode == "audit"
    path.write_text("not toml [")
    assert not store.reload() and store.rules.policy.exec.mode == "audit"


def test_example_file_is_the_defaults() -> None:
    example = Path(__file__).parents[2] / "docs" / "policy.example.toml"
    assert example.read_text() == policy.dump(Policy())
    assert policy.load(example).policy == Policy()
