"""Pledge custody: Bitcoin loan collateral in 2-of-3 multisig escrow."""
