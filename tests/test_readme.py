"""The README a newcomer reads in five minutes, its figures held to the committed run, and the docs'
links.

Why: a README drifts from the run it describes one edit at a time; the figures it states and the
pages it points to are checked here against the files they come from.
"""

import json
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))


def prose_sentences(markdown: str) -> list[str]:
    """Sentences of the prose: code blocks, tables, headings and images left out; a list item is a
    paragraph of its own."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)
    paragraphs, current = [], []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("|", "#")):
            paragraphs.append(" ".join(current))
            current = []
            continue
        if re.match(r"\s*(- |\d+\. )", line) and current:
            paragraphs.append(" ".join(current))
            current = []
        current.append(re.sub(r"^\s*(- |\d+\. )", "", line).strip())
    paragraphs.append(" ".join(current))
    return [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`*\[])", p) if s.strip()]


def test_prose_sentences_split_paragraphs_list_items_and_sentences():
    doc = "# T\n\nOne two. Three four five.\n- item one\n  goes on.\n\n| a | b |\n```\nx. Y.\n```\n"
    assert [len(s.split()) for s in prose_sentences(doc)] == [2, 3, 4]


def test_the_readme_reads_in_five_minutes():
    text = README.read_text()
    words = [len(s.split()) for s in prose_sentences(text)]
    assert len(text.splitlines()) <= 150
    assert len(text.split()) <= 1300
    assert max(words) <= 40, [s for s in prose_sentences(text) if len(s.split()) > 40]
    assert sum(words) / len(words) <= 20


def _seconds(figure: str) -> float:
    m = re.fullmatch(r"(?:(\d+) min )?(\d+) s", figure)
    assert m, figure
    return 60 * int(m.group(1) or 0) + int(m.group(2))


def test_the_readmes_make_repro_time_agrees_with_the_committed_runs_runtime_files():
    """The stated INC check within 2x of the committed runtime file; the whole run at least as long
    as the stages the runtime files time; a fresh clone's run at least setup plus those stages but
    crosscheck (DVC keeps its git-tracked result), and with crosscheck rerun, at least all of them."""
    rows = [line for line in README.read_text().splitlines() if line.startswith("| ")]

    def time_of(prefix: str) -> int:
        row = next(line for line in rows if line.startswith(prefix))
        return _seconds(row.rstrip(" |").rsplit("|", 1)[1].strip())

    row = next(line for line in rows if line.startswith("| `make repro` after setup"))
    stated_inc = float(re.search(r"INC's check in `crosscheck`: (\d+) s", row).group(1))
    runtime = REPO / "reports/runtime"
    inc = next(
        p for p in json.loads((runtime / "crosscheck.json").read_text())["passes"] if p["engine"] == "inc"
    )
    recorded_inc = sum(inc["seconds"].values())
    recorded = sum(json.loads(p.read_text())["seconds"] for p in runtime.rglob("*.json"))
    assert recorded_inc / 2 <= stated_inc <= 2 * recorded_inc
    assert time_of("| `make repro` after setup") >= recorded
    kept = json.loads((runtime / "crosscheck.json").read_text())["seconds"]
    assert time_of("| `make repro` from a fresh clone") >= time_of("| setup") + recorded - kept
    assert time_of("| the same fresh clone on an AVX2 CPU") >= time_of("| setup") + recorded


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page: Path):
    for target in LINK.findall(page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest.read_text()), f"{page.name}: link to {target}: no such heading"
