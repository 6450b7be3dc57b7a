"""Every guide comes in English and Chinese: docs/X.md has docs/X.zh.md with the same commands, and the
Chinese guides link to the Chinese twins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_docs_commands import FENCE, bash_commands, strip_comment

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = sorted(p for p in DOCS.glob("*.md") if not p.name.endswith(".zh.md"))
LINK = re.compile(r"\]\(([\w.-]+)\.md(#[^)]*)?\)")


def commands(path: Path) -> list[str]:
    """Every fenced command (bash, bash-gpu and text blocks that hold diyllm/torchrun lines)."""
    text = path.read_text(encoding="utf-8")
    runnable = [strip_comment(c) for c in bash_commands(text)]
    other = [strip_comment(line.strip()) for lang, body in FENCE.findall(text) if lang == "bash-gpu"
             for line in body.replace("\\\n", " ").splitlines() if line.strip() and not line.strip().startswith("#")]
    return sorted(runnable + other)


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_guide_has_a_chinese_twin_with_the_same_commands(guide: Path):
    twin = guide.with_name(guide.stem + ".zh.md")
    assert twin.is_file(), f"{guide.name} has no Chinese edition {twin.name}"
    en, zh = commands(guide), commands(twin)
    assert en == zh, (f"{guide.name} and {twin.name} differ in their commands: only in English "
                      f"{sorted(set(en) - set(zh))}, only in Chinese {sorted(set(zh) - set(en))}")
    assert re.search(r"[\u4e00-\u9fff]", twin.read_text(encoding="utf-8")), f"{twin.name} is not in Chinese"


@pytest.mark.parametrize("twin", sorted(DOCS.glob("*.zh.md")), ids=lambda p: p.name)
def test_chinese_guides_link_to_chinese_guides(twin: Path):
    for name, _ in LINK.findall(twin.read_text(encoding="utf-8")):
        if name.endswith(".zh"):
            assert (DOCS / f"{name}.md").is_file(), f"{twin.name} links to missing {name}.md"
        elif (DOCS / f"{name}.zh.md").is_file() and twin.stem != f"{name}.zh":
            raise AssertionError(f"{twin.name} links to {name}.md; link the Chinese edition {name}.zh.md")
