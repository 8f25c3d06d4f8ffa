"""An analysis's source, looked up at submit: the files exist, agree with each other, and give K and d.

A spec of kind ``analysis`` names uploads (service/api/routes/uploads.py) or another
experiment's artifact. What their headers show is known here, before anything is queued: a
missing upload or artifact, files that disagree (another d, another classifier's K), or
``steps`` that do not count the checkpoints are a 422 at submit naming the field. K and d are
written into the stored spec (the typed columns and spec.K / spec.d of the filter language).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TypeVar

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from service.artifacts import get_store
from service.feature_files import BadFeatureFile, Layout, count_classes, inspect, network_classifier
from service.models import Artifact, Experiment, Upload
from service.schemas import TERMINAL_STATUSES, upload_ids

T = TypeVar("T")


class InvalidSource(ValueError):
    """The source of an analysis cannot be analysed: ``field`` of the spec, and why."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class SourceFile:
    """One file of an analysis's source, as its header shows it."""

    layout: dict
    classes: int


def resolve(session: Session, spec: dict) -> dict:
    """The spec with K and d filled in from its source's files, or InvalidSource."""
    files = source_files(session, spec["source"])
    dims = {file.layout["dim"] for file in files}
    if len(dims) > 1:
        raise InvalidSource("source.upload", f"the files' features have different dimensions {sorted(dims)}")
    classifier_classes = {file.classes for file in files if "classifier" in file.layout["tensors"]}
    if len(classifier_classes) > 1:
        raise InvalidSource("source.upload", f"the files' classifiers have different K {sorted(classifier_classes)}")
    num_classes = spec["K"] or max(file.classes for file in files)
    if classifier_classes and num_classes not in classifier_classes:
        raise InvalidSource("K", f"{num_classes}, but the classifier has {classifier_classes.pop()} rows")
    if num_classes < 2:
        raise InvalidSource("K", f"the labels name {num_classes} class; the catalogue needs at least 2")
    steps = sum(file.layout["steps"] for file in files)
    if spec["steps"] is not None and len(spec["steps"]) != steps:
        raise InvalidSource("steps", f"{len(spec['steps'])} steps given; the source holds {steps} checkpoints")
    (dim,) = dims
    if spec["d"] is not None and spec["d"] != dim:
        raise InvalidSource("d", f"{spec['d']}, but the features have dimension {dim}")
    return {**spec, "K": num_classes, "d": dim}


def source_files(session: Session, source: dict) -> list[SourceFile]:
    """The files a source names, in step order."""
    if "upload" in source:
        files = []
        for upload_id in upload_ids(source):
            upload = session.get(Upload, upload_id)
            if upload is None:
                raise InvalidSource("source.upload", f"no upload with id {upload_id!r}")
            files.append(SourceFile(upload.layout, upload.classes))
        return files
    experiment_id, name = source["experiment"], source["artifact"]
    store = get_store()
    layout, classes = _read_artifact(session, store, experiment_id, name, "source.artifact", _layout_and_classes)
    model = source.get("model")
    if model is None:
        return [SourceFile(layout.describe(), classes)]
    tensors = _read_artifact(
        session, store, experiment_id, model, "source.model", lambda file, size: network_classifier(file, size, layout)
    )
    with_classifier = Layout(layout.format, tensors, layout.steps, layout.samples, layout.dim)
    return [SourceFile(with_classifier.describe(), tensors["classifier"].shape[-2])]


def _read_artifact(
    session: Session, store, experiment_id: str, name: str, field: str, read: Callable[[IO[bytes], int], T]
) -> T:
    """``read(file, size)`` of one of the experiment's artifacts, or InvalidSource on ``field``: no such artifact,
    its file missing from the store, or a file that breaks a rule."""
    if session.get(Artifact, (experiment_id, name)) is None:
        raise InvalidSource(field, f"experiment {experiment_id!r} has no artifact named {name!r}")
    try:
        with store.open(experiment_id, name) as file:
            return read(file, store.size(experiment_id, name))
    except FileNotFoundError:
        raise InvalidSource(field, f"the file of artifact {name!r} is missing from the store") from None
    except BadFeatureFile as exc:
        raise InvalidSource(field, f"{name}: {exc}") from None


def _layout_and_classes(file: IO[bytes], size: int) -> tuple[Layout, int]:
    layout = inspect(file, size)
    return layout, count_classes(file, layout)


class UploadDeleted(InvalidSource):
    """An upload that analysis ``index`` of a submit names was deleted after its source was looked up."""

    def __init__(self, index: int, upload_id: str):
        super().__init__("source.upload", f"upload {upload_id!r} was deleted while this was submitted")
        self.index = index


def hold_uploads(connection: Connection | Session, specs: list[dict]) -> None:
    """Check, in the transaction that stores these specs and after their rows are written, that the uploads their
    analyses name are still there, and keep them from being deleted until it commits; UploadDeleted otherwise.

    A delete (service/api/routes/uploads.py) removes the upload's row first and then looks for unfinished
    readers, so one of the two transactions waits for the other: on PostgreSQL for the row's lock (FOR SHARE
    here), on SQLite for the database's write lock, which the rows written before this took. Either the delete
    sees this analysis and refuses (409), or this finds the upload gone: no analysis is queued on a deleted file.
    """
    named = [
        (index, upload_id)
        for index, spec in enumerate(specs)
        if spec["kind"] == "analysis"
        for upload_id in upload_ids(spec["source"])
    ]
    if not named:
        return
    wanted = sorted({upload_id for _, upload_id in named})
    present = set(
        connection.execute(select(Upload.id).where(Upload.id.in_(wanted)).with_for_update(read=True)).scalars()
    )
    for index, upload_id in named:
        if upload_id not in present:
            raise UploadDeleted(index, upload_id)


def unfinished_readers(session: Session, upload_id: str) -> list[str]:
    """The ids of the queued or running analyses whose source names the upload."""
    unfinished = session.execute(
        select(Experiment.id, Experiment.spec).where(
            Experiment.kind == "analysis", Experiment.status.not_in(TERMINAL_STATUSES)
        )
    )
    return [experiment_id for experiment_id, spec in unfinished if upload_id in upload_ids(spec["source"])]
