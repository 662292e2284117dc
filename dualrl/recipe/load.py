"""From YAML files and `dotted.key=value` overrides to a validated `Recipe`, and back to YAML.

`load_recipe` reads a recipe file (merging the files it `extends`), applies overrides (later ones win) and
validates everything — unknown keys, wrong types, values out of range, missing files, unknown reward plugins —
before any model is built, naming the key path in the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dualrl.recipe.checks import check_paths, check_rewards
from dualrl.recipe.schema import Recipe
from dualrl.recipe.section import RecipeError, Section, section_type


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is read as YAML, so `x=[1,2]`, `x=null`, `x=true` work."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise RecipeError(f"override {text!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"override {key}: value {raw!r} is not valid YAML ({err})") from err
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """`a.b=v` sets a nested key; a numeric part indexes a list (`rewards.1.weight=0.5`)."""
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override {key}: {part!r} is not an index of a {len(node)}-entry list")
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            elif node.get(part) is None:  # a section switched off with null comes back with its defaults
                node[part] = {}
            node = node[part]
        else:
            raise RecipeError(f"override {key}: {parts[i - 1]} is a value, not a section")


def _format_errors(err: ValidationError) -> str:
    """Every problem pydantic found, on one line: `invalid recipe: a.b: what is wrong (got x); c: ...`."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            section = _section_at(e["loc"][:-1])
            if section is not None:
                msg += f"; allowed here: {', '.join(section.model_fields)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif not isinstance(e.get("input"), dict):  # a whole section as "got" would bury the message
            msg += f" (got {e.get('input')!r})"
        lines.append(f"{path}: {msg}" if path else msg)  # a check across sections names its keys itself
    return "invalid recipe: " + "; ".join(lines)


def _section_at(loc: tuple) -> type[Section] | None:
    cls: type = Recipe
    for part in loc:
        field = cls.model_fields.get(str(part))
        inner = section_type(getattr(field, "annotation", None))
        if inner is None or not issubclass(inner, Section):
            return None
        cls = inner
    return cls


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a dict. `extends: other.yaml` (relative to the file) starts from that recipe; this
    file's sections are merged into it key by key, so a variant states only what differs. A list of files
    is merged in order, later over earlier (e.g. a model recipe, then an algorithm part)."""
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {str(path)!r}")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: `extends` loops back to it")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(loaded, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(loaded).__name__}")
    parents = loaded.pop("extends", None)
    if parents is None:
        return loaded
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(f"{path}: `extends` takes a recipe file or a list of them")
    tree: dict[str, Any] = {}
    for parent in parents:
        tree = _merge(tree, _read_tree(path.parent / parent, (*seen, path.resolve())))
    return _merge(tree, loaded)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def resolve_recipe(path: str | Path | None, overrides: Sequence[str] = (), base: dict | None = None) -> Recipe:
    """Read a YAML recipe (or start from `base`), apply overrides and validate, without looking at the files
    and plugins it names (`load_recipe` does)."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        tree.update(_read_tree(Path(path)))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(_format_errors(err)) from None


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (), base: dict | None = None) -> Recipe:
    """Read a YAML recipe (or start from `base`), apply overrides, validate, check paths and reward plugins, and
    fill in the architecture its checkpoint gives (`model.sa2va`, `model.vlm`, `model.sam.checkpoint`; a key set
    against the checkpoint is refused, named): the recipe a run writes is the model it builds."""
    from dualrl.model.checkpoint_config import resolve_model_spec  # reads config files only; imports this package

    recipe = resolve_recipe(path, overrides, base)
    check_paths(recipe)
    check_rewards(recipe)
    recipe.model = resolve_model_spec(recipe.model)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (derived keys filled in); loading it gives the same recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
