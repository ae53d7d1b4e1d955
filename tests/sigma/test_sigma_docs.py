"""docs/sigma.md against the code: the field tables and the examples."""

from __future__ import annotations

import re
import tomllib

import pytest
from sigma_helpers import REPO

from immune.sigma.fields import CATEGORY_KINDS, FIELDS, SIGMA_FIELDS

DOC = (REPO / "docs" / "sigma.md").read_text(encoding="utf-8")


def section(source: str) -> str:
    start = DOC.index(f"### {source}\n")
    end = DOC.find("\n### ", start + 1)
    return DOC[start : end if end != -1 else None]


@pytest.mark.parametrize("source", sorted(SIGMA_FIELDS))
def test_sigma_doc_tables_match_the_mapping(source: str) -> None:
    text = section(source)
    rows = dict(re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", text, re.MULTILINE))
    expected = {
        name: target
        for name, target in SIGMA_FIELDS[source].items()
        if not re.fullmatch(r"a\d+", name)
    }
    if len(expected) != len(SIGMA_FIELDS[source]):
        # The arguments are one row.
        assert "a63" in SIGMA_FIELDS[source] and "a64" not in SIGMA_FIELDS[source]
        assert "| `a0` … `a63` | `argv.0` … `argv.63` |" in text
    assert rows == expected
    for target in expected.values():
        if target in FIELDS:
            assert FIELDS[target].doc in text
    for kind in CATEGORY_KINDS.get(source, ()):
        assert f"`{kind}`" in text


def test_sigma_doc_toml_examples_parse() -> None:
    blocks = re.findall(r"^```toml\n(.*?)^```$", DOC, re.MULTILINE | re.DOTALL)
    assert blocks
    for body in blocks:
        assert "rule_dirs" in tomllib.loads(body)["plugins"]["sigma"]
