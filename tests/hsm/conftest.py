"""HSM tests. Fixtures `softhsm_token` and `pkcs11_signer` come from `hsm.pytest_plugin`,
registered in the top-level tests/conftest.py (pytest refuses `pytest_plugins` in a
non-top-level conftest during a full run). To run these tests alone:

    .venv/bin/pytest --confcutdir=tests/hsm -p hsm.pytest_plugin tests/hsm
"""
