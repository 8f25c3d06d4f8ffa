"""Each spec of the API and its engine's config declare the same fields, with the same defaults.

A spec (service/schemas.py: UFMSpec, TrainSpec) is what users submit and what a job runs
with; its engine's config (worker/nc: UFMProblem, TrainConfig) is what the engine takes,
from a job or from a notebook. Neither can be derived from the other: worker/nc imports
neither pydantic nor the service, and the service never imports the worker. So each field
is declared twice, and these tests hold the two declarations to each other, through the
renames and exclusions of worker.runners, which are also what jobs go through.
"""

import dataclasses

import pydantic
import pytest

from service.schemas import TrainSpec, UFMSpec
from worker.nc.train import TrainConfig
from worker.nc.ufm_problem import UFMProblem
from worker.runners import NOT_FOR_THE_ENGINE, RENAMED, engine_config

PAIRS = [(UFMSpec, UFMProblem), (TrainSpec, TrainConfig)]
PAIR_IDS = [spec_model.__name__ for spec_model, _ in PAIRS]

# The smallest valid spec of each kind: only the fields that have no default.
MINIMAL_SPECS = {UFMSpec: {"kind": "ufm", "K": 4, "d": 3, "n_per_class": 5},
                 TrainSpec: {"kind": "train", "dataset": "digits"}}

# Spec defaults that validation replaces by a value computed from other fields, so that a
# validated spec always carries a value: the engine requires that value instead of guessing.
FILLED_IN_BY_VALIDATION = {(TrainSpec, "K")}  # None: all of the data set's classes

# How "no default" reads in a failure message.
REQUIRED = "(required)"


def config_name(spec_field: str) -> str:
    return RENAMED.get(spec_field, spec_field)


def engine_fields(spec_model: type[pydantic.BaseModel]) -> list[str]:
    """The spec's fields that its engine is given."""
    return [name for name in spec_model.model_fields if name not in NOT_FOR_THE_ENGINE]


def config_fields(config_type) -> dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(config_type)}


@pytest.mark.parametrize(("spec_model", "config_type"), PAIRS, ids=PAIR_IDS)
def test_every_spec_field_has_a_config_field(spec_model, config_type):
    """Or is declared not for the engine: no field is accepted from users and then ignored."""
    unwired = [name for name in engine_fields(spec_model) if config_name(name) not in config_fields(config_type)]
    assert unwired == [], (f"{spec_model.__name__} fields without a {config_type.__name__} field: give the config one, "
                           "or declare them in worker.runners.RENAMED or NOT_FOR_THE_ENGINE")


@pytest.mark.parametrize(("spec_model", "config_type"), PAIRS, ids=PAIR_IDS)
def test_every_config_field_has_a_spec_field(spec_model, config_type):
    """A config field no spec sets would be an engine setting that jobs cannot choose."""
    from_spec = {config_name(name) for name in engine_fields(spec_model)}
    assert config_fields(config_type).keys() - from_spec == set()


def test_the_renamed_and_excluded_fields_are_spec_fields():
    """No stale entries: each name the runners declare is a field of some spec."""
    spec_fields = {name for spec_model, _ in PAIRS for name in spec_model.model_fields}
    assert (RENAMED.keys() | NOT_FOR_THE_ENGINE) - spec_fields == set()


def spec_default(spec_model, name: str):
    """The default the engine must have for spec field `name`."""
    field = spec_model.model_fields[name]
    if field.is_required() or (spec_model, name) in FILLED_IN_BY_VALIDATION:
        return REQUIRED
    return field.default


def config_default(field: dataclasses.Field):
    return REQUIRED if field.default is dataclasses.MISSING else field.default


def field_pairs():
    """One case per spec field the engine is given (the unwired ones fail the tests above)."""
    for spec_model, config_type in PAIRS:
        fields = config_fields(config_type)
        for name in engine_fields(spec_model):
            if config_name(name) not in fields:
                continue
            yield pytest.param(spec_model, name, fields[config_name(name)], id=f"{spec_model.__name__}.{name}")


@pytest.mark.parametrize(("spec_model", "name", "config_field"), list(field_pairs()))
def test_a_config_default_is_the_spec_default(spec_model, name, config_field):
    """A notebook run and a job from the same settings are the same run."""
    in_the_engine, in_the_api = config_default(config_field), spec_default(spec_model, name)
    assert in_the_engine == in_the_api


@pytest.mark.parametrize(("spec_model", "config_type"), PAIRS, ids=PAIR_IDS)
def test_a_spec_field_with_no_config_field_fails_the_job_naming_it(spec_model, config_type):
    extended = pydantic.create_model(f"Extended{spec_model.__name__}", __base__=spec_model,
                                     new_field=(int, 3), other_new_field=(str, "x"))
    spec = extended.model_validate(MINIMAL_SPECS[spec_model]).model_dump(mode="json")
    with pytest.raises(TypeError, match=rf"^{config_type.__name__} has no field for the spec field\(s\) "
                                        r"new_field, other_new_field: "):
        engine_config(config_type, spec)


def test_a_default_ufm_spec_maps_to_the_problem_it_implies():
    spec = UFMSpec.model_validate(MINIMAL_SPECS[UFMSpec]).model_dump(mode="json")
    # The normalization is given: UFMProblem has no default for it (see above).
    assert engine_config(UFMProblem, spec) == UFMProblem(num_classes=4, dim=3, n_per_class=5,
                                                         normalization="normalized")


def test_a_default_train_spec_maps_to_the_config_it_implies():
    spec = TrainSpec.model_validate(MINIMAL_SPECS[TrainSpec]).model_dump(mode="json")
    # K's default is all of the data set's classes: digits has 10.
    assert engine_config(TrainConfig, spec) == TrainConfig(dataset="digits", num_classes=10)
