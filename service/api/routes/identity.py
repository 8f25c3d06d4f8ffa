"""/me: who the presented key names, and its role."""

from service.api.deps import CallerDep, api_router
from service.schemas import Me

router = api_router("", "identity")


@router.get("/me", response_model=Me)
def me(caller: CallerDep) -> Me:
    return Me(owner=caller.owner, role=caller.role)
