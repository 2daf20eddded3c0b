"""The documentation holds together: every relative link lands on a file and a heading, and the README stays a
front door a newcomer can read (set-up, the main job and their own data near the top, the rest linked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

# The pages a reader follows links through. EXPERIMENTS.md and BENCHMARKS.md open with tables of contents.
PAGES = sorted([REPO / "README.md", REPO / "EXPERIMENTS.md", REPO / "BENCHMARKS.md", REPO / "examples" / "README.md",
                *(REPO / "docs").glob("*.md")])

README_MAX_BYTES = 16_000
README_TOP_LINES = 120

_LINK = re.compile(r"(?<!!)\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")


def github_slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page's headings make; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _FENCE.sub("", page.read_text()), re.M):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    """The link targets of a page outside code, but web addresses and mail."""
    text = _CODE.sub("", _FENCE.sub("", page.read_text()))
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(page: Path) -> list[str]:
    """Each relative link of the page whose file does not exist, or whose #anchor is no heading there."""
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_of_a_page_reaches_a_file_and_heading(page):
    assert broken_links(page) == []


def test_a_link_to_a_missing_file_is_found_broken(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [the guide](docs/missing.md).\n")
    assert broken_links(page) == [f"docs/missing.md: no file {tmp_path / 'docs' / 'missing.md'}"]


def test_a_link_to_a_missing_heading_is_found_broken(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## How fast is it?\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[fine](other.md#how-fast-is-it) [broken](other.md#how-slow-is-it) "
                    "[here](#title) [not here](#nowhere)\n")
    assert broken_links(page) == ["other.md#how-slow-is-it: no heading #how-slow-is-it in other.md",
                                  "#nowhere: no heading #nowhere in page.md"]


def test_links_in_code_and_to_the_web_are_not_checked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# T\n\n`[a](missing.md)`\n\n```\n[b](missing.md)\n```\n\n[web](https://example.org/x.md)\n")
    assert broken_links(page) == []


def test_headings_make_github_anchors():
    assert github_slug("What does `make demo` get, and how much does it move between runs?") == \
        "what-does-make-demo-get-and-how-much-does-it-move-between-runs"
    assert github_slug("How fast does isara train, against trl and transformers' Trainer?") == \
        "how-fast-does-isara-train-against-trl-and-transformers-trainer"
    assert github_slug("`isara models pull`") == "isara-models-pull"


def test_the_readme_is_at_most_16_kb():
    assert (REPO / "README.md").stat().st_size <= README_MAX_BYTES


def test_the_readme_shows_set_up_the_main_job_and_your_own_data_in_its_first_120_lines():
    top = "\n".join((REPO / "README.md").read_text().splitlines()[:README_TOP_LINES])
    for words in ("make demo", "make test", "seeds", "Your own data"):
        assert words in top, words
