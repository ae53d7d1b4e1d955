"""``immune sigma check``: loaded and refused rules, as a rule author sees them."""

from __future__ import annotations

from pathlib import Path

import orjson
from sigma_helpers import BAD, RULES

from clirun import run_immune as immune


def test_sigma_check_lists_loaded_rules_and_correlations(tmp_path: Path) -> None:
    result = immune("sigma", "check", "--json", str(RULES), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert {row["status"] for row in rows} == {"loaded"}
    by_id = {row["id"]: row for row in rows}
    assert by_id["0b6f7a52-1c3e-4d7a-9f21-6a1d2c3b4e04"]["kinds"] == ["connect", "bind"]
    assert by_id["0b6f7a52-1c3e-4d7a-9f21-6a1d2c3b4e13"]["kinds"] == [
        "correlation:temporal_ordered"
    ]
    assert "7 rules and 3 correlations loaded, 0 refused, from 7 files." in (
        " ".join(result.stderr.split())
    )


def test_sigma_check_reports_each_refusal_and_strict_fails(tmp_path: Path) -> None:
    result = immune("sigma", "check", "--json", "--refused", str(BAD), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    reasons = {Path(row["file"]).name: row["reason"] for row in rows}
    assert "product 'windows'" in reasons["windows_only.yml"]
    assert "field 'Hashes'" in reasons["unmapped_field.yml"]
    assert all(row["status"] == "refused" for row in rows)

    strict = immune("sigma", "check", "--strict", str(BAD), cwd=tmp_path)
    assert strict.returncode == 1
    assert "unmapped_field.yml" in strict.stdout


def test_sigma_check_missing_path_is_one_red_line(tmp_path: Path) -> None:
    result = immune("sigma", "check", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
