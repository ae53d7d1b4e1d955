"""Rule files: loading, refusals with file and line, the shipped rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from immune.errors import ImmuneError
from immune.rules import DEFAULT_DIR, RuleError, load_rules
from immune.rules.testing import run_rule_tests

from .helpers import ev, ruleset

GOOD = """\
lists:
  shells: [/bin/sh, /bin/bash]
macros:
  shell: {exe: {in: {list: shells}}}
rules:
  - id: root-shell
    title: Root shell
    severity: high
    techniques: [T1059.004]
    condition: {kind: exec, macro: shell, uid: 0}
    exceptions:
      - cwd: /root/allowed
  - id: idle
    enabled: false
    condition: {kind: exec}
"""


def test_ruleset_rule_fields_and_matching():
    rules = ruleset(GOOD)
    rule = rules.rules["root-shell"]
    assert (rule.title, rule.severity, rule.techniques) == (
        "Root shell",
        "high",
        ("T1059.004",),
    )
    assert rule.kinds == frozenset({"exec"})
    assert rule.line == 6
    assert [r.id for r in rules.match(ev(exe="/bin/sh", uid=0))] == ["root-shell"]
    assert rules.match(ev(exe="/bin/sh", uid=0, cwd="/root/allowed")) == []
    assert rules.match(ev("fork", exe="/bin/sh", uid=0)) == []


def test_ruleset_index_leaves_out_the_kind_test_and_nothing_else():
    # Events reach a rule through the index of its kinds, so the test of the
    # kind is left out there; the whole condition still holds everywhere else.
    rules = ruleset(
        GOOD
        + """\
  - id: just-exec
    condition: {kind: exec}
  - id: exec-or-fork
    condition: {kind: [exec, fork], uid: 0}
  - id: said-kinds
    kinds: [exec]
    condition: {kind: [exec, open], uid: 0}
  - id: wider-kinds
    kinds: [exec, fork]
    condition: {kind: exec, uid: 0}
"""
    )
    events = [
        ev(exe="/bin/sh", uid=0),
        ev(exe="/bin/sh", uid=1),
        ev("fork", exe="/bin/sh", uid=0),
        ev("open", uid=0),
        ev(uid=0, cwd="/root/allowed", exe="/bin/bash"),
    ]
    for rule in rules.rules.values():
        for event in events:
            expected = rule.matches(event)
            if rule.kinds is None or event.kind in rule.kinds:
                assert rule.matches_indexed(event) is expected, (rule.id, event)
    assert rules.rules["root-shell"].indexed is not None
    assert rules.rules["just-exec"].indexed is not None
    # kinds: wider than the condition's kind: the kind test stays.
    assert rules.rules["wider-kinds"].indexed is None
    assert not rules.rules["wider-kinds"].matches_indexed(ev("fork", uid=0))
    assert [r.id for r in rules.match(ev(uid=0))] == [
        "just-exec",
        "exec-or-fork",
        "said-kinds",
        "wider-kinds",
    ]


def test_ruleset_disabled_rule_is_kept_but_not_run():
    rules = ruleset(GOOD)
    assert "idle" in rules.rules
    assert [r.id for r in rules.for_kind("exec")] == ["root-shell"]


def test_ruleset_index_by_kind_puts_kindless_rules_everywhere():
    rules = ruleset("rules:\n  - id: any-root\n    condition: {uid: 0}\n")
    assert all(rules.for_kind(k) for k in ("exec", "open", "setuid"))


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("rules:\n  - id: x\n", 2, "has no condition"),
        ("rules:\n  - id: Bad Id\n    condition: {uid: 0}\n", 2, "id 'Bad Id'"),
        (
            "rules:\n  - id: x\n    severity: awful\n    condition: {uid: 0}\n",
            3,
            "severity",
        ),
        (
            "rules:\n  - id: x\n    techniques: [1059]\n    condition: {uid: 0}\n",
            3,
            "ATT&CK",
        ),
        (
            "rules:\n  - id: x\n    enabled: maybe\n    condition: {uid: 0}\n",
            3,
            "true or false",
        ),
        (
            "rules:\n  - id: x\n    colour: red\n    condition: {uid: 0}\n",
            3,
            "unknown key",
        ),
        ("rulez: []\n", 1, "unknown section 'rulez'"),
        ("lists:\n  l: []\n", 2, "non-empty list"),
        (
            "rules:\n  - id: x\n    condition: {uid: 0}\n"
            "  - id: x\n    condition: {uid: 1}\n",
            4,
            "already used",
        ),
        ("rules: [\n", 2, "not valid YAML"),
        (
            "rules:\n  - id: x\n    condition:\n      exe: {regex: 'a{1001}'}\n",
            4,
            "RE2",
        ),
    ],
)
def test_ruleset_bad_file_is_refused_with_file_line_reason(tmp_path, text, line, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RuleError) as info:
        load_rules([path])
    error = info.value
    assert isinstance(error, ImmuneError)
    assert (error.file, error.line) == (str(path), line)
    assert words in error.reason


def test_ruleset_yaml_boolean_id_gets_a_hint():
    with pytest.raises(RuleError, match="quote it"):
        ruleset("rules:\n  - id: off\n    condition: {uid: 0}\n")


def test_ruleset_missing_path_is_refused(tmp_path):
    with pytest.raises(RuleError, match="no such file"):
        load_rules([tmp_path / "nowhere.yaml"])


def test_ruleset_lenient_load_keeps_good_files_and_lists_bad_ones(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text("rules:\n  - id: b\n    condition: {nope: 1}\n")
    rules = load_rules([tmp_path], strict=False)
    assert "root-shell" in rules.rules
    assert "b" not in rules.rules
    assert [(e.file, e.line) for e in rules.errors] == [(str(tmp_path / "b.yaml"), 3)]


def test_ruleset_refused_file_falls_back_to_its_previous_text(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    first = load_rules([path])
    path.write_text("rules: [oops\n")
    second = load_rules([path], strict=False, fallback=first.texts)
    assert len(second.errors) == 1
    assert "root-shell" in second.rules  # the running rules keep running


def test_ruleset_later_file_uses_earlier_lists_and_macros(tmp_path):
    (tmp_path / "1.yaml").write_text(GOOD)
    (tmp_path / "2.yaml").write_text(
        "rules:\n  - id: shell-any\n    condition: {macro: shell}\n"
    )
    rules = load_rules([tmp_path])
    assert rules.rules["shell-any"].matches(ev(exe="/bin/bash"))


def test_default_rules_load_and_their_own_tests_pass():
    rules = load_rules([], defaults=True)
    assert {
        "exec-from-temp-dir",
        "reverse-shell-cmdline",
        "connect-to-blocked-port",
        "credential-file-read",
        "ssh-key-read",
        "setuid-to-root",
        "privileged-port-bind-by-non-root",
    } <= set(rules.rules)
    assert {
        "lateral-movement",
        "exfiltration",
        "chain-reverse-shell",
        "chain-credential-harvest",
    } == set(rules.correlations)
    assert all(r.techniques for r in rules.rules.values())
    results = run_rule_tests(rules)
    assert len(results) >= 25
    assert [r.where for r in results if not r.ok] == []


def test_default_dir_is_in_the_package():
    assert Path(DEFAULT_DIR, "10-host.yaml").is_file()


def test_rule_tests_report_a_failing_expectation():
    rules = ruleset(
        """\
        rules:
          - id: t
            condition: {kind: exec, exe: /x}
            tests:
              - event: {kind: exec, exe: /x}
                expect: false
              - event: {kind: exec, exe: /x}
              - event: {kind: exec, pid: nope}
        """
    )
    results = run_rule_tests(rules)
    assert [(r.line, r.ok) for r in results] == [(5, False), (7, True), (8, False)]
    assert "bad test event" in (results[2].error or "")
