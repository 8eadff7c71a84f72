"""Audit endpoint: verify the hash chain of the audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from custody.api.deps import (
    PrincipalDep,
    SessionDep,
)
from custody.api.errors import errors_for
from custody.audit.service import verify_chain
from custody.auth.policy import require_role
from custody.db.models import Role
from custody.errors import RoleNotAllowed
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")


@router.get(
    "/audit/verify",
    tags=["audit"],
    responses=errors_for(NotAuthenticated, InvalidInput, RoleNotAllowed),
)
def audit_verify(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    require_role(principal, Role.auditor, Role.admin, Role.bank_approver)
    return verify_chain(session).as_dict()
