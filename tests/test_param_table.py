"""README's "OpenAI API parameters" table against the request bodies the gateway declares: one
row per parameter, each marked "yes" exactly for the endpoints whose body has it, so neither can
change without the other."""
from __future__ import annotations

import re
from pathlib import Path

from hydraserve.gateway.openai_api import ChatBody, CompletionBody

README = Path(__file__).resolve().parent.parent / "README.md"
HEADER = ["parameter", "/v1/completions", "/v1/chat/completions", "meaning"]


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a markdown text (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def table(text: str) -> list[list[str]]:
    """The first markdown table in ``text``: its rows of cells, the header first, without the
    |---| line."""
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif started:
            break
    return rows


def test_table_reader():
    text = "x\n| a | b |\n|---|---|\n| `c` | d |\n\nafter\n| e | f |\n"
    assert table(text) == [["a", "b"], ["`c`", "d"]]
    assert section("# t\n## A\none\n## B\ntwo\n", "A") == "one\n"


def test_readme_table_is_the_declared_parameters():
    rows = table(section(README.read_text(encoding="utf-8"), "OpenAI API parameters"))
    assert rows and rows[0] == HEADER, rows[:1]
    found = {}
    for row in rows[1:]:
        assert len(row) == 4 and row[3], f"a row needs 4 cells and a meaning: {row}"
        name = row[0].strip("`")
        assert name not in found, f"{name} is in the table twice"
        assert row[1] in ("yes", "-") and row[2] in ("yes", "-"), row
        found[name] = (row[1] == "yes", row[2] == "yes")
    declared = {name: (name in CompletionBody.model_fields, name in ChatBody.model_fields)
                for name in {**CompletionBody.model_fields, **ChatBody.model_fields}}
    assert set(found) == set(declared), (
        f"in the table, not declared: {sorted(set(found) - set(declared))}; "
        f"declared, not in the table: {sorted(set(declared) - set(found))}")
    wrong = {n: found[n] for n in declared if found[n] != declared[n]}
    assert not wrong, f"endpoints marked wrongly ((completions, chat) should be): " \
        f"{ {n: declared[n] for n in wrong} }"
