"""The base of every recipe section, and the error a recipe that cannot run raises."""

from __future__ import annotations

from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

# The largest values of the size keys: far above any real run, low enough that a slip (`1e9`) is refused before
# anything is allocated. The help text shows them (`<= 4096`).
MAX_BATCH = 4096
MAX_IMAGE_SIZE = 4096
MAX_STEPS = 10_000_000


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key and what is allowed."""


class Section(BaseModel):
    """One mapping of the recipe: unknown keys are refused, assignments are validated like the YAML, floats are
    finite, and integer and boolean keys take YAML's integers and booleans only (`scalar_kind`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_conversion(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic would turn `true` into the integer 1, `1.0e9` into a count and 1 into true; a recipe means what
        YAML reads. A float key still takes an integer (`lr: 1`) and the numbers YAML 1.1 reads as text (`1e-5`)."""
        field = cls.model_fields.get(info.field_name or "")
        kind = scalar_kind(field.annotation) if field is not None else None
        if value is None or kind is None:
            return value
        if kind is bool and not isinstance(value, bool):
            raise ValueError("expects true or false")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("expects a whole number (no decimal point, exponent or true/false)")
        if kind is float and isinstance(value, bool):
            raise ValueError("expects a number, not true or false")
        return value


def scalar_kind(annotation: Any) -> type | None:
    """bool, int or float when a field holds that scalar (or null): `int | None` -> int; None for anything else."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    kinds = [a for a in args if a is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float) else None


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds: `ShapesSpec | None` -> ShapesSpec, `list[RewardSpec]` -> RewardSpec;
    None for a plain value."""
    if isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None
