"""The base of every recipe section, and the error a recipe that cannot run raises."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key and what is allowed."""


class Section(BaseModel):
    """One mapping of the recipe: unknown keys are refused, and assignments are validated like the YAML."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds: `ShapesSpec | None` -> ShapesSpec, `list[RewardSpec]` -> RewardSpec;
    None for a plain value."""
    if isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None
