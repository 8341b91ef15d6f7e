"""docs/ and the README: the generated parts say what the code does, every setting is documented,
every local link resolves, the README stays short, and the guarantees name tests that exist."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Literal

import pytest

from conftest import REPO
from preftune.config.typed import to_dict
from preftune.docs import BEGIN, END, PAGES, main, stage_configs, stale
from preftune.docs.configuration import field_help, missing_help, render, settings, slug, type_text

DOCS = REPO / "docs"
PAGES_READ = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def test_the_generated_parts_are_what_the_code_renders() -> None:
    assert stale(DOCS) == [], "a page in docs/ is stale: run `python -m preftune.docs`"


def _keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        nested = isinstance(value, dict) and key not in ("columns", "data_files")
        keys.extend(_keys(value, f"{prefix}{key}.") if nested else [prefix + key])
    return keys


def test_every_setting_of_every_stage_is_in_the_configuration_reference() -> None:
    """Read from the configs as a YAML file would hold them, not from the generator's own walk."""
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for stage, cls in stage_configs().items():
        for key in _keys(to_dict(cls())):
            assert f"- `{key}` (" in page, f"{stage}: {key} is not in docs/configuration.md"


def test_every_setting_has_help_text() -> None:
    assert missing_help(stage_configs()) == [], "give each of these fields a comment: it is the reference's help text"


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    return [a or b for a, b in LINK.findall(text)]


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(line.lstrip("#").strip()) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES_READ, ids=lambda p: str(p.relative_to(REPO)))
def test_every_local_link_resolves(page: Path) -> None:
    """A link to a file of the repository names one that exists; a link to a heading names one that exists."""
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        missing_heading = resolved.exists() and anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)
        if not resolved.exists() or missing_heading:
            broken.append(target)
    assert broken == [], f"{page.relative_to(REPO)}: links that go nowhere: {broken}"


def test_the_link_check_sees_links_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title here\n\n[x](b.md) [y](#title-here) ![img](c.png) [z](#nope)\n```\n[not](a link)\n```\n")
    assert _links(tmp_path / "a.md") == ["b.md", "#title-here", "c.png", "#nope"]
    assert _anchors(tmp_path / "a.md") == {"title-here"}
    assert slug("`loss`: `RMLossConfig` (rm)") == "loss-rmlossconfig-rm"


def test_the_readme_is_at_most_250_lines_and_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        assert page.name == "README.md" or f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


def test_the_guarantees_name_tests_that_exist() -> None:
    page = (DOCS / "guarantees.md").read_text(encoding="utf-8")
    sources = "".join(path.read_text(encoding="utf-8") for path in (REPO / "tests").glob("test_*.py"))
    named = set(re.findall(r"`(test_\w+)`", page))
    assert len(named) > 40
    assert sorted(name for name in named if f"def {name}(" not in sources) == []


@dataclasses.dataclass
class _Section:
    """A section for the test."""

    # the comment above
    # spans two lines
    mode: Literal["a", "b"] = "a"  # and the line's own
    size: int | None = None
    names: list[str] = dataclasses.field(default_factory=lambda: ["x"])  # a list


def test_the_reference_takes_help_from_comments_and_types_as_yaml_writes_them() -> None:
    assert field_help(_Section) == {"mode": "the comment above spans two lines and the line's own", "size": "", "names": "a list"}
    assert type_text('Literal["a", "b"]') == '"a" | "b"' and type_text("bool | Literal['auto']") == 'bool | "auto"'
    assert settings(_Section) == [("mode", '"a" | "b"', '"a"', "the comment above spans two lines and the line's own"),
                                  ("size", "int | null", "null", ""), ("names", "list[str]", '["x"]', "a list")]
    assert missing_help({"demo": _Wrapper}) == ["part.size"]
    assert "- `part.mode` (`\"a\" | \"b\"`, default `\"a\"`): the comment above" in render({"demo": _Wrapper})


@dataclasses.dataclass
class _Wrapper:
    """`preftune demo`: a stage for the test."""

    part: _Section = dataclasses.field(default_factory=lambda: _Section(size=3))  # a section


def test_a_stage_default_that_differs_from_its_sections_is_said() -> None:
    assert "`part.size: 3` (the section's default: `null`)" in render({"demo": _Wrapper})


def test_the_command_rewrites_a_stale_page_and_check_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    page = docs / "configuration.md"
    page.write_text(page.read_text(encoding="utf-8").replace("- `train.lr`", "- `train.learning_rate`"), encoding="utf-8")
    assert main(["--docs", str(docs), "--check"]) == 1
    assert "configuration.md is stale" in capsys.readouterr().err
    assert main(["--docs", str(docs)]) == 0
    assert main(["--docs", str(docs), "--check"]) == 0
    assert page.read_text(encoding="utf-8") == (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert set(PAGES) <= {p.name for p in DOCS.glob("*.md")}
    assert all(BEGIN in (DOCS / name).read_text(encoding="utf-8") and END in (DOCS / name).read_text(encoding="utf-8") for name in PAGES)
