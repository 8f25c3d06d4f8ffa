"""The HTTP contract: experiment specs (a discriminated union on ``kind``) and resources."""

from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.settings import get_settings

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL_STATUSES = ("succeeded", "failed", "canceled")


class SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UFMSpec(SpecBase):
    """Unconstrained feature model: features H and classifier W are free variables.

    ``normalized``: rows of W and H on the unit sphere, logits ``logit_scale * <w_k, h>``
    (Yaras et al. 2022). ``regularized``: weight decay ``lambda_w``, ``lambda_h``,
    ``lambda_b`` (Zhu et al. 2021).
    """

    kind: Literal["ufm"]
    # First, so that the validators of the fields below can see it.
    normalization: Literal["normalized", "regularized"] = "normalized"
    K: int = Field(ge=2, description="number of classes")
    d: int = Field(ge=1, description="feature dimension (>= 2 when normalized)")
    n_per_class: int = Field(ge=1, description="samples per class")
    logit_scale: float = Field(10.0, gt=0, le=1000, description="normalized only")
    bias: bool = False
    # Without decay on W and H the regularized objective has no minimizer (it decreases
    # forever as the features grow), so these two must be positive.
    lambda_w: float = Field(5e-4, gt=0, description="regularized only")
    lambda_h: float = Field(5e-4, gt=0, description="regularized only")
    lambda_b: float = Field(5e-4, ge=0, description="regularized only")
    max_iters: int = Field(10_000, ge=1)
    tol: float = Field(1e-10, gt=0, description="stop when the Riemannian gradient norm is below this")
    seed: int = Field(0, ge=0)
    checkpoint_every: int | None = Field(
        None, ge=1, description="iterations between history rows; default a 1-2-5 log schedule"
    )

    @field_validator("d")
    @classmethod
    def _sphere_has_room(cls, d: int, info: ValidationInfo) -> int:
        if d < 2 and info.data.get("normalization") == "normalized":
            raise ValueError("must be at least 2 when normalized: the unit sphere in one dimension is just +1 and -1")
        return d

    @field_validator("n_per_class")
    @classmethod
    def _problem_size_capped(cls, n_per_class: int, info: ValidationInfo) -> int:
        cap = get_settings().max_ufm_elements
        size = info.data.get("K", 1) * info.data.get("d", 1) * n_per_class
        if size > cap:
            raise ValueError(f"K * d * n_per_class = {size} exceeds the cap {cap} (NCLAB_MAX_UFM_ELEMENTS)")
        return n_per_class

    @field_validator("max_iters")
    @classmethod
    def _iterations_capped(cls, max_iters: int) -> int:
        cap = get_settings().max_iters
        if max_iters > cap:
            raise ValueError(f"must be at most {cap} (NCLAB_MAX_ITERS)")
        return max_iters

    @field_validator("logit_scale", "lambda_w", "lambda_h", "lambda_b")
    @classmethod
    def _fields_match_normalization(cls, value: float, info: ValidationInfo) -> float:
        # Runs only for values the client sent (defaults are not validated).
        mode = "normalized" if info.field_name == "logit_scale" else "regularized"
        if info.data.get("normalization") != mode:
            raise ValueError(f"applies only to normalization '{mode}'")
        return value


ExperimentSpec = Annotated[Union[UFMSpec], Field(discriminator="kind")]


class ExperimentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: Status
    spec: dict[str, Any]
    progress: float
    result: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExperimentList(BaseModel):
    items: list[ExperimentOut]
    next_cursor: str | None


class MetricHistory(BaseModel):
    """Rows in step order: ``{"step": 0, "loss": ..., "nc1": ..., ...}``."""

    items: list[dict[str, Any]]
