"""Every relative Markdown link in README.md and docs/**/*.md resolves: the file (or directory)
exists, and a ``#anchor`` names a heading of the target (GitHub's slug rules)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
INLINE = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with inline code spans blanked."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            marker = m.group(1)
            if fence is None:
                fence = marker[0] * 3
            elif marker.startswith(fence):
                fence = None
            continue
        if fence is None:
            out.append((n, re.sub(r"`[^`]*`", lambda s: " " * len(s.group(0)), line)))
    return out


def slug(heading: str) -> str:
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.replace("`", "").strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    found: set[str] = set()
    fence: str | None = None
    for line in path.read_text().splitlines():
        m = FENCE.match(line)
        if m:
            fence = None if fence else m.group(1)[0] * 3
            continue
        h = HEADING.match(line) if fence is None else None
        if h:
            base = slug(h.group(2))
            found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    result: list[tuple[int, str]] = []
    for n, line in prose_lines(path.read_text()):
        result.extend((n, m.group(1)) for m in INLINE.finditer(line))
        ref = REFERENCE.match(line)
        if ref:
            result.append((n, ref.group(1)))
    return result


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems: list[str] = []
    for n, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{n}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_docs_index_links_every_page() -> None:
    index = ROOT / "docs" / "index.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index)}
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md")} - {index.resolve()}
    assert sorted(str(p.relative_to(ROOT)) for p in pages - linked) == []


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Real `heading` — here\n\n## Twice\n\n## Twice\n")
    doc.write_text(
        "[ok](b.md#real-heading--here) [dup](b.md#twice-1) [ext](https://x/y)\n"
        "[gone](missing.md) [bad](b.md#nope)\n```\n[in code](nothing.md)\n```\n"
        "`[span](nothing.md)`\n[ref]: other.md\n"
    )
    problems = broken_links(doc, tmp_path)
    assert problems == [
        "a.md:2: missing.md: no such file",
        "a.md:2: b.md#nope: no heading #nope in b.md",
        "a.md:7: other.md: no such file",
    ]
