"""The README's results table is bench/results/headline.json, and every number in it is its raw file's."""

import json

from conftest import REPO

RESULTS = REPO / "bench" / "results"
HEADLINE = json.loads((RESULTS / "headline.json").read_text())


def render(headline: dict) -> str:
    """The Markdown table, as the README holds it."""
    rows = [headline["columns"], ["---"] * len(headline["columns"])] + [r["cells"] for r in headline["rows"]]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows).replace("|  |", "| |") + "\n"


def value_at(source: dict):
    """The number at ``path`` in a raw results file (a .jsonl file is a list of its lines)."""
    text = (RESULTS / source["file"]).read_text()
    data = [json.loads(ln) for ln in text.splitlines() if ln.strip()] if source["file"].endswith(".jsonl") else json.loads(text)
    for key in source["path"]:
        data = data[key]
    return data


def shown_as(value: float, shown: str) -> str:
    """``value`` written the way ``shown`` is: a percentage, a multiple (x) or a plain number, same decimals."""
    number = shown.rstrip("%x").replace(",", "")
    decimals = len(number.partition(".")[2])
    if shown.endswith("%"):
        return f"{100 * value:.{decimals}f}%"
    return f"{value:,.{decimals}f}{'x' if shown.endswith('x') else ''}"


def test_readme_holds_the_headline_table():
    assert render(HEADLINE) in (REPO / "README.md").read_text(), (
        "the README's results table differs from bench/results/headline.json; change the JSON, then paste:\n"
        + render(HEADLINE))


def test_every_number_is_its_raw_files_and_appears_in_its_row():
    checked = 0
    for row in HEADLINE["rows"]:
        for source in row.get("sources", []):
            assert shown_as(value_at(source), source["shown"]) == source["shown"], source
            assert any(source["shown"] in cell for cell in row["cells"][1:]), (source, row["cells"])
            checked += 1
    assert checked >= 15


def test_shown_as_rounds_like_the_table():
    assert shown_as(0.99655, "99.66%") == "99.66%" and shown_as(2.0174, "2.02x") == "2.02x"
    assert shown_as(228.66, "229") == "229" and shown_as(0.991, "99.1%") == "99.1%"
