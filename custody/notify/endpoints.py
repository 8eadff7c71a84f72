"""Webhook endpoints: a party's subscriptions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from custody.api.deps import (
    PartyId,
    PrincipalDep,
    SessionDep,
    SettingsDep,
)
from custody.api.errors import BODY_ERRORS, errors_for
from custody.db.models import Principal, Role
from custody.db.session import transaction
from custody.errors import PartyNotFound, UrlNotAllowed
from custody.netpolicy import Resolver, UrlPolicy, check_url, resolve_host
from custody.notify.outbox import list_webhooks, register_webhook
from custody.notify.schemas import WebhookCreate
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")


def _own_party(principal: Principal, party_id: int) -> None:
    """Webhooks of a party: its own people, or an admin."""
    if principal.role != Role.admin and principal.party_id != party_id:
        raise PartyNotFound()


def _resolver(request: Request) -> Resolver:
    """The DNS lookup webhook hosts are checked with (tests install their own answers as
    `app.state.resolve`)."""
    resolve: Resolver = getattr(request.app.state, "resolve", resolve_host)
    return resolve


@router.post(
    "/parties/{party_id}/webhooks",
    status_code=201,
    tags=["notifications"],
    responses=errors_for(
        NotAuthenticated, InvalidInput, UrlNotAllowed, PartyNotFound, *BODY_ERRORS
    ),
)
def create_webhook(
    party_id: PartyId,
    body: WebhookCreate,
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """The URL's host is looked up (DNS) before the transaction opens, so a slow resolver
    holds no database connection and no write lock."""
    _own_party(principal, party_id)
    urls = UrlPolicy.for_network(settings.network)
    check_url(body.url.strip(), urls, _resolver(request))
    with transaction(request.app.state.engine) as session:
        view = register_webhook(
            session,
            party_id,
            body.url,
            body.secret,
            body.events,
            urls=urls,
            actor=f"{principal.role}:{principal.name}",
        )
    return view.as_dict()


@router.get(
    "/parties/{party_id}/webhooks",
    tags=["notifications"],
    responses=errors_for(NotAuthenticated, InvalidInput, PartyNotFound),
)
def get_webhooks(
    party_id: PartyId, session: SessionDep, principal: PrincipalDep
) -> list[dict[str, Any]]:
    _own_party(principal, party_id)
    return [v.as_dict() for v in list_webhooks(session, party_id)]
