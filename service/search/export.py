"""CSV for every list-like response, written as it is read (constant memory).

An experiment is one row: its columns, ``tags`` as JSON, then ``spec.<field>`` for every
spec field of every kind and ``result.<key>`` for every result key, in catalogue order
(blank where a kind has no such field). Booleans are ``true``/``false``, nulls blank,
lists and objects JSON, floats in Python's shortest round-trip form, and text that a
spreadsheet would run as a formula is quoted (cell()). Rows end in CRLF, as RFC 4180 says
(lines()).
"""

import csv
import io
import json
from collections.abc import Iterable, Iterator
from datetime import datetime

from service.models import Experiment
from service.search.fields import AUDIT_FIELDS, RESULT_FIELDS, RESULT_TYPES, SPEC_FIELDS
from service.search.queries import STATISTICS
from service.search.sql import JSONValue

EXPERIMENT_COLUMNS = [
    "id",
    "status",
    "kind",
    "owner",
    "name",
    "sweep",
    "tags",
    "progress",
    "error",
    "attempts",
    "created_at",
    "started_at",
    "finished_at",
]
SPEC_KEYS = [name.removeprefix("spec.") for name in SPEC_FIELDS]
RESULT_KEYS = list(RESULT_TYPES)
EXPERIMENT_HEADER = EXPERIMENT_COLUMNS + [f"spec.{k}" for k in SPEC_KEYS] + [f"result.{k}" for k in RESULT_KEYS]


# The first characters that make a spreadsheet (Excel, LibreOffice, Google Sheets) read a cell
# as a formula, after OWASP's "CSV Injection" page: a name or tag such as =HYPERLINK(...) would
# otherwise run on the machine of whoever opens the export.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def cell(value) -> str:
    """A value as its CSV cell.

    Text that starts with a formula trigger gets a leading single quote, as OWASP's "CSV
    Injection" page recommends: a spreadsheet then shows it as text. The decision is by
    type, not by the characters: a number (-0.5) stays a number, while text that merely
    looks like one (a name "-5") is quoted. Lists and objects are JSON, which starts with
    [ or { and so is never a formula.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return str(value)


# What an export reads of each experiment: its columns, then every spec and result value
# as JSON writes it (true/false, exact numbers, lists), which the database formats itself.
EXPORT_COLUMNS = (
    [getattr(Experiment, column) for column in EXPERIMENT_COLUMNS]
    + [JSONValue(Experiment.spec, key, "json") for key in SPEC_KEYS]
    + [JSONValue(Experiment.result, key, "json") for key in RESULT_KEYS]
)
# The cells that go through cell(): the experiment's own columns, which the database gives
# typed (text such as the name and the error, the tags, datetimes), and the spec and result
# fields of type string (spec.dataset, result.stop_reason, ...). The other spec and result
# values, numbers and booleans, are written as the database formats them: that is text on
# PostgreSQL, where cell() would take a number "-0.5" for text and quote it.
_TEXT_FIELDS = {name for name, field in (SPEC_FIELDS | RESULT_FIELDS).items() if field.type == "string"}
_FORMATTED = [i for i, name in enumerate(EXPERIMENT_HEADER) if name in EXPERIMENT_COLUMNS or name in _TEXT_FIELDS]


def experiment_row(row: tuple) -> list:
    """A row of EXPORT_COLUMNS as the CSV's cells."""
    cells = list(row)
    for i in _FORMATTED:
        cells[i] = cell(cells[i])
    return cells


def lines(header: list[str], rows: Iterable[list], chunk: int = 500, formatted: bool = False) -> Iterator[str]:
    """The CSV text in pieces of ``chunk`` rows; ``formatted``: the rows need no cell().

    The rows end in RFC 4180's CRLF. Python 3.11's writer quotes a field that holds the
    delimiter, the quote or a character of the line terminator, and no other: with a bare
    "\\n" it would write a carriage return inside a name unquoted, a reader would end the
    row there, and a name "x\\r=SUM(2+2)" would start the next row with a formula.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    for count, row in enumerate(rows, start=1):
        writer.writerow(row if formatted else [cell(value) for value in row])
        if count % chunk == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def audit(rows: Iterable[tuple]) -> Iterator[str]:
    """CSV of audit rows read as queries.AUDIT_COLUMNS, a column each; text (an owner, a detail) made safe by cell()."""
    return lines(list(AUDIT_FIELDS), (list(row) for row in rows))


def experiments(rows: Iterable[tuple]) -> Iterator[str]:
    """CSV of rows read as EXPORT_COLUMNS."""
    return lines(EXPERIMENT_HEADER, (experiment_row(row) for row in rows), formatted=True)


def aggregate(items: list[dict], group_by: list[str], metrics: list[str]) -> Iterator[str]:
    header = group_by + ["count"] + [f"{m}.{s}" for m in metrics for s in STATISTICS]
    rows = (
        [item["group"][g] for g in group_by]
        + [item["count"]]
        + [item["metrics"][m][s] for m in metrics for s in STATISTICS]
        for item in items
    )
    return lines(header, rows)


def curves(items: list[dict], group_by: list[str]) -> Iterator[str]:
    header = [*group_by, "step", "n", "mean", "std", "min", "max"]
    rows = (
        [item["group"][g] for g in group_by] + [p["step"], p["n"], p["mean"], p["std"], p["min"], p["max"]]
        for item in items
        for p in item["points"]
    )
    return lines(header, rows)


def history(rows: list[dict]) -> Iterator[str]:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return lines(keys, ([row.get(k) for k in keys] for row in rows))
