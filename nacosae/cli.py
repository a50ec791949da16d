"""One CLI layer: argparse flags generated from a config dataclass (field docstrings become --help text)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (the STYLE.md convention), read from the source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = (docs.get(f.name, "") + ("" if required else f" (default: {default})")).replace("%", "%%")
        tp = hints[f.name]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=_parser_for(tp), default=default, required=required, help=help_text)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)


def _parser_for(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        inner = _parser_for(args[0])
        return lambda s: None if s.lower() == "none" else inner(s)
    if origin is tuple:
        inner = _parser_for(args[0]) if args else str
        return lambda s: tuple(inner(p) for p in s.split(",") if p.strip())
    if tp in (int, float, str):
        return tp
    return str
