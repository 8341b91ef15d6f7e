"""The configuration reference (``docs/configuration.md``), rendered from the config dataclasses.

Each setting's help is the comment the dataclass already carries: the comment lines right above
the field and the comment at the end of its line (``max_length: int = 1024  # prompt + completion
tokens``). A section's help is its class docstring. Defaults are read from the dataclasses
themselves, and a stage whose section defaults differ from the section's (``sft``'s
``train.lr``) says so, so the page cannot drift from the code: ``tests/test_docs.py`` fails when
the committed page differs from what this module renders, or when a field has no help.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import tokenize
from collections.abc import Mapping
from typing import Any


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its help: the comment lines right above the field, then its line's own comment."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(token.start[0])
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef), cls
    found = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and line not in code_lines:
            above.insert(0, comments[line])
            line -= 1
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n in code_lines]
        found[node.target.id] = " ".join(above + own).strip()
    return found


def type_text(annotation: Any) -> str:
    """An annotation as a reader writes it in YAML terms: ``Literal["a", "b"]`` as ``"a" | "b"``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return text

    def show(node: ast.expr) -> str:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return f"{show(node.left)} | {show(node.right)}"
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Literal":
            values = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return " | ".join(json.dumps(ast.literal_eval(v)) for v in values)
        if isinstance(node, ast.Constant) and node.value is None:
            return "null"
        return ast.unparse(node)

    return show(tree)


def default_text(value: Any) -> str:
    """A default as it would be written in a YAML file (JSON is YAML)."""
    if value is dataclasses.MISSING:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(a section)"
    return json.dumps(value, ensure_ascii=False)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value, whether given directly or by a factory."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def settings(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every setting of a section, nested sections flattened: ``(dotted key, type, default, help)``."""
    helps, rows = field_help(cls), []
    for f in dataclasses.fields(cls):
        default = default_of(f)
        if dataclasses.is_dataclass(default):
            rows.extend(settings(type(default), f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, type_text(f.type), default_text(default), helps.get(f.name, "")))
    return rows


def sections(stages: Mapping[str, type]) -> list[tuple[str, type, list[str]]]:
    """``(section name, its class, the stages that have it)``, in the order the stages first name them."""
    found: dict[tuple[str, type], list[str]] = {}
    for stage, cls in stages.items():
        for f in dataclasses.fields(cls):
            found.setdefault((f.name, type(default_of(f))), []).append(stage)
    return [(name, section_cls, used_by) for (name, section_cls), used_by in found.items()]


def stage_overrides(cls: type) -> list[str]:
    """The section defaults that ``cls`` (a stage's config) sets away from the section's own, as ``key: value``."""
    changed = []
    for f in dataclasses.fields(cls):
        given = default_of(f)
        for key, _, text, _ in settings(type(given)):
            value = given
            for part in key.split("."):
                value = getattr(value, part)
            if default_text(value) != text:
                changed.append(f"`{f.name}.{key}: {default_text(value)}` (the section's default: `{text}`)")
    return changed


def _docstring(cls: type) -> str:
    return " ".join(line.strip() for line in inspect.cleandoc(cls.__doc__ or "").splitlines() if line.strip())


def render(stages: Mapping[str, type]) -> str:
    """The reference as Markdown: the stages and their sections, then every section's settings."""
    found = sections(stages)
    headings = {(name, cls): f"`{name}`: `{cls.__name__}` ({', '.join(used_by)})" for name, cls, used_by in found}
    lines = ["## The stages and their sections", ""]
    for stage, cls in stages.items():
        names = ", ".join(f"[`{f.name}`](#{slug(headings[f.name, type(default_of(f))])})" for f in dataclasses.fields(cls))
        doc = _docstring(cls).removeprefix(f"`preftune {stage}`: ")
        lines.append(f"- **`preftune {stage}`** (`{cls.__name__}`): {doc} Sections: {names}.")
        lines.extend(f"  - differs from the section: {change}" for change in stage_overrides(cls))
    for name, section_cls, _ in found:
        lines += ["", f"## {headings[name, section_cls]}", "", _docstring(section_cls), ""]
        for key, kind, default, text in settings(section_cls):
            lines.append(f"- `{name}.{key}` (`{kind}`, default `{default}`)" + (f": {text}" if text else ""))
    return "\n".join(lines) + "\n"


def slug(heading: str) -> str:
    """The anchor GitHub and GitLab give a heading: lower case, punctuation dropped, spaces as hyphens."""
    kept = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def missing_help(stages: Mapping[str, type]) -> list[str]:
    """Every setting whose field carries no comment (the reference would show it without help)."""
    return [f"{name}.{key}" for name, section_cls, _ in sections(stages) for key, _, _, text in settings(section_cls) if not text]
