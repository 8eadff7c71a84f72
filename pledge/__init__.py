"""The kernel both sides share: networks, keys, collateral descriptors, addresses,
the amount split and the action vocabulary.

Why a separate package: the bank's signer (`hsm/`) must not run the service's code
(`custody/`), or an edit on the service side would silently change what the bank's
key signs. What both must agree on lives here, pure and small, and imports neither
(`tests/test_layers.py` fails otherwise).
"""
