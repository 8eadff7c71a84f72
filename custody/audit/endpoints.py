"""Audit endpoint: verify the hash chain of the audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from custody.api.deps import (
    PrincipalDep,
    SessionDep,
)
from custody.audit.service import verify_chain
from custody.auth.policy import require_role
from custody.db.models import Role

router = APIRouter(prefix="/v1")


@router.get("/audit/verify", tags=["audit"])
def audit_verify(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    require_role(principal, Role.auditor, Role.admin, Role.bank_approver)
    return verify_chain(session).as_dict()
