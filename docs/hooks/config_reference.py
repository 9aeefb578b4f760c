"""The configuration reference, generated from the pydantic models in ``starlora/config.py``.

A page holding ``<!-- config-reference -->`` gets a table per section; ``<!-- config-reference:
task -->`` gets the table of one section. Each row is a field of the model: its key, type,
default, bounds and the comment written beside or above it in ``config.py``. Nothing is
copied by hand, so the reference cannot drift from the code.

Used as an mkdocs hook (``hooks:`` in ``mkdocs.yml``) and by ``tests/test_docs.py``;
``python docs/hooks/config_reference.py`` prints the whole reference.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"
MARKER = re.compile(r"<!-- config-reference(?::\s*([a-z_]+))?\s*-->")


def _config_module() -> Any:
    if str(SRC) not in sys.path:  # the checkout's code, installed or not
        sys.path.insert(0, str(SRC))
    from starlora import config

    return config


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """``{(class name, field name): comment}`` for every annotated field of every class in
    `source`: the comment lines directly above the field (no blank line between) followed by
    the comment at the end of the field's own line(s)."""
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whole line is a comment)
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            own_line = not lines[row - 1][:col].strip()
            comments[row] = (tok.string.lstrip("#").strip(), own_line)
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            row = stmt.lineno - 1
            while row in comments and comments[row][1]:
                above.insert(0, comments[row][0])
                row -= 1
            after = [comments[r][0] for r in range(stmt.lineno, (stmt.end_lineno or 0) + 1)
                     if r in comments and not comments[r][1]]
            text = " ".join(above + after).strip()
            if text:
                out[(node.name, stmt.target.id)] = text
    return out


def _type(annotation: Any) -> str:
    """`annotation` as a reader would write it: ``int | None``, ``'auto' | 'no'``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (not value.strip() or value != value.strip()):
        return f'`"{value}"`'
    return f"`{value}`"


def _bounds(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def section_table(name: str) -> str:
    """The Markdown table of one section (``seed`` for the top-level field)."""
    config = _config_module()
    comments = field_comments(Path(config.__file__).read_text(encoding="utf-8"))
    top = config.ExperimentConfig
    if name == "seed":
        cls, fields, prefix = top, {"seed": top.model_fields["seed"]}, ""
    else:
        cls = top.model_fields[name].annotation
        fields, prefix = cls.model_fields, f"{name}."
    rows = ["| key | type | default | bounds | what it sets |", "|---|---|---|---|---|"]
    for key, field in fields.items():
        note = field.description or comments.get((cls.__name__, key), "")
        rows.append(f"| `{prefix}{key}` | {_type(field.annotation)} | {_default(field)} | "
                    f"{_bounds(field)} | {_escape(note)} |")
    return "\n".join(rows)


def sections() -> list[str]:
    """``seed`` and the section names, in the order of `ExperimentConfig`."""
    return list(_config_module().ExperimentConfig.model_fields)


def reference() -> str:
    """Every section's table, each under its own heading."""
    parts = []
    for name in sections():
        parts.append(f"## `{name}`\n\n{section_table(name)}\n")
    return "\n".join(parts)


def fill(markdown: str) -> str:
    """`markdown` with every config-reference marker replaced by its tables."""
    return MARKER.sub(lambda m: section_table(m.group(1)) if m.group(1) else reference(),
                      markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:  # the mkdocs hook
    return fill(markdown)


if __name__ == "__main__":
    print(reference())
