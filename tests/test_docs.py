"""The README and docs/ cite results that exist and link to files and headings that exist; the README stays short.

Code and recipes point at the docs too: a comment or message naming ``docs/<page>.md`` names a page that exists,
and one naming a section (``docs/results.md "Quickstart results"``, ``README "Set-up"``) names a heading there.
"""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 320

# Cited before they exist, on purpose (the page says they are being produced). Drop an entry once its files land.
PENDING: set[str] = set()  # cited results files not produced yet (none now)

_RESULT = re.compile(r"benchmarks/results/(?:[\w.*\-/]|\{[\w.,\-]*\})+")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)
# where code and recipes cite the docs: docs/<page>.md, optionally followed by a quoted section heading
_CODE_FILES = ("dsnet/**/*.py", "scripts/**/*.py", "benchmarks/**/*.py", "benchmarks/**/*.sh", "configs/*.yaml")
_PAGE_CITE = re.compile(r"\b(docs/[\w\-]+\.md|README(?:\.md)?|BENCHMARKS\.md)(?:\s+\"([^\"\n]+)\")?")


def _expand(pattern: str) -> list[str]:
    """Brace expansion, as a shell does: a{b,c}d -> abd, acd (nested and repeated braces too)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [p for part in m.group(1).split(",") for p in _expand(head + part + tail)]


def cited_results(text: str) -> list[str]:
    """Every ``benchmarks/results/...`` path or pattern the text cites (trailing sentence punctuation dropped)."""
    return sorted({m.group(0).rstrip(".") for m in _RESULT.finditer(text)})


def missing_results(cited: list[str], root: Path = ROOT) -> list[str]:
    """The cited paths (globs and brace patterns allowed) that match no file under ``root``."""
    missing = []
    for path in cited:
        if path in PENDING:
            continue
        for candidate in _expand(path):
            if not [p for p in root.glob(candidate) if p.is_file()]:
                missing.append(candidate)
    return missing


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings (outside code blocks), with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    for line in _FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            s = slug(m.group(1))
            seen[s] = seen.get(s, -1) + 1
            if seen[s]:
                seen[f"{s}-{seen[s]}"] = 0
    return set(seen)


def broken_links(text: str, page: Path) -> list[str]:
    """Relative links (outside code blocks) whose file does not exist, or whose ``#anchor`` names no heading there."""
    broken = []
    for m in _LINK.finditer(_FENCE.sub("", text)):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(target)
    return broken


def heading_texts(text: str) -> list[str]:
    """A page's headings (outside code blocks) as written, without the ``#`` marks and backticks."""
    lines = _FENCE.sub("", text).splitlines()
    return [m.group(1).replace("`", "").strip() for line in lines if (m := re.match(r"#{1,6}\s+(.*)", line))]


def broken_doc_citations(text: str, root: Path = ROOT) -> list[str]:
    """Citations of the docs in code whose page does not exist or whose quoted section starts no heading there.

    ``BENCHMARKS.md`` is a pointer stub (the record moved to docs/benchmarks.md), so citing it counts as broken.
    """
    broken = []
    for m in _PAGE_CITE.finditer(text):
        page, section = m.group(1), m.group(2)
        if page == "BENCHMARKS.md":
            broken.append(m.group(0))
            continue
        file = root / ("README.md" if page.startswith("README") else page)
        if not file.is_file():
            broken.append(m.group(0))
        elif section and not any(h.startswith(section) for h in heading_texts(file.read_text())):
            broken.append(m.group(0))
    return broken


def test_code_cites_doc_pages_and_sections_that_exist():
    files = sorted({f for pattern in _CODE_FILES for f in ROOT.glob(pattern) if f.is_file()})
    assert files
    problems = {str(f.relative_to(ROOT)): broken_doc_citations(f.read_text()) for f in files}
    assert not {k: v for k, v in problems.items() if v}


def test_every_cited_results_file_exists():
    problems = {p.name: missing_results(cited_results(p.read_text())) for p in PAGES}
    assert not {k: v for k, v in problems.items() if v}


def test_every_relative_link_resolves():
    problems = {p.name: broken_links(p.read_text(), p) for p in PAGES}
    assert not {k: v for k, v in problems.items() if v}


def test_readme_is_a_short_guide():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the research record belongs in docs/"


def test_the_checks_catch_what_they_should(tmp_path):
    (tmp_path / "benchmarks/results").mkdir(parents=True)
    (tmp_path / "benchmarks/results/run_seed0.json").write_text("{}")
    (tmp_path / "benchmarks/results/run_seed1.json").write_text("{}")
    text = (
        "Seeds in `benchmarks/results/run_seed{0,1}.json`, all: benchmarks/results/run_*.json. "
        "A made-up one: `benchmarks/results/no_such_result.json`, and a seed that was never run: "
        "benchmarks/results/run_seed{1,2}.json.\n"
    )
    assert cited_results(text) == [
        "benchmarks/results/no_such_result.json",
        "benchmarks/results/run_*.json",
        "benchmarks/results/run_seed{0,1}.json",
        "benchmarks/results/run_seed{1,2}.json",
    ]
    assert missing_results(cited_results(text), tmp_path) == [
        "benchmarks/results/no_such_result.json",
        "benchmarks/results/run_seed2.json",
    ]
    page = tmp_path / "page.md"
    other = tmp_path / "other.md"
    other.write_text("# Other page\n\n## The `dsnet compare` part\n\n```\n# not a heading\n```\n")
    page.write_text(
        "# Page\n\n## Set-up\n\n[ok](#set-up) [ok](other.md#the-dsnet-compare-part) [ok](other.md) "
        "[web](https://example.org/x.md) ![figure](missing.png) [bad anchor](#nowhere) "
        "[bad file](docs/nothing.md) [bad anchor there](other.md#not-a-heading)\n"
        "```\n[in code](not/checked.md)\n```\n"
    )
    assert broken_links(page.read_text(), page) == [
        "missing.png",
        "#nowhere",
        "docs/nothing.md",
        "other.md#not-a-heading",
    ]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/results.md").write_text("# Results\n\n## Quickstart results\n\n### The `dsnet compare` part\n")
    (tmp_path / "README.md").write_text("# Tool\n\n## Set-up\n")
    code = (
        '# see docs/results.md "Quickstart results", docs/results.md "The dsnet compare" and docs/results.md;\n'
        '# README "Set-up", README.md; stale: README "Quickstart results", docs/results.md "Nowhere",\n'
        "# docs/nothing.md and BENCHMARKS.md\n"
    )
    assert broken_doc_citations(code, tmp_path) == [
        'README "Quickstart results"',
        'docs/results.md "Nowhere"',
        "docs/nothing.md",
        "BENCHMARKS.md",
    ]
