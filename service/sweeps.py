"""A sweep's members: base x each variant x the cartesian product of the grid, all validated first.

Variants let each setting carry its own fields (regularized runs take ``lambda_w``,
normalized ones ``logit_scale``); the grid varies the fields every member shares. Every
member is validated before anything is stored, so that one invalid member stores nothing.

The base may hold the fields of every setting, so that one file states "the same budget
three ways": a base field that a member's own settings do not use (``feature_decay`` in
a normalized member, ``logit_scale`` in a regularized one: the spec's FIELD_OWNERS) is
left out of that member. Only the base's: such a field set by a variant or the grid is
the member's own choice, and still a 422.
"""

import itertools
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from service.schemas import (
    DEFAULT_PRIORITY,
    AnalysisSpec,
    ExperimentSpec,
    Name,
    Priority,
    StorableJSON,
    Tags,
    TrainSpec,
    UFMSpec,
)
from service.settings import get_settings

SPECS = TypeAdapter(ExperimentSpec)
SPEC_MODELS: dict[str, type[UFMSpec] | type[TrainSpec] | type[AnalysisSpec]] = {
    "ufm": UFMSpec,
    "train": TrainSpec,
    "analysis": AnalysisSpec,
}


def _no_variants() -> list[dict[str, Any]]:
    """One empty variant: the base alone, times the grid."""
    return [{}]


class SweepRequest(BaseModel):
    """POST /sweeps."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    tags: Tags = {}
    priority: Priority = DEFAULT_PRIORITY  # every member's
    # base, variants and grid are stored as given (Sweep.definition): every key and string in them must be
    # storable, even in a base field that no member uses. An empty list, of variants or of a grid field's
    # values, would make a sweep of no members.
    base: Annotated[dict[str, Any], StorableJSON] = Field(
        description="the fields every member shares, e.g. kind and dataset"
    )
    variants: Annotated[list[dict[str, Any]], StorableJSON] = Field(
        default_factory=_no_variants, min_length=1, description="partial specs laid over the base, one member set each"
    )
    grid: Annotated[dict[str, Annotated[list[Any], Field(min_length=1)]], StorableJSON] = Field(
        default_factory=dict, description="field -> values; every combination"
    )


class InvalidMember(ValueError):
    """A member that is not a valid spec: which one, what it varies, and the first error."""

    def __init__(self, index: int, values: dict, field: str, message: str):
        super().__init__(f"member {index} ({values}): {field}: {message}")
        self.index, self.values, self.field, self.message = index, values, field, message


def size(request: SweepRequest) -> int:
    count = len(request.variants)
    for values in request.grid.values():
        count *= len(values)
    return count


def members(request: SweepRequest) -> list[dict]:
    """Every member's validated spec (as stored), in order: variants outermost, then the grid."""
    cap, count = get_settings().max_sweep, size(request)
    if count > cap:
        raise InvalidMember(-1, {}, "grid", f"{count} members; a sweep has at most {cap} (NCLAB_MAX_SWEEP)")
    fields = list(request.grid)
    specs: list[dict] = []
    for variant in request.variants:
        for combination in itertools.product(*(request.grid[field] for field in fields)):
            varied = {**variant, **dict(zip(fields, combination))}
            try:
                spec = SPECS.validate_python(_member(request.base, varied))
            except ValidationError as exc:
                error = exc.errors()[0]
                # No place: the kind itself (a missing or unknown one), or a rule of the whole spec.
                place = "kind" if error["type"].startswith("union_tag") else "spec"
                field = ".".join(str(part) for part in error["loc"][1:]) or place
                raise InvalidMember(len(specs), varied, field, error["msg"].removeprefix("Value error, ")) from None
            specs.append(spec.model_dump(mode="json"))
    return specs


def _member(base: dict, varied: dict) -> dict:
    """The base with the member's own values laid over it, less the base's fields that the member's settings do not
    use."""
    member = {**base, **varied}
    kind = member.get("kind")
    # Only a str names a model (a list or an object is unhashable): for anything else validation names the kind.
    model = SPEC_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return member
    for field, (owner, allowed) in model.FIELD_OWNERS.items():
        setting = member.get(owner, model.model_fields[owner].default)
        if field in base and field not in varied and setting not in allowed:
            del member[field]
    return member
