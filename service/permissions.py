"""Who may do what: the one rule of the roles (DESIGN.md, "Identity, roles and scheduling").

- ``reader``: reads everything, changes nothing;
- ``member``: reads everything, submits (experiments, sweeps, uploads), and cancels, relabels or deletes what
  it owns;
- ``admin``: everything, others' work and the audit included, and a priority above the default.

Every route and dashboard page that changes something asks ``check`` (or ``may``, to
decide what to show) with its action, and the refusal it raises names the caller's owner
and role and what it may not do.
"""

from typing import Literal, get_args

from starlette.exceptions import HTTPException

from service.identity import Caller

# What a request does, as the audit records it: a change to an experiment or a sweep, the
# audit's read, or any other read (a refused one is recorded too).
Action = Literal[
    "experiment.submit",
    "experiment.cancel",
    "experiment.relabel",
    "sweep.submit",
    "sweep.cancel",
    "sweep.relabel",
    "upload.submit",
    "upload.delete",
    "audit.read",
    "read",
]
ACTIONS: tuple[str, ...] = get_args(Action)
# A job's priority orders an owner's own queued jobs and breaks ties between owners (service/scheduler.py);
# above the default only for admins (check_priority).
DEFAULT_PRIORITY = 0
# The actions on work that someone owns: a member may take them on its own work only.
_ON_OWNED_WORK = {"experiment.cancel", "experiment.relabel", "sweep.cancel", "sweep.relabel", "upload.delete"}


class Forbidden(HTTPException):
    """A 403 whose detail names the caller's owner and role, and what it may not do."""

    def __init__(
        self,
        caller: Caller,
        action: Action,
        target: str | None = None,
        owner: str | None = None,
        *,
        what: str | None = None,
        why: str | None = None,
    ):
        noun, _, verb = action.partition(".")
        what = (
            what
            or {
                "experiment.submit": "submit experiments",
                "sweep.submit": "submit sweeps",
                "upload.submit": "upload files",
                "audit.read": "read the audit",
            }.get(action)
            or f"{verb} {noun} {target}"
        )
        if why is None and caller.role == "reader":
            why = "a reader only reads"
        elif why is None:
            why = f"it is {owner}'s" if action in _ON_OWNED_WORK else "only an admin may"
        super().__init__(403, f"{caller.owner} ({caller.role}) may not {what}: {why}")


def may(caller: Caller, action: Action, owner: str | None = None) -> bool:
    """Whether the caller may take the action (on work that ``owner`` owns, for a cancel or a relabel)."""
    if caller.role == "admin" or action == "read":
        return True
    if caller.role == "reader" or action == "audit.read":
        return False
    return action not in _ON_OWNED_WORK or owner == caller.owner


def check(caller: Caller, action: Action, target: str | None = None, owner: str | None = None) -> None:
    """Nothing if the caller may take the action; else Forbidden."""
    if not may(caller, action, owner):
        raise Forbidden(caller, action, target, owner)


def check_priority(caller: Caller, action: Action, priority: int) -> None:
    """A submit's priority above the default is for admins; else Forbidden, naming the priority."""
    if priority > DEFAULT_PRIORITY and caller.role != "admin":
        raise Forbidden(
            caller,
            action,
            what=f"submit with priority {priority}",
            why=f"a priority above {DEFAULT_PRIORITY} is for admins",
        )
