"""The bank's HSM as the service sees it, in either mode:

- in-process (`LocalBankHsm`): the PKCS#11 signer runs in this process; the signing
  boundary (hsm.policy + hsm.boundary) runs here too, fed from the loan's records;
- separate process (`RemoteBankHsm`): `hsm serve` on loopback with its own token,
  its own registry of each loan's addresses (recorded when it made the key), its own
  velocity ledger; it runs the same boundary on its side and trusts nothing we claim
  about where money may go.
"""

from __future__ import annotations

from typing import Any

from hsm.pkcs11_backend import Pkcs11Signer
from hsm.remote import RemoteSigner

LABEL_PREFIX = "pledge-loan:"


class LocalBankHsm:
    mode = "in-process"

    def __init__(self, signer: Any) -> None:
        self.signer = signer
        self.name = str(getattr(signer, "name", "pkcs11"))

    def generate_loan_key(
        self,
        loan_ref: str,
        *,
        network: str,
        miner_return_address: str,
        bank_liquidation_address: str,
    ) -> Any:
        # In-process, the loan's terms are read from the service's records at signing time.
        return self.signer.generate_loan_key(loan_ref)


class RemoteBankHsm:
    mode = "separate"

    def __init__(self, remote: RemoteSigner) -> None:
        self.remote = remote
        self.name = "hsm-serve"

    def generate_loan_key(
        self,
        loan_ref: str,
        *,
        network: str,
        miner_return_address: str,
        bank_liquidation_address: str,
    ) -> Any:
        return self.remote.generate_loan_key(
            loan_ref,
            network=network,
            miner_return_address=miner_return_address,
            bank_liquidation_address=bank_liquidation_address,
        )


BankHsm = LocalBankHsm | RemoteBankHsm


def as_bank_hsm(hsm: Any) -> BankHsm | None:
    """Accept a ready adapter, a remote client or a local digest signer."""
    if hsm is None or isinstance(hsm, LocalBankHsm | RemoteBankHsm):
        return hsm
    if isinstance(hsm, RemoteSigner):
        return RemoteBankHsm(hsm)
    return LocalBankHsm(hsm)


def loan_ref_of(label: str) -> str:
    return label[len(LABEL_PREFIX) :] if label.startswith(LABEL_PREFIX) else label


__all__ = ["BankHsm", "LocalBankHsm", "Pkcs11Signer", "RemoteBankHsm", "as_bank_hsm", "loan_ref_of"]
