"""Miners through the compliance gate in the tests' worlds: the record and its approval
through the real service (`regtest.kyc.approve_miner`, which the benches and the demo use
too) or through the API, as bank staff would. There is no bypass setting."""

from __future__ import annotations

from typing import Any

from regtest.kyc import CLEAN_RECORD, approve_miner

__all__ = ["CLEAN_RECORD", "approve_miner", "approve_miner_via_api"]


def approve_miner_via_api(world: Any, party_id: int, **changes: Any) -> dict[str, Any]:
    """The same through the API: the world's bank operator enters the record, its
    compliance officer approves it. Returns the record as the API shows it."""
    body = {**CLEAN_RECORD, **changes}
    r = world.call("bank_operator", "PUT", f"/v1/parties/{party_id}/miner-record", json=body)
    assert r.status_code == 200, r.text
    r = world.call(
        "compliance_officer",
        "POST",
        f"/v1/parties/{party_id}/miner-record/reviews",
        json={
            "decision": "approve",
            "reason": "registry data checked",
            "digest": r.json()["digest"],
        },
    )
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    assert out["state"] == "approved", out
    return out
