"""What can be searched, grouped and ordered on, and the type of each field.

A field is a name of the filter language: a column of the experiment (``status``,
``owner``, ``created_at``, ...), ``tags.<key>``, ``spec.<field>`` (every field of every
spec kind, read from the pydantic models), ``result.<key>`` (the result keys the
engine writes: the metric catalogue of docs/metrics.md and each kind's own figures) or
``environment.<key>`` (the provenance a worker records with each attempt). History
keys (``metric=`` of curves and plots) are the catalogue plus the training rows' keys.
The audit (``GET /audit``) has fields of its own, its columns (AUDIT_FIELDS, looked up by
``audit_lookup``), in the same language.

Types are those a comparison needs: ``number`` (int or float), ``string``, ``bool``,
``datetime``. A field with a closed set of values (``status``, ``spec.dataset``) lists
them, so that a typo is an error rather than an empty answer.
"""

import re
import typing
from dataclasses import dataclass
from typing import Literal

from service.identity import ROLES
from service.permissions import ACTIONS
from service.schemas import STATUSES, AnalysisSpec, TrainSpec, UFMSpec

FieldType = Literal["number", "string", "bool", "datetime"]

# Tag keys and JSON keys are spliced into SQL text as literals (service/search/sql.py):
# only names that match this are ever accepted.
KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

CATALOGUE_METRICS = (
    "nc1",
    "nc1_cdnv",
    "nc2_equinorm_m",
    "nc2_equinorm_w",
    "nc2_equiangle_m",
    "nc2_equiangle_w",
    "nc2_etf_m",
    "nc2_etf_w",
    "nc3",
    "nc3_uncentred",
    "nc3_etf",
    "nc4",
    "accuracy",
    "loss",
)
# The catalogue of the class means at a named layer (the plain keys are the classifier's
# input): a deep UFM's hidden layers (spec.layers > 1; layer1 the free features) and a
# network's spec.metrics_layers (an MLP's layer1 ..., a ResNet's stem and stage1 ... stage4,
# VGG-11's block1 ... block5): nc1_layer2, nc2_etf_m_stage3, ... Number keys of results and
# history rows like the others, matched by this pattern rather than listed (nor exported
# as CSV columns).
LAYER_METRICS = ("nc1", "nc1_cdnv", "nc2_equinorm_m", "nc2_equiangle_m", "nc2_etf_m")
LAYER_KEY = re.compile(rf"({'|'.join(LAYER_METRICS)})_(layer[1-9][0-9]?|stem|stage[1-4]|block[1-5])")
LAYER_KEY_HELP = f"a layer's {'/'.join(LAYER_METRICS)} as <key>_<layer> (nc1_layer2, nc1_stage3)"
# Keys of a history row, beside its step.
HISTORY_KEYS = (
    *CATALOGUE_METRICS,
    "cross_entropy",
    "grad_norm",
    "w_min_angle_deg",  # UFM checkpoints
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",  # training epochs, with the catalogue on the test set:
    *(f"test_{key}" for key in CATALOGUE_METRICS),
)
RESULT_TYPES: dict[str, FieldType] = {
    **{key: "number" for key in HISTORY_KEYS},
    **{
        key: "number"
        for key in (
            "optimal_loss",
            "optimality_gap",
            "iterations",
            "features_merged_at",
            "restarts",
            "global_optimum_fraction",
            "final_loss_min",
            "final_loss_max",
            "final_loss_std",
            "hessian_min_eigenvalue",
            "hessian_max_eigenvalue",
            "hessian_min_eigenvalue_residual",
            "critical_point_grad_tol",
            "critical_point_curvature_tol",
            "minima_found",
            "minima_proven",
            "saddles_found",  # UFM
            "epochs",
            "parameters",  # training
            "checkpoints",  # analysis
        )
    },
    "converged": "bool",
    "has_closed_form": "bool",
    "all_minima_global": "bool",  # UFM: over the restarts' local minima
    "hessian_min_eigenvalue_converged": "bool",  # UFM: Lanczos met its tolerance, not its step cap
    "stop_reason": "string",  # UFM: why the descent stopped
    "critical_point": "string",  # UFM: "local minimum", "strict saddle" or "not critical"
}

# The provenance a worker records with each attempt (worker/environment.py; tests/test_provenance.py keeps
# the two lists equal).
ENVIRONMENT_TYPES: dict[str, FieldType] = {
    "nclab": "string",
    "commit": "string",
    "python": "string",
    "torch": "string",
    "cuda": "string",
    "cudnn": "number",
    "device": "string",
    "cuda_visible_devices": "string",
    "host": "string",
    "worker": "string",
    "threads": "number",
    "deterministic_algorithms": "bool",
    "cudnn_deterministic": "bool",
    "cudnn_benchmark": "bool",
}

# The step of a history row counts iterations for a UFM solve and epochs for training.
STEP_UNITS = {"ufm": "iteration", "train": "epoch", "analysis": "step"}


@dataclass(frozen=True)
class Field:
    name: str
    type: FieldType
    choices: tuple[str, ...] | None = None
    table: Literal["experiments", "audit"] = "experiments"  # what it is a field of

    @property
    def scope(self) -> str:
        """'spec', 'result', 'tags', 'environment', or 'column'."""
        head, _, rest = self.name.partition(".")
        return head if rest else "column"

    @property
    def key(self) -> str:
        return self.name.partition(".")[2] or self.name


COLUMN_FIELDS = {
    field.name: field
    for field in (
        Field("id", "string"),
        Field("status", "string", STATUSES),
        Field("kind", "string", tuple(STEP_UNITS)),
        Field("owner", "string"),
        Field("name", "string"),
        Field("sweep", "string"),
        Field("progress", "number"),
        Field("priority", "number"),
        Field("created_at", "datetime"),
        Field("started_at", "datetime"),
        Field("finished_at", "datetime"),
    )
}


def _spec_field(name: str, annotation) -> Field:
    """The type of a spec field from its pydantic annotation (an object or a list is exported as JSON text)."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
    if typing.get_origin(annotation) is Literal:
        return Field(f"spec.{name}", "string", tuple(args))
    if typing.get_origin(annotation) is typing.Annotated:
        return _spec_field(name, args[0])
    if all(arg is bool for arg in args):
        return Field(f"spec.{name}", "bool")
    # int | list[int] (n_per_class) compares as a number where it is one.
    if any(arg in (int, float) for arg in args):
        return Field(f"spec.{name}", "number")
    return Field(f"spec.{name}", "string")


def _spec_fields() -> dict[str, Field]:
    fields: dict[str, Field] = {}
    for model in (UFMSpec, TrainSpec, AnalysisSpec):
        for name, info in model.model_fields.items():
            field = _spec_field(name, info.annotation)
            known = fields.get(field.name)
            if known is not None:
                # A closed set of values only where every kind's field has one (an analysis's dataset is free text).
                choices = known.choices + field.choices if known.choices and field.choices else None
                field = Field(field.name, field.type, tuple(dict.fromkeys(choices)) if choices else None)
            fields[field.name] = field
    return fields


SPEC_FIELDS = _spec_fields()
RESULT_FIELDS = {f"result.{key}": Field(f"result.{key}", kind) for key, kind in RESULT_TYPES.items()}
ENVIRONMENT_FIELDS = {
    f"environment.{key}": Field(f"environment.{key}", kind) for key, kind in ENVIRONMENT_TYPES.items()
}


class UnknownField(ValueError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def lookup(name: str) -> Field:
    """The field of a name, or UnknownField saying what there is."""
    if name in COLUMN_FIELDS:
        return COLUMN_FIELDS[name]
    if name in SPEC_FIELDS:
        return SPEC_FIELDS[name]
    if name in RESULT_FIELDS:
        return RESULT_FIELDS[name]
    if name in ENVIRONMENT_FIELDS:
        return ENVIRONMENT_FIELDS[name]
    scope, _, key = name.partition(".")
    if scope == "tags" and KEY_PATTERN.fullmatch(key):
        return Field(name, "string")
    if scope == "tags":
        raise UnknownField(name, f"unknown field '{name}': a tag key is letters, digits and '_', at most 64")
    if scope == "spec":
        raise UnknownField(name, f"unknown field '{name}': spec fields are {', '.join(k[5:] for k in SPEC_FIELDS)}")
    if scope == "result" and LAYER_KEY.fullmatch(key):
        return Field(name, "number")
    if scope == "result":
        raise UnknownField(
            name, f"unknown field '{name}': result keys are {', '.join(RESULT_TYPES)}, and {LAYER_KEY_HELP}"
        )
    if scope == "environment":
        raise UnknownField(name, f"unknown field '{name}': environment keys are {', '.join(ENVIRONMENT_TYPES)}")
    raise UnknownField(
        name,
        f"unknown field '{name}': use one of {', '.join(COLUMN_FIELDS)}, tags.<key>, spec.<field>, result.<key> "
        "or environment.<key>",
    )


AUDIT_FIELDS = {
    field.name: field
    for field in (
        Field("id", "string", table="audit"),
        Field("at", "datetime", table="audit"),
        Field("owner", "string", table="audit"),
        Field("role", "string", ROLES, table="audit"),
        Field("action", "string", ACTIONS, table="audit"),
        Field("target", "string", table="audit"),
        Field("client", "string", table="audit"),
        Field("status", "number", table="audit"),
        Field("detail", "string", table="audit"),
    )
}


def audit_lookup(name: str) -> Field:
    """The audit's field of a name, or UnknownField saying what there is."""
    if name not in AUDIT_FIELDS:
        raise UnknownField(name, f"unknown field '{name}': the audit's fields are {', '.join(AUDIT_FIELDS)}")
    return AUDIT_FIELDS[name]


def names(text: str | None) -> list[str]:
    """The names of a comma-separated parameter (``group_by``, ``metrics``), blanks dropped."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def history_key(name: str) -> str:
    """A history metric by name (``nc1`` or ``result.nc1``), or UnknownField."""
    key = name.removeprefix("result.")
    if key not in HISTORY_KEYS and not LAYER_KEY.fullmatch(key):
        raise UnknownField(
            name, f"unknown history metric '{name}': use one of {', '.join(HISTORY_KEYS)}, or {LAYER_KEY_HELP}"
        )
    return key


def numeric_result_key(name: str) -> str:
    """A numeric result key by name (``nc1`` or ``result.nc1``), or UnknownField."""
    key = name.removeprefix("result.")
    if RESULT_TYPES.get(key) != "number" and not LAYER_KEY.fullmatch(key):
        numeric = [k for k, kind in RESULT_TYPES.items() if kind == "number"]
        raise UnknownField(name, f"unknown metric '{name}': use a numeric result key, one of {', '.join(numeric)}")
    return key
