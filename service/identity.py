"""Who is calling: the owner and the role an API key names (NCLAB_API_KEYS).

An entry is ``owner:key[:role]``; a bare ``key`` belongs to owner ``anonymous``; the role is
``member`` when absent, so the older ``owner:key`` entries keep working. With no keys at
all there is no authentication, and every caller is the anonymous admin (a single user's
embedded service).
"""

from typing import Literal, NamedTuple, get_args

Role = Literal["reader", "member", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
DEFAULT_ROLE: Role = "member"
ANONYMOUS = "anonymous"


class Caller(NamedTuple):
    owner: str
    role: Role


NO_KEYS_CALLER = Caller(ANONYMOUS, "admin")


class InvalidKeyEntry(ValueError):
    pass


def parse_entry(entry: str) -> tuple[str, Caller]:
    """``owner:key[:role]`` (or a bare key) -> (key, its caller)."""
    parts = [part.strip() for part in entry.split(":")]
    role: str = DEFAULT_ROLE
    if len(parts) >= 3 and parts[-1] in ROLES:
        role = parts.pop()
    if len(parts) > 2 or not parts[-1]:
        raise InvalidKeyEntry(f"{entry!r} is not 'owner:key[:role]' with role one of {', '.join(ROLES)}")
    key = parts[-1]
    owner = parts[0] if len(parts) == 2 and parts[0] else ANONYMOUS
    return key, Caller(owner, role)  # type: ignore[arg-type]  # role is one of ROLES, checked above


def parse_entries(text: str) -> dict[str, Caller]:
    """Comma- or newline-separated entries -> key -> caller (a later entry for the same key wins)."""
    entries = (part.strip() for line in text.splitlines() for part in line.split(","))
    return dict(parse_entry(entry) for entry in entries if entry)
