"""`GET /v1/proofs/collateral`: the proof of collateral at a height, for auditors,
compliance officers and admins (the whole book, or one loan's entry with its path), and
for a miner of its own loan only. The ledger is read in short transactions of its own and
the node asked with none open."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from custody.api.deps import PrincipalDep, SettingsDep
from custody.api.errors import errors_for
from custody.auth.policy import ensure_can_view, require_role
from custody.chain.rpc import RpcError
from custody.db.models import Role
from custody.db.session import transaction
from custody.errors import (
    LoanNotFound,
    NodeNotConfigured,
    NodeUnavailable,
    ProofChainMoved,
    ProofHeightNotFollowed,
    RoleNotAllowed,
)
from custody.proof import repository, service
from custody.schemas import ID_MAX
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")

READERS = (Role.auditor, Role.compliance_officer, Role.admin)


@router.get(
    "/proofs/collateral",
    tags=["proof"],
    responses=errors_for(
        NotAuthenticated,
        InvalidInput,
        RoleNotAllowed,
        LoanNotFound,
        ProofHeightNotFollowed,
        ProofChainMoved,
        NodeNotConfigured,
        NodeUnavailable,
        RpcError,
    ),
)
def collateral_proof(
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    loan_id: Annotated[int | None, Query(ge=1, le=ID_MAX)] = None,
    height: Annotated[int | None, Query(ge=0, lt=2**31)] = None,
) -> Response:
    """The `pledge-proof-of-collateral` document (README: "Checking a proof of collateral
    without this project"); a miner gets only its own loan's (`loan_id` required)."""
    engine = request.app.state.engine
    if principal.role == Role.miner:
        if loan_id is None:
            raise RoleNotAllowed("a miner may ask only for its own loan's proof (give loan_id)")
    else:
        require_role(principal, *READERS)
    if loan_id is not None:
        with transaction(engine, write=False) as session:
            ensure_can_view(principal, repository.loan(session, loan_id))
    chain = request.app.state.chain
    if not isinstance(chain, service.ProofNode):
        raise NodeNotConfigured("no Bitcoin node is configured for this service")
    document = service.build(engine, chain, settings.network, height=height, loan_id=loan_id)
    return Response(json.dumps(document), media_type="application/json")
