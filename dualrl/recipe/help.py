"""Every key of a recipe with its type, default, value in this recipe and help, grouped by section: what
`python -m dualrl.launch RECIPE --help` prints. The text comes from the fields themselves (`Field(description=)`)."""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from dualrl.recipe.schema import DERIVED, Recipe
from dualrl.recipe.section import section_type

UNSET = object()  # a key of a section that is off (null) in this recipe

_BOUNDS = ((at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"), (at.Le, "le", "<="))


@dataclass
class Group:
    """One section of the recipe as it is printed: its dotted key, its model, its values (None: off)."""

    key: str
    model: type[BaseModel]
    values: dict[str, Any] | None
    field: FieldInfo | None = None


def groups(model: type[BaseModel], values: dict[str, Any] | None, key: str = "") -> Iterator[Group]:
    """Every section under `model`, depth first, in field order: nested sections, and one group per entry of a
    list of sections (`rewards.0`, ...; `rewards.N` when the list is empty)."""
    for name, field in model.model_fields.items():
        inner = section_type(field.annotation)
        if inner is None:
            continue
        dotted = f"{key}.{name}" if key else name
        value = None if values is None else values.get(name)
        if get_origin(field.annotation) is list:
            entries = value or [None]
            for i, entry in enumerate(entries):
                yield from _group(f"{dotted}.{i if entry is not None else 'N'}", inner, entry, field)
        else:
            yield from _group(dotted, inner, value, field)


def _group(key: str, model: type[BaseModel], values: dict | None, field: FieldInfo) -> Iterator[Group]:
    yield Group(key, model, values, field)
    yield from groups(model, values, key)


def type_name(annotation: Any) -> str:
    """A field's type as a recipe writer reads it: `int`, `float | null`, `'qwen2' | 'internlm2'`, `list[str]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is Union or type(annotation).__name__ == "UnionType":
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "entry" if annotation.model_config.get("extra") == "allow" else "section"
    return getattr(annotation, "__name__", str(annotation))


def constraints(field: FieldInfo) -> str:
    """`> 0`, `>= 0, < 1`, `min length 1`: the bounds pydantic enforces on a field."""
    out = []
    for meta in field.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                out.append(f"{sign} {getattr(meta, attr)}")
        if isinstance(meta, at.MinLen):
            out.append(f"min length {meta.min_length}")
    return ", ".join(out)


def show(value: Any) -> str:
    """A value as it would be written in YAML, on one line."""
    if value is UNSET:
        return "-"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, (list, dict)):
        value = json.loads(json.dumps(value, default=lambda v: v.model_dump(mode="json", exclude_defaults=True)))
        return yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and (not value or any(c in value for c in "\n\t:#{}[],'\"") or value != value.strip()):
        return json.dumps(value)
    return str(value)


def default_of(field: FieldInfo, key: str) -> str:
    """A field's default as printed: its YAML value, `required`, or `null: same as X` for a derived key."""
    if key in DERIVED:
        return f"null: same as {DERIVED[key]}"
    if field.default_factory is not None:
        return show(field.default_factory())
    return "required" if field.default is PydanticUndefined else show(field.default)


def describe_recipe(recipe: Recipe, title: str = "", width: int | None = None) -> str:
    """The help text of every key of `recipe`, grouped by section, under `title`."""
    width = width or max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
    values = recipe.model_dump(mode="json")
    intro = (
        f"{title}{': ' if title else ''}every key as `key (type) = value in this recipe (default)`, then its help. "
        "Set any of them with dotted.key=value after the recipe; later overrides win."
    )
    blocks = [_wrap(intro, width, "", ""), _block(Group("", Recipe, values), width)]
    blocks += [_block(g, width) for g in groups(Recipe, values)]
    return "\n\n".join(blocks) + "\n"


def _block(group: Group, width: int) -> str:
    lines = [_header(group, width)]
    for name, field in group.model.model_fields.items():
        is_list = get_origin(field.annotation) is list
        if section_type(field.annotation) is not None and not is_list:
            continue  # a nested section: its own block
        key = f"{group.key}.{name}" if group.key else name
        value = UNSET if group.values is None else group.values.get(name)
        lines += _entry(key, field, value, width)
    if group.values is not None and group.model.model_config.get("extra") == "allow":
        for name, value in group.values.items():
            if name not in group.model.model_fields:
                lines.append(f"  {group.key}.{name} = {show(value)}  (the plugin's own option)")
    return "\n".join(lines)


def _header(group: Group, width: int) -> str:
    about = " ".join((group.model.__doc__ or "").split()) or (group.field.description if group.field else "")
    head, _, index = group.key.rpartition(".")
    if index.isdigit() and index != "0":
        about = f"Another entry, as {head}.0."  # the first one said what an entry is
    state = ""
    if group.values is None:
        state = " (off: null in this recipe; setting one of its keys turns it on with the defaults below)"
    elif group.field is not None and type(None) in get_args(group.field.annotation):
        state = f" (on; {group.key}=null turns it off)"
    return _wrap(f"[{group.key or 'top level'}]{state} {about}".rstrip(), width, "", "    ")


def _entry(key: str, field: FieldInfo, value: Any, width: int) -> list[str]:
    kind = type_name(field.annotation)
    bounds = constraints(field)
    if bounds:
        kind += f", {bounds}"
    default = default_of(field, key)
    if isinstance(value, list) and section_type(field.annotation) is not None:
        text = f"{len(value)} entries, below" if len(value) != 1 else "1 entry, below"
    else:
        text = show(value)
    note = "default" if value is not UNSET and text == default else f"default {default}"
    if default == "required":
        note = "required"
    head = f"  {key} ({kind}) = {text}  ({note})"
    return [_wrap(head, width, "", "      "), _wrap(field.description or "(no help)", width, "      ", "      ")]


def _wrap(text: str, width: int, first: str, rest: str) -> str:
    wrapped = textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)
    return "\n".join(wrapped) or first.rstrip()
