"""PIN handling, concurrency, fork safety, session recovery and lock timeouts."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from embit.ec import PublicKey, Signature

from hsm.pkcs11_backend import Pkcs11Signer
from hsm.signer import SignerBusy, SignerUnavailable
from pledge.errors import UpstreamUnavailable
from regtest.softhsm import SoftHsmToken, create_token

pytestmark = pytest.mark.hsm

WRONG_PIN = "wrong-pin-8d1c44"


def _assert_pin_not_leaked(exc: BaseException, pin: str) -> None:
    chain: BaseException | None = exc
    while chain is not None:
        assert pin not in str(chain) and pin not in repr(chain)
        chain = chain.__cause__ or chain.__context__


def test_wrong_pin_checked_by_token(softhsm_token: SoftHsmToken) -> None:
    # No signer is open here, so the token itself rejects the PIN.
    with pytest.raises(SignerUnavailable) as err:
        Pkcs11Signer(softhsm_token.module_path, softhsm_token.label, WRONG_PIN)
    assert isinstance(err.value, UpstreamUnavailable) and err.value.status_code == 503
    assert "PinIncorrect" in err.value.message
    _assert_pin_not_leaked(err.value, WRONG_PIN)
    _assert_pin_not_leaked(err.value, softhsm_token.pin.get_secret_value())


def test_wrong_pin_refused_while_token_logged_in(
    softhsm_token: SoftHsmToken, pkcs11_signer: Pkcs11Signer
) -> None:
    # PKCS#11 would answer USER_ALREADY_LOGGED_IN without looking at the PIN.
    with pytest.raises(SignerUnavailable) as err:
        Pkcs11Signer(softhsm_token.module_path, softhsm_token.label, WRONG_PIN)
    _assert_pin_not_leaked(err.value, WRONG_PIN)
    # the right PIN joins the existing login, and the first signer still works
    with Pkcs11Signer(
        softhsm_token.module_path, softhsm_token.label, softhsm_token.pin.get_secret_value()
    ) as second:
        info = second.generate_loan_key("loan-pin-join")
    assert pkcs11_signer.public_key(info.key_ref) == info.public_key


def test_pin_not_in_repr(softhsm_token: SoftHsmToken, pkcs11_signer: Pkcs11Signer) -> None:
    pin = softhsm_token.pin.get_secret_value()
    assert pin not in repr(pkcs11_signer)
    assert pin not in repr(softhsm_token)
    assert pin not in str(vars(pkcs11_signer))


def test_missing_module_is_unavailable() -> None:
    with pytest.raises(SignerUnavailable, match="module not found"):
        Pkcs11Signer("/nonexistent/libpkcs11.so", "x", "1234")


def test_unknown_token_is_unavailable(softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(SignerUnavailable, match="NoSuchToken"):
        Pkcs11Signer(softhsm_token.module_path, "no-such-token", softhsm_token.pin)


def test_concurrent_signing_from_four_threads(
    softhsm_token: SoftHsmToken, pkcs11_signer: Pkcs11Signer
) -> None:
    keys = [pkcs11_signer.generate_loan_key(f"loan-thread-{i}") for i in range(4)]
    # a second signer instance on the same token shares the module lock and login
    other = Pkcs11Signer(softhsm_token.module_path, softhsm_token.label, softhsm_token.pin)
    signers = [pkcs11_signer, other, pkcs11_signer, other]
    start = threading.Barrier(4)

    def work(i: int) -> list[tuple[bytes, bytes]]:
        start.wait(timeout=30)
        out = []
        for _ in range(30):
            digest = secrets.token_bytes(32)
            out.append((digest, signers[i].sign_digest(keys[i].key_ref, digest)))
        return out

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(work, range(4)))
    finally:
        other.close()
    assert sum(len(r) for r in results) == 120
    for key, pairs in zip(keys, results, strict=True):
        pub = PublicKey.parse(key.public_key)
        assert all(pub.verify(Signature.parse(der), digest) for digest, der in pairs)
    # closing the second signer did not log out the first
    assert pkcs11_signer.sign_digest(keys[0].key_ref, b"\x07" * 32)


def _child_sign(signer: Pkcs11Signer, key_ref: str, digest: bytes, conn: Connection) -> None:
    try:
        conn.send(("ok", signer.sign_digest(key_ref, digest)))
    except Exception as exc:
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def test_signing_after_fork(pkcs11_signer: Pkcs11Signer) -> None:
    info = pkcs11_signer.generate_loan_key("loan-fork")
    pub = PublicKey.parse(info.public_key)
    # parent has a live session before the fork
    assert pub.verify(
        Signature.parse(pkcs11_signer.sign_digest(info.key_ref, b"\x01" * 32)), b"\x01" * 32
    )

    ctx = multiprocessing.get_context("fork")
    digest = secrets.token_bytes(32)
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_sign, args=(pkcs11_signer, info.key_ref, digest, child_end))
    proc.start()
    child_end.close()
    assert parent_end.poll(60), "child did not answer"
    status, payload = parent_end.recv()
    proc.join(60)
    assert status == "ok", payload
    assert proc.exitcode == 0
    assert pub.verify(Signature.parse(payload), digest)
    # the parent's session survived the child's re-initialisation
    digest2 = secrets.token_bytes(32)
    assert pub.verify(Signature.parse(pkcs11_signer.sign_digest(info.key_ref, digest2)), digest2)


# python-pkcs11 finalises the failed search on the dead session from __del__ and
# reports SessionHandleInvalid as "unraisable": expected here, the session is dead.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_session_reopened_after_pkcs11_error(pkcs11_signer: Pkcs11Signer) -> None:
    info = pkcs11_signer.generate_loan_key("loan-reopen")
    session_before = pkcs11_signer._conn._session
    session_before.close()  # pull the session out from under the signer
    digest = secrets.token_bytes(32)
    der = pkcs11_signer.sign_digest(info.key_ref, digest)
    assert PublicKey.parse(info.public_key).verify(Signature.parse(der), digest)
    assert pkcs11_signer._conn._session is not session_before


def test_lock_timeout_gives_busy(softhsm_token: SoftHsmToken) -> None:
    signer = Pkcs11Signer(
        softhsm_token.module_path, softhsm_token.label, softhsm_token.pin, lock_timeout=0.2
    )
    try:
        info = signer.generate_loan_key("loan-busy")
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with signer._conn.module.lock:
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert held.wait(30)
            with pytest.raises(SignerBusy):
                signer.sign_digest(info.key_ref, b"\x02" * 32)
        finally:
            release.set()
            holder.join(30)
        assert signer.sign_digest(info.key_ref, b"\x02" * 32)
    finally:
        signer.close()


def test_closed_signer_refuses(pkcs11_signer: Pkcs11Signer) -> None:
    info = pkcs11_signer.generate_loan_key("loan-closed")
    pkcs11_signer.close()
    pkcs11_signer.close()  # idempotent
    with pytest.raises(SignerUnavailable, match="closed"):
        pkcs11_signer.sign_digest(info.key_ref, b"\x03" * 32)


def test_second_softhsm_conf_refused_once_loaded(
    pkcs11_signer: Pkcs11Signer, tmp_path: Path
) -> None:
    """SoftHSM2 reads its config once per process: pointing at another one must fail loudly."""
    before = os.environ.get("SOFTHSM2_CONF")
    with pytest.raises(RuntimeError, match="already loaded"):
        create_token(tmp_path, "another-conf")
    assert os.environ.get("SOFTHSM2_CONF") == before
