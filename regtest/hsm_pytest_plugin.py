"""pytest fixtures for a real SoftHSM2 token.

Enable with `pytest_plugins = ["regtest.hsm_pytest_plugin"]`. Part of the test kit, not
of the bank's signer: the product never creates SoftHSM2 tokens, so this ships in no wheel.

The token is session-scoped, so with pytest-xdist each worker process gets its
own token directory and config (SoftHSM2 allows one config per process; see
`regtest.softhsm`). A missing SoftHSM2 makes the fixture raise: tests fail, never skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from hsm.pkcs11_backend import Pkcs11Signer
from regtest.softhsm import SoftHsmToken, create_token


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    """One fresh token per test process (xdist worker)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    base = tmp_path_factory.mktemp(f"softhsm-{worker}")
    return create_token(base, f"pledge-test-{worker}")


@pytest.fixture
def pkcs11_signer(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11Signer]:
    """A logged-in signer on the session token, closed after the test."""
    with Pkcs11Signer(softhsm_token.module_path, softhsm_token.label, softhsm_token.pin) as signer:
        yield signer
