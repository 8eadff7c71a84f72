"""`pledge-hwi`: the miner's (or arbiter's) tool for their own machine and hardware wallet.

It signs a signing request's PSBT on the device, registers a loan's multisig wallet on
it (or says how, per device type), or shows a loan's collateral address on the device's
screen to compare before depositing. It talks to the custody API over
HTTP(S) and imports only the kernel (`pledge/`) and third-party libraries, never the
service (`custody/`) or the bank's signer (`hsm/`): a party checking the bank must not run
the bank's code (pyproject.toml's import-linter contract and tests/test_layers.py check).
"""
