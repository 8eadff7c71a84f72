"""Signing tests: the bank's key with its signer, in process (tests/support/signer_fixtures.py)."""

from support.signer_fixtures import bank_signer, feed, world

__all__ = ["bank_signer", "feed", "world"]
