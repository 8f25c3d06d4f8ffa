"""The HTTP contract: experiment specs (a discriminated union on ``kind``) and resources."""

import itertools
import typing
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticKnownError

from service import job_size
from service.datasets import DATASETS
from service.identity import Role
from service.models import INTEGER_MAX, INTEGER_MIN
from service.permissions import DEFAULT_PRIORITY, Action
from service.settings import get_settings

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
STATUSES: tuple[str, ...] = typing.get_args(Status)
TERMINAL_STATUSES = ("succeeded", "failed", "canceled")

# The queues jobs are routed to by the resource they run on: a worker serves the queues its
# host can (`nclab worker --queues`). Each spec kind's `resources` default says where it goes.
Resources = Literal["cpu", "gpu"]
QUEUES: tuple[str, ...] = typing.get_args(Resources)
RESOURCES_DESCRIPTION = "the queue the job goes to: the workers that serve it run it"


def _positive_counts(value: Any) -> Any:
    """One clear error for n_per_class, instead of one per member of the int | list union."""
    counts = value if isinstance(value, list) else [value]
    if not counts or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
        raise ValueError("must be a positive integer, or a list of K positive integers")
    return value


ClassCounts = Annotated[int | list[int], BeforeValidator(_positive_counts)]


def _state_int_range(schema: dict) -> None:
    """Write INTEGER_MIN..INTEGER_MAX into a field's JSON Schema: its integers, also in unions and arrays."""
    if schema.get("type") == "integer":
        schema["minimum"] = max(schema.get("minimum", INTEGER_MIN), INTEGER_MIN)
        schema["maximum"] = min(schema.get("maximum", INTEGER_MAX), INTEGER_MAX)
    for member in (*schema.get("anyOf", ()), *([schema["items"]] if "items" in schema else ())):
        _state_int_range(member)


# A field that only some values of a setting use: field -> (the setting, the values that use it).
FieldOwners = dict[str, tuple[str, tuple[str, ...]]]


def _field_name(info: ValidationInfo) -> str:
    """The name of the field a field validator is validating."""
    assert info.field_name is not None, "pydantic sets field_name for every field validator"
    return info.field_name


def _storable_text(text: str) -> str:
    """Text both databases can store: PostgreSQL's text and JSONB hold no NUL character, and a
    lone surrogate (which JSON's \\ud800 escapes can carry) has no UTF-8 form, in either database."""
    if "\x00" in text:
        raise PydanticCustomError("unstorable_text", "contains a NUL character (\\u0000), which cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unstorable_text",
            "contains a lone surrogate ({character}), which cannot be stored",
            {"character": ascii(text[exc.start])},
        ) from None
    return text


# The character rule of every string the user gives. It goes after a string's own
# constraints, so that theirs keep the messages of a string ("at most 200 characters").
StorableText = AfterValidator(_storable_text)


class SpecBase(BaseModel):
    # Infinity and NaN are no sizes, rates or tolerances: a 422 naming the field, at the edge.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # The spec's fields that only some settings use (see _only_for); none unless a spec says so.
    FIELD_OWNERS: ClassVar[FieldOwners] = {}

    # Every integer of a spec lies in the range of PostgreSQL's integer columns: seed, K, d and
    # epochs have typed copies in such columns (models.SPEC_COLUMNS), and one range for all
    # keeps a field's limit from depending on whether it is copied. SQLite's columns and both
    # databases' JSON hold that range too.
    # A rule on every field, not a bound on each field's type: a field added later is covered,
    # and a field's own ge/le stay (pydantic lets a bound on the type replace the field's).
    @field_validator("*")
    @classmethod
    def _integers_in_range(cls, value: Any) -> Any:
        """Every integer, alone or in a list, within INTEGER_MIN..INTEGER_MAX."""
        for number in value if isinstance(value, list) else (value,):
            if isinstance(number, bool) or not isinstance(number, int):
                continue
            if number > INTEGER_MAX:
                raise PydanticKnownError("less_than_equal", {"le": INTEGER_MAX})
            if number < INTEGER_MIN:
                raise PydanticKnownError("greater_than_equal", {"ge": INTEGER_MIN})
        return value

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler: GetJsonSchemaHandler) -> dict:
        """The JSON Schema states the range too, so that clients (and the fuzzer) see what is taken."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        for field_schema in schema["properties"].values():
            _state_int_range(field_schema)
        return schema


def _at_most_setting(value: int, setting: str) -> int:
    """Caps that keep one request from exhausting a worker, from settings (NCLAB_MAX_*)."""
    cap = getattr(get_settings(), setting)
    if value > cap:
        raise ValueError(f"must be at most {cap} (NCLAB_{setting.upper()})")
    return value


def _only_for(model: type[BaseModel], value: Any, info: ValidationInfo, owner: str, allowed: tuple[str, ...]) -> None:
    """Reject a value the chosen ``owner`` setting (e.g. the normalization) does not use.

    Defaults are accepted, so that a stored spec, which has every field filled in,
    validates again in the worker.
    """
    if value == model.model_fields[_field_name(info)].default:
        return
    if info.data.get(owner) not in allowed:
        choices = " or ".join(f"'{a}'" for a in allowed)
        raise ValueError(f"applies only to {owner} {choices}")


def _declare_cross_field_rules(schema: dict, model: type[SpecBase]) -> None:
    """Write the model's cross-field rules into its JSON Schema, as ``allOf`` of if/then.

    - ``SCHEMA_RULES`` as they are (UFMSpec: ``d >= 2`` when normalized);
    - a field of ``FIELD_OWNERS`` keeps its default unless its owner setting uses it
      (what ``_only_for`` enforces). The condition names the owner's other values, with
      no ``not``, so that generators (schemathesis) can follow it; ``properties`` holds
      when the owner is absent, which is right exactly when its default does not use
      the field.
    """
    rules = list(getattr(model, "SCHEMA_RULES", ()))
    governed: dict[tuple, list[str]] = {}  # one rule per (owner, values that use the fields)
    for field, owner_and_allowed in model.FIELD_OWNERS.items():
        governed.setdefault(owner_and_allowed, []).append(field)
    for (owner, allowed), fields in governed.items():
        others = [value for value in typing.get_args(model.model_fields[owner].annotation) if value not in allowed]
        unused: dict[str, Any] = {"properties": {owner: {"enum": others}}}
        if model.model_fields[owner].default in allowed:
            unused["required"] = [owner]
        defaults = {field: {"const": model.model_fields[field].default} for field in fields}
        rules.append({"if": unused, "then": {"properties": defaults}})
    schema["allOf"] = rules


# The deep UFM's most layers (worker.nc.ufm_problem.MAX_LAYERS, kept equal by tests/test_deep_ufm.py).
MAX_LAYERS = 6


class LossChoice(BaseModel):
    """The loss of the logits, the same for both kinds (docs/closed-forms.md): the
    cross-entropy, the squared error against the one-hot target (``mse``, Zhou et al.
    2022), or the cross-entropy against targets smoothed by ``label_smoothing``
    (PyTorch's ``label_smoothing``; Guo et al. 2024).

    A spec's FIELD_OWNERS include LOSS_FIELD_OWNERS, its SCHEMA_RULES LOSS_RULE.
    """

    loss: Literal["cross_entropy", "mse", "label_smoothing"] = Field(
        "cross_entropy", description="cross_entropy; mse: half the squared error to the one-hot target; label_smoothing"
    )
    label_smoothing: float | None = Field(
        None,
        gt=0,
        lt=1,
        validate_default=True,
        description="label_smoothing only, and required with it: eps, targets (1 - eps) e_y + eps/K",
    )

    @field_validator("label_smoothing")
    @classmethod
    def _given_with_its_loss(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None and info.data.get("loss") == "label_smoothing":
            raise ValueError("required with loss 'label_smoothing': the smoothing eps, 0 < eps < 1")
        return value


LOSS_FIELD_OWNERS: FieldOwners = {"label_smoothing": ("loss", ("label_smoothing",))}
# label_smoothing is required with its loss: a rule the JSON Schema states too.
LOSS_RULE = {
    "if": {"properties": {"loss": {"const": "label_smoothing"}}, "required": ["loss"]},
    "then": {"required": ["label_smoothing"], "properties": {"label_smoothing": {"type": "number"}}},
}


class UFMSpec(SpecBase, LossChoice):
    """Unconstrained feature model: features H and classifier W are free variables.

    ``normalized``: rows of W and H on the unit sphere, logits ``logit_scale * <w_k, h>``
    (Yaras et al. 2022). ``regularized``: weight decay ``lambda_w``, ``lambda_h``,
    ``lambda_b`` (Zhu et al. 2021).
    """

    # Fields that only one normalization uses: field -> (the setting, the values that use it).
    FIELD_OWNERS: ClassVar[FieldOwners] = {
        "logit_scale": ("normalization", ("normalized",)),
        **{field: ("normalization", ("regularized",)) for field in ("lambda_w", "lambda_h", "lambda_b")},
        **LOSS_FIELD_OWNERS,
    }
    # Normalized (the default) needs d >= 2: a rule the JSON Schema states too.
    SCHEMA_RULES: ClassVar[list] = [
        {
            "if": {"properties": {"normalization": {"const": "normalized"}}},
            "then": {"properties": {"d": {"minimum": 2}}},
        },
        LOSS_RULE,
        # One layer (the default) unless regularized; the hidden layers' fields keep their
        # defaults with one layer. lambda_layers' length (layers - 1) is checked only by the API.
        {
            "if": {"properties": {"normalization": {"const": "normalized"}}},
            "then": {"properties": {"layers": {"maximum": 1}}},
        },
        {
            "if": {"properties": {"layers": {"maximum": 1}}},
            "then": {"properties": {"layer_activation": {"const": "linear"}, "lambda_layers": {"const": None}}},
        },
    ]
    model_config = ConfigDict(json_schema_extra=_declare_cross_field_rules)

    kind: Literal["ufm"]
    # First, so that the validators of the fields below can see it.
    normalization: Literal["normalized", "regularized"] = "normalized"
    K: int = Field(ge=2, description="number of classes")
    d: int = Field(ge=1, description="feature dimension (>= 2 when normalized)")
    n_per_class: ClassCounts = Field(description="samples per class, or a list of K counts (imbalanced)")
    logit_scale: float = Field(10.0, gt=0, le=1000, description="normalized only")
    bias: bool = False
    # Without decay on W and H the regularized objective has no minimizer (it decreases
    # forever as the features grow), so these two must be positive.
    # Below 1e-12 the product n lambda_w lambda_h of the closed form underflows; above 1e6
    # the decay dwarfs the loss so far that the objective at a random start can overflow
    # float64 (1e308 does). No weight decay in use comes near either.
    lambda_w: float = Field(5e-4, ge=1e-12, le=1e6, description="regularized only")
    lambda_h: float = Field(5e-4, ge=1e-12, le=1e6, description="regularized only")
    lambda_b: float = Field(5e-4, ge=0, le=1e6, description="regularized only")
    max_iters: int = Field(10_000, ge=1)
    tol: float = Field(1e-10, gt=0, description="stop when the Riemannian gradient norm is below this")
    seed: int = Field(0, ge=0)
    checkpoint_every: int | None = Field(
        None, ge=1, description="iterations between history rows; default a 1-2-5 log schedule"
    )
    restarts: int = Field(1, ge=1, description="independent random starts; the best run is kept")
    layers: int = Field(
        1,
        ge=1,
        le=MAX_LAYERS,
        description="linear maps from the features to the logits, the classifier included: 1 is W H; L > 1 puts "
        "L - 1 d x d layers between them (the deep UFM; regularized only)",
    )
    layer_activation: Literal["linear", "relu"] = Field(
        "linear", description="layers > 1 only: the activation after each layer but the classifier"
    )
    lambda_layers: list[Annotated[float, Field(ge=1e-12, le=1e6)]] | None = Field(
        None, description="layers > 1 only: the weight decay of each of the L - 1 hidden layers; default lambda_w each"
    )
    solver: Literal["auto", "first_order", "trust_region"] = Field(
        "first_order",
        description="the optimizer: preconditioned Riemannian gradient descent, Riemannian trust regions, "
        "or auto (where first order would crawl: trust regions, or L-BFGS on the collapsed classes where K > d + 1 "
        "and the features merge)",
    )
    resources: Resources = Field("cpu", description=RESOURCES_DESCRIPTION)

    @field_validator("layers")
    @classmethod
    def _deep_is_regularized(cls, layers: int, info: ValidationInfo) -> int:
        if layers > 1 and info.data.get("normalization") != "regularized":
            raise ValueError("more than 1 needs normalization 'regularized': the deep UFM is posed with weight decay")
        hidden = (layers - 1) * info.data.get("d", 1) ** 2
        cap = get_settings().max_ufm_elements
        if hidden > cap:
            raise ValueError(f"(layers - 1) * d^2 = {hidden} exceeds the cap {cap} (NCLAB_MAX_UFM_ELEMENTS)")
        return layers

    @field_validator("layer_activation", "lambda_layers")
    @classmethod
    def _only_with_hidden_layers(cls, value: Any, info: ValidationInfo) -> Any:
        layers = info.data.get("layers")
        if value != cls.model_fields[_field_name(info)].default and layers == 1:
            raise ValueError("applies only with layers > 1")
        if _field_name(info) == "lambda_layers" and value is not None and layers and len(value) != layers - 1:
            raise ValueError(f"needs one decay per hidden layer: layers - 1 = {layers - 1}, {len(value)} given")
        return value

    @field_validator("d")
    @classmethod
    def _sphere_has_room(cls, d: int, info: ValidationInfo) -> int:
        if d < 2 and info.data.get("normalization") == "normalized":
            raise ValueError("must be at least 2 when normalized: the unit sphere in one dimension is just +1 and -1")
        return d

    @field_validator("n_per_class")
    @classmethod
    def _problem_size_capped(cls, n_per_class: int | list[int], info: ValidationInfo) -> int | list[int]:
        num_classes = info.data.get("K", 1)
        if isinstance(n_per_class, list) and len(n_per_class) != num_classes:
            raise ValueError(f"a list of counts needs one count per class: {len(n_per_class)} given, K = {num_classes}")
        samples = sum(n_per_class) if isinstance(n_per_class, list) else num_classes * n_per_class
        cap = get_settings().max_ufm_elements
        if samples * info.data.get("d", 1) > cap:
            raise ValueError(
                f"samples * d = {samples * info.data.get('d', 1)} exceeds the cap {cap} (NCLAB_MAX_UFM_ELEMENTS)"
            )
        return n_per_class

    @field_validator("max_iters", "restarts")
    @classmethod
    def _work_capped(cls, value: int, info: ValidationInfo) -> int:
        return _at_most_setting(value, {"max_iters": "max_iters", "restarts": "max_restarts"}[_field_name(info)])

    @model_validator(mode="after")
    def _solution_capped(self) -> "UFMSpec":
        samples = sum(self.n_per_class) if isinstance(self.n_per_class, list) else self.K * self.n_per_class
        _artifacts_capped(
            job_size.ufm_artifact_bytes(self.K, self.d, samples, self.bias, self.layers), "the solution W, H, b, V"
        )
        return self

    @field_validator(*FIELD_OWNERS)
    @classmethod
    def _fields_match_normalization(cls, value: float, info: ValidationInfo) -> float:
        owner, allowed = cls.FIELD_OWNERS[_field_name(info)]
        _only_for(cls, value, info, owner, allowed)
        return value


# Fields that only some settings use: field -> (the setting, the values that use it).
_TRAIN_FIELD_OWNERS: FieldOwners = {
    "logit_scale": ("normalization", ("normalized",)),
    "weight_decay": ("normalization", ("normalized", "regularized")),
    "weight_decay_scope": ("normalization", ("normalized", "regularized")),
    "feature_decay": ("normalization", ("regularized",)),
    "feature_decay_reduction": ("normalization", ("regularized",)),
    "momentum": ("optimizer", ("sgd",)),
    "lr_milestones": ("lr_schedule", ("milestones",)),
    "lr_gamma": ("lr_schedule", ("milestones",)),
    "mlp_depth": ("architecture", ("mlp",)),
    "mlp_width": ("architecture", ("mlp",)),
    "resnet18_width": ("architecture", ("resnet18",)),
    **{
        field: ("dataset", ("gaussian",))
        for field in ("gaussian_dim", "gaussian_train_per_class", "gaussian_test_per_class", "gaussian_noise")
    },
    **LOSS_FIELD_OWNERS,
}


class TrainSpec(SpecBase, LossChoice):
    """A deep network trained on real data, NC metrics on the training set every epoch.

    ``normalized``: penultimate features and classifier rows on the unit sphere, logits
    scaled by ``logit_scale`` (Yaras et al. 2022). ``regularized``: weight decay on every
    parameter plus ``feature_decay`` on the features (Zhu et al. 2021). ``none``: plain
    cross-entropy. Defaults follow the seed paper's code (SGD, lr 0.05, momentum 0.9, batch 128).
    """

    FIELD_OWNERS: ClassVar[FieldOwners] = _TRAIN_FIELD_OWNERS
    SCHEMA_RULES: ClassVar[list] = [LOSS_RULE]
    model_config = ConfigDict(json_schema_extra=_declare_cross_field_rules)

    kind: Literal["train"]
    # Declared before the fields whose validity depends on them.
    normalization: Literal["normalized", "regularized", "none"] = "normalized"
    dataset: Literal["mnist", "fashion_mnist", "cifar10", "cifar100", "digits", "gaussian"]
    architecture: Literal["mlp", "resnet18", "resnet50", "vgg11"] = "mlp"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr_schedule: Literal["constant", "step", "cosine", "milestones"] = "step"
    K: int | None = Field(
        None, ge=2, validate_default=True, description="classes used (the first K); default all of the data set's"
    )
    d: int = Field(512, ge=1, description="penultimate feature width")
    n_per_class: int | None = Field(None, ge=1, description="first n training samples of each class; default all")
    test_n_per_class: int | None = Field(None, ge=1, description="first n test samples of each class; default all")
    logit_scale: float = Field(10.0, gt=0, le=1000, description="normalized only")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1, le=8192)
    lr: float = Field(0.05, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    lr_milestones: list[int] | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="milestones only: increasing 1-based epochs; at the start of each the lr is multiplied by "
        "lr_gamma (none: the lr stays constant)",
    )
    lr_gamma: float = Field(0.1, gt=0, le=1, description="milestones only")
    weight_decay: float = Field(5e-4, ge=0, description="normalized and regularized, on weight_decay_scope")
    weight_decay_scope: Literal["all", "backbone", "classifier", "none"] | None = Field(
        None,
        description="normalized and regularized: the parameters weight_decay applies to (the classifier's are "
        "W and b); default backbone when normalized, all when regularized",
    )
    feature_decay: float = Field(5e-4, ge=0, description="regularized only: lambda_H/2 * ||h||^2 over the batch")
    feature_decay_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="regularized only: feature_decay/2 times the batch's mean of ||h||^2, or its sum (the "
        "seed paper's code: batch_size times as strong)",
    )
    random_labels: bool = False
    metrics_every: int = Field(1, ge=1, description="epochs between metric evaluations")
    metrics_at_start: bool = Field(False, description="also measure the untouched model: a history row at epoch 0")
    seed: int = Field(0, ge=0)
    mlp_depth: int = Field(3, ge=1, le=32, description="mlp only: hidden layers")
    mlp_width: int = Field(512, ge=1, le=16384, description="mlp only: width of the hidden layers but the last (d)")
    resnet18_width: int = Field(
        64,
        ge=1,
        le=512,
        description="resnet18 only: channels of the first stage (64 in He et al.); the stages have w, 2w, 4w, 8w",
    )
    gaussian_dim: int = Field(32, ge=1, le=100_000, description="gaussian only: input dimension")
    gaussian_train_per_class: int = Field(100, ge=1, description="gaussian only")
    gaussian_test_per_class: int = Field(50, ge=1, description="gaussian only")
    gaussian_noise: float = Field(1.0, ge=0, description="gaussian only: noise std around unit-norm * 3 means")
    checkpoint_every: int = Field(
        1, ge=1, description="epochs between checkpoints: a re-queued attempt resumes from the last one"
    )
    save_features: bool = Field(
        False, description="keep the penultimate features and labels of both sets as an artifact (features.safetensors)"
    )
    metrics_layers: list[str] | None = Field(
        None,
        max_length=40,
        description="layers whose outputs are measured too, on the training set (the class means' catalogue, keys "
        "<key>_<layer>): mlp layer1 ... layer<mlp_depth>, resnet stem, stage1 ... stage4, vgg11 block1 ... block5; "
        '["all"] for every one',
    )
    resources: Resources = Field("gpu", description=RESOURCES_DESCRIPTION)

    @field_validator("metrics_layers")
    @classmethod
    def _layers_exist(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        architecture = info.data.get("architecture")
        if names is None or names == ["all"] or architecture is None:
            return names
        known = architecture_layers(architecture, info.data.get("mlp_depth") or 3)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(
                f"{architecture} has no layer {', '.join(unknown)}: its layers are {', '.join(known)}, or all"
            )
        return names

    @field_validator("dataset")
    @classmethod
    def _files_present(cls, dataset: str) -> str:
        info = DATASETS[dataset]
        data_dir = get_settings().data_dir.resolve()
        missing = info.missing_files(data_dir)
        if missing:
            raise ValueError(
                f"files missing in NCLAB_DATA_DIR ({data_dir}): "
                f"{', '.join(str(path.relative_to(data_dir)) for path in missing)}; "
                f"get {info.how_to_get}"
            )
        return dataset

    @field_validator("architecture")
    @classmethod
    def _architecture_fits_data(cls, architecture: str, info: ValidationInfo) -> str:
        if info.data.get("dataset") == "gaussian" and architecture != "mlp":
            raise ValueError("the gaussian data set is vectors, not images: use 'mlp'")
        return architecture

    @field_validator("K")
    @classmethod
    def _classes_exist(cls, num_classes: int | None, info: ValidationInfo) -> int:
        dataset = info.data.get("dataset")
        available = DATASETS[dataset].num_classes if dataset else None
        if num_classes is None:
            if dataset and available is None:
                raise ValueError("required for the gaussian data set")
            return available or 2
        if available is not None and num_classes > available:
            raise ValueError(f"{dataset} has {available} classes; K = {num_classes} is more")
        if available is None and num_classes > 1000:
            raise ValueError("at most 1000 classes for the gaussian data set")
        return num_classes

    @field_validator("n_per_class")
    @classmethod
    def _enough_samples(cls, n_per_class: int | None, info: ValidationInfo) -> int | None:
        dataset, num_classes = info.data.get("dataset"), info.data.get("K")
        counts = DATASETS[dataset].class_counts if dataset else None
        if n_per_class is not None and counts is not None and num_classes is not None:
            smallest = min(counts[:num_classes])
            if n_per_class > smallest:
                raise ValueError(
                    f"{dataset} has only {smallest} training samples in its smallest of the first "
                    f"{num_classes} classes; n_per_class = {n_per_class} is more"
                )
        if n_per_class is not None and dataset == "gaussian":
            raise ValueError("the gaussian data set sets its size with gaussian_train_per_class")
        return n_per_class

    @field_validator("epochs")
    @classmethod
    def _epochs_capped(cls, epochs: int) -> int:
        return _at_most_setting(epochs, "max_epochs")

    @field_validator("lr_milestones")
    @classmethod
    def _milestones_within_the_run(cls, milestones: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if milestones is None or info.data.get("lr_schedule") != "milestones":
            return milestones  # _field_applies says whether it may be given
        epochs = info.data.get("epochs")
        if any(later <= earlier for earlier, later in itertools.pairwise(milestones)):
            raise ValueError(f"must increase strictly; got {milestones}")
        if epochs is not None and not 1 <= milestones[0] <= milestones[-1] <= epochs:
            raise ValueError(f"must lie in 1..epochs (1..{epochs}); got {milestones}")
        return milestones

    @field_validator("test_n_per_class")
    @classmethod
    def _test_subset_of_a_real_data_set(cls, test_n_per_class: int | None, info: ValidationInfo) -> int | None:
        if test_n_per_class is not None and info.data.get("dataset") == "gaussian":
            raise ValueError("the gaussian data set sets its size with gaussian_test_per_class")
        return test_n_per_class

    @field_validator(*_TRAIN_FIELD_OWNERS)
    @classmethod
    def _field_applies(cls, value, info: ValidationInfo):
        owner, allowed = _TRAIN_FIELD_OWNERS[_field_name(info)]
        _only_for(cls, value, info, owner, allowed)
        return value

    @field_validator("d", "mlp_width")
    @classmethod
    def _width_capped(cls, width: int) -> int:
        return _at_most_setting(width, "max_train_width")

    @model_validator(mode="after")
    def _fits_in_memory(self) -> "TrainSpec":
        """The gaussian mixture's size, then the whole job's memory estimate, against their caps.

        The size is refused at gaussian_train_per_class, the count that sets it most (the
        message names the other two). The estimate depends on nearly every field: it is
        the spec's own error, which the API names ``spec`` (service/api/problems.py).
        """
        assert self.K is not None, "_classes_exist replaces a K of None (the default) with the data set's"
        samples = self.K * (self.gaussian_train_per_class + self.gaussian_test_per_class)
        if self.dataset == "gaussian" and samples > get_settings().max_train_samples:
            message = (
                f"K * (gaussian_train_per_class + gaussian_test_per_class) = {samples} samples "
                f"exceeds the cap {get_settings().max_train_samples} (NCLAB_MAX_TRAIN_SAMPLES)"
            )
            # A ValidationError, so that the error is located at the field (a ValueError's is the model's).
            raise ValidationError.from_exception_data(
                "TrainSpec",
                [
                    {
                        "type": PydanticCustomError("value_error", "{message}", {"message": message}),
                        "loc": ("gaussian_train_per_class",),
                        "input": self.gaussian_train_per_class,
                    }
                ],
            )
        spec = self.model_dump()
        class_counts = DATASETS[self.dataset].class_counts
        estimate = job_size.train_bytes(spec, class_counts)
        cap = get_settings().max_job_bytes
        if estimate["total"] > cap:
            parts = ", ".join(f"{name} {_gib(size)}" for name, size in estimate.items() if name != "total")
            raise ValueError(
                f"the job needs about {_gib(estimate['total'])} by its estimate ({parts}); "
                f"the cap is {_gib(cap)} (NCLAB_MAX_JOB_BYTES)"
            )
        _artifacts_capped(
            job_size.train_artifact_bytes(spec, class_counts), "the weights and, with save_features, the features"
        )
        return self


def architecture_layers(architecture: str, mlp_depth: int) -> tuple[str, ...]:
    """The layers of an architecture that metrics_layers names, input to output (the
    engine's worker.nc.models.layer_names; tests/test_layer_metrics.py keeps them equal)."""
    if architecture == "mlp":
        return tuple(f"layer{index}" for index in range(1, mlp_depth + 1))
    if architecture in ("resnet18", "resnet50"):
        return ("stem", "stage1", "stage2", "stage3", "stage4")
    return ("block1", "block2", "block3", "block4", "block5")


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"


def _artifacts_capped(size: int, what: str) -> None:
    """A job's files (service/artifacts.py) within NCLAB_MAX_ARTIFACT_BYTES: refused at submit, not at its end."""
    cap = get_settings().max_artifact_bytes
    if size > cap:
        raise ValueError(
            f"the job would keep about {_gib(size)} of files ({what}); the cap is {_gib(cap)} "
            "(NCLAB_MAX_ARTIFACT_BYTES)"
        )


# The files a training run keeps (worker/nc/train.py writes them; tests/test_analysis.py checks the names agree).
TRAINING_FEATURES = "features.safetensors"
TRAINING_MODEL = "model.safetensors"


# An analysis's steps: the checkpoints of one file's leading axis, or one file each.
MAX_ANALYSIS_STEPS = 10_000


def _upload_ids(value: Any) -> Any:
    """One clear error for an upload id or a list of them, instead of one per member of the union."""
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(upload_id, str) for upload_id in ids) or not 1 <= len(ids) <= MAX_ANALYSIS_STEPS:
        raise ValueError(f"must be an upload's id, or a list of 1 to {MAX_ANALYSIS_STEPS} ids")
    return value


class UploadSource(BaseModel):
    """Uploaded files of features (POST /uploads): one, or one per checkpoint, in step order."""

    model_config = ConfigDict(extra="forbid")

    upload: Annotated[str | list[str], BeforeValidator(_upload_ids)] = Field(
        description="an upload's id, or a list of ids: one file per step"
    )


def upload_ids(source: dict) -> list[str]:
    """The uploads an analysis's source names (the spec holds one id or a list), in step order; none for another
    experiment's artifact."""
    named = source.get("upload", [])
    return named if isinstance(named, list) else [named]


class ExperimentSource(BaseModel):
    """A file of features another experiment kept (a training run's, with save_features)."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(description="the experiment's id")
    artifact: str = Field(TRAINING_FEATURES, description="the name of its artifact of features")
    model: str | None = Field(
        None,
        description="the name of its artifact holding the network (a state_dict): its classifier.weight and "
        "classifier.bias are the classifier and bias",
    )


SOURCE_FORMS = (["upload"], ["experiment"])  # the tags of an analysis's source, as parts of an error's location


def _source_form(source: Any) -> str:
    # A dict when validating, the model when serializing.
    is_experiment = isinstance(source, ExperimentSource) or (isinstance(source, dict) and "experiment" in source)
    return "experiment" if is_experiment else "upload"


Description = Annotated[str, StringConstraints(min_length=1, max_length=200), StorableText]


class AnalysisSpec(SpecBase):
    """The metric catalogue of features computed elsewhere, in float64, from a stored file.

    The file holds ``features`` (N x d, or S x N x d: one slice per checkpoint) and ``labels``,
    optionally ``classifier``, ``bias`` and held-out ``test_features`` / ``test_labels``
    (service/feature_files.py). ``K`` and ``d`` are the file's: the API fills them in at submit.
    ``model``, ``dataset``, ``architecture`` and ``epoch`` describe what was analysed, for search.
    """

    kind: Literal["analysis"]
    source: Annotated[
        Annotated[UploadSource, Tag("upload")] | Annotated[ExperimentSource, Tag("experiment")],
        Discriminator(_source_form),
    ] = Field(description='{"upload": id or [ids]}, or {"experiment": id, "artifact": name}')
    K: int | None = Field(None, ge=2, description="classes; filled in at submit from the file")
    d: int | None = Field(None, ge=1, description="feature dimension; filled in at submit from the file")
    logit_scale: float = Field(1.0, gt=0, le=1000, description="the logits are logit_scale * W h + b")
    normalize_classifier: bool = Field(
        False, description="the classifier's rows on the unit sphere: a normalized network's effective classifier"
    )
    steps: list[int] | None = Field(
        None,
        max_length=MAX_ANALYSIS_STEPS,
        description="the history's step of each checkpoint, increasing (e.g. epochs); default 0, 1, 2, ...",
    )
    model: Description | None = Field(None, description="free text: the model analysed, e.g. vit_b16")
    dataset: Annotated[str, StringConstraints(min_length=1, max_length=32), StorableText] | None = Field(
        None, description="free text: the data set, e.g. imagenet"
    )
    architecture: Annotated[str, StringConstraints(min_length=1, max_length=32), StorableText] | None = Field(
        None, description="free text: the architecture, e.g. vit"
    )
    epoch: int | None = Field(None, ge=0, description="the training epoch the features are from")
    resources: Resources = Field("cpu", description=RESOURCES_DESCRIPTION)

    @field_validator("steps")
    @classmethod
    def _steps_increase(cls, steps: list[int] | None) -> list[int] | None:
        if steps is not None and any(later <= earlier for earlier, later in itertools.pairwise(steps)):
            raise ValueError(f"must increase strictly; got {steps[:20]}")
        if steps is not None and any(step < 0 for step in steps):
            raise ValueError("must be at least 0")
        return steps


ExperimentSpec = Annotated[UFMSpec | TrainSpec | AnalysisSpec, Field(discriminator="kind")]
SPEC_KINDS: tuple[str, ...] = tuple(
    typing.get_args(model.model_fields["kind"].annotation)[0]
    for model in typing.get_args(UFMSpec | TrainSpec | AnalysisSpec)
)


def _storable_json(document: Any) -> Any:
    """Every key and string of a free-form JSON document (a sweep's base, variants, grid) is
    StorableText; each refusal is named by its place (``base.lambda_w``, ``grid.seed.1``)."""
    refusals: list[InitErrorDetails] = []

    def visit(value: Any, place: tuple) -> None:
        if isinstance(value, str):
            try:
                _storable_text(value)
            except PydanticCustomError as refusal:
                refusals.append({"type": refusal, "loc": place, "input": value})
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(key, (*place, key, "[key]"))
                visit(item, (*place, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(item, (*place, index))

    visit(document, ())
    if refusals:
        # pydantic-core places the errors of a ValidationError raised in a validator under the field's own location.
        raise ValidationError.from_exception_data("JSON document", refusals)
    return document


StorableJSON = AfterValidator(_storable_json)

# The user's labels. Tag keys become filter fields (tags.<key>), hence the identifier rule
# (which admits no NUL or surrogate either).
MAX_TAGS = 32
Name = Annotated[str, StringConstraints(min_length=1, max_length=200), StorableText]
TagKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
TagValue = Annotated[str, StringConstraints(max_length=256), StorableText]


def _at_most_max_tags(tags: dict) -> dict:
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags; {len(tags)} given")
    return tags


Tags = Annotated[dict[TagKey, TagValue], AfterValidator(_at_most_max_tags)]

Priority = Annotated[
    int,
    Field(
        ge=-10,
        le=10,
        description="-10..10: the higher runs first among the owner's jobs, and wins ties between owners; "
        "above 0 only for admins",
    ),
]


class LabelledSubmission(BaseModel):
    """A spec with the user's name and tags beside it."""

    model_config = ConfigDict(extra="forbid")

    spec: ExperimentSpec
    name: Name | None = None
    tags: Tags = {}
    priority: Priority = DEFAULT_PRIORITY


def _submission_form(body: Any) -> str:
    return "labelled" if isinstance(body, dict) and "spec" in body else "bare"


# POST /experiments takes a bare spec (as in v1) or {"spec": ..., "name": ..., "tags": ...}.
Submission = Annotated[
    Annotated[LabelledSubmission, Tag("labelled")] | Annotated[ExperimentSpec, Tag("bare")],
    Discriminator(_submission_form),
]


class LabelPatch(BaseModel):
    """PATCH /experiments/{id} and /sweeps/{id}: a new name (null clears it) and tags merged in (a null value
    removes that tag)."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    tags: dict[TagKey, TagValue | None] | None = None


class SearchRequest(BaseModel):
    """POST /experiments/search: the query string's parameters, in a body (for long filters)."""

    model_config = ConfigDict(extra="forbid")

    where: str | None = Field(None, max_length=20_000, description='a filter, e.g. "result.nc1 < 0.1"')
    order_by: str | list[str] | None = Field(None, description="fields, '-' for descending; default -created_at")
    limit: int = Field(50, ge=1, le=500)
    cursor: str | None = None


class QueuePlace(BaseModel):
    """Where a queued experiment stands in its queue (service/scheduler.py's order)."""

    of_owner: int = Field(description="its place among its owner's queued jobs of the queue, from 1")
    owner_queued: int = Field(description="its owner's queued jobs in the queue")
    next_slot_owner: str | None = Field(
        description="the owner the queue's next free slot goes to (null: nothing waits to be sent)"
    )
    text: str = Field(description='the same in words, e.g. "3rd of alice\'s 40; the next slot goes to bob"')


class ExperimentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: Status
    owner: str
    name: str | None
    tags: dict[str, str]
    sweep: str | None
    spec: dict[str, Any]
    progress: float
    result: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    attempts: int
    queue: Resources = Field(description="the queue its messages go to (the spec's resources)")
    priority: Priority = DEFAULT_PRIORITY
    waiting: str | None = Field(
        None, description="why a queued experiment cannot start, e.g. 'no worker serves queue gpu'; else null"
    )
    place: QueuePlace | None = Field(
        None, description="a queued experiment's place in its queue (GET /experiments/{id} and the submit's answer)"
    )
    resumed_from_epoch: int | None = Field(
        None, description="training: the checkpoint's epoch the latest attempt resumed from (none: from the start)"
    )
    environment: dict[str, Any] | None = Field(
        None, description="where the latest attempt ran: versions, device, host, worker"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class SweepOut(BaseModel):
    id: str
    name: str | None
    tags: dict[str, str]
    owner: str
    created_at: datetime
    size: int
    status_counts: dict[str, int]
    progress: float = Field(description="mean over the members; a finished member counts 1")
    members: list[str] = Field(description="the member experiments' ids")


class SweepList(BaseModel):
    items: list[SweepOut]
    next_cursor: str | None


class ExperimentList(BaseModel):
    items: list[ExperimentOut]
    next_cursor: str | None


class MetricHistory(BaseModel):
    """Rows in step order: ``{"step": 0, "loss": ..., "nc1": ..., ...}``."""

    items: list[dict[str, Any]]


class ArtifactOut(BaseModel):
    """A file an experiment kept, as its row in ``artifacts`` records it (service/artifacts.py)."""

    model_config = ConfigDict(from_attributes=True)

    name: str = Field(description="the file's name, e.g. model.safetensors; download it at .../artifacts/{name}")
    bytes: int = Field(description="its size")
    sha256: str = Field(description="the SHA-256 of its bytes, in hex; also the download's ETag")
    media_type: str = Field(description="the download's Content-Type")
    created_at: datetime


class ArtifactList(BaseModel):
    """An experiment's artifacts, ordered by name."""

    items: list[ArtifactOut]


class UploadOut(BaseModel):
    """A file of features uploaded for analysis (POST /uploads): analyse it with ``{"source": {"upload": id}}``."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    bytes: int = Field(description="its size")
    sha256: str = Field(description="the SHA-256 of its bytes, in hex")
    owner: str
    classes: int = Field(description="K: the classifier's rows, or the largest label + 1")
    layout: dict[str, Any] = Field(
        description="what its header shows: format, steps, samples, dim and each tensor's dtype and shape"
    )
    created_at: datetime


class UploadList(BaseModel):
    items: list[UploadOut]
    next_cursor: str | None


class Me(BaseModel):
    """Who the key names (GET /me): the anonymous admin where no keys are set."""

    owner: str
    role: Role


class AuditEntryOut(BaseModel):
    """One change or refusal: who (null for an unknown key), in which role, did what to what, when, from where,
    and the HTTP status it was answered with."""

    id: str
    at: datetime
    owner: str | None
    role: Role | None
    action: Action
    target: str | None = Field(description="the experiment or sweep (a submit's: the one it created)")
    client: str | None = Field(description="the client's address")
    status: int
    detail: str


class AuditList(BaseModel):
    items: list[AuditEntryOut]
    next_cursor: str | None
