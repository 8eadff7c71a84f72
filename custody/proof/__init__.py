"""Proof of collateral: the document built from the ledger and the node (`service`), the
node's answers a verifier needs (`node`), its API route (`endpoints`). The format and the
checks are the kernel's (`pledge/proof.py`), so a verifier runs none of this package's
service code."""
