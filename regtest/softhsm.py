"""Throw-away SoftHSM2 tokens for tests and the demo (never for production keys).

Things SoftHSM2 and python-pkcs11 impose, which shape this module:

- SoftHSM2 reads `SOFTHSM2_CONF` once, at `C_Initialize`, and python-pkcs11
  loads and initialises a module once per process (cached by path). So one
  process can use ONE softhsm2.conf: every token a process needs must live in
  the same token directory, and must be initialised BEFORE the module is first
  loaded (tokens created later are not seen until the module is re-initialised).
  `create_token` refuses to point a process at a second conf after the module
  is loaded, rather than silently using the wrong one.
- `library.reset_on_fork = true` makes SoftHSM2 drop its state in a forked
  child, so the child's `C_Initialize` starts clean (see hsm.pkcs11_backend).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

__all__ = [
    "MODULE_CANDIDATES",
    "SoftHsmMissing",
    "SoftHsmToken",
    "create_token",
    "find_softhsm_module",
    "find_softhsm_util",
]

MODULE_ENV = "SOFTHSM2_MODULE"
CONF_ENV = "SOFTHSM2_CONF"
MODULE_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


class SoftHsmMissing(RuntimeError):
    """SoftHSM2 is not installed (or not where we look); tests must fail on this, not skip."""


@dataclass(frozen=True)
class SoftHsmToken:
    """What a caller needs to open the token; PINs stay hidden in reprs."""

    module_path: str
    label: str
    pin: SecretStr
    so_pin: SecretStr
    conf_path: Path
    token_dir: Path = field(repr=False)


def find_softhsm_module() -> str:
    """`$SOFTHSM2_MODULE`, else the usual Debian/Ubuntu locations."""
    env = os.environ.get(MODULE_ENV)
    if env:
        if not Path(env).is_file():
            raise SoftHsmMissing(f"{MODULE_ENV}={env} does not exist")
        return env
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    raise SoftHsmMissing(
        "SoftHSM2 PKCS#11 module not found (apt-get install softhsm2, or set "
        f"{MODULE_ENV}); looked in: {', '.join(MODULE_CANDIDATES)}"
    )


def find_softhsm_util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHsmMissing("softhsm2-util not found on PATH (apt-get install softhsm2)")
    return util


def _module_loaded(module_path: str) -> bool:
    """Whether python-pkcs11 already holds this module in this process."""
    import pkcs11

    loaded: dict[str, object] = pkcs11._loaded
    real = os.path.realpath(module_path)
    return any(os.path.realpath(path) == real for path in loaded)


def _write_conf(base_dir: Path) -> Path:
    token_dir = base_dir / "tokens"
    token_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = base_dir / "softhsm2.conf"
    if not conf.exists():
        conf.write_text(
            "# throw-away SoftHSM2 config written by regtest.softhsm\n"
            f"directories.tokendir = {token_dir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
            "library.reset_on_fork = true\n",
            encoding="utf-8",
        )
    return conf


def create_token(
    base_dir: Path,
    label: str,
    *,
    pin: str | None = None,
    so_pin: str | None = None,
    set_env: bool = True,
) -> SoftHsmToken:
    """Initialise a fresh token in `base_dir`'s SoftHSM2 config (created if needed).

    With `set_env` (the default) `SOFTHSM2_CONF` is pointed at that config for
    this process; that only works before the module is loaded (see module doc).
    """
    module_path = find_softhsm_module()
    util = find_softhsm_util()
    base_dir = base_dir.resolve()
    conf = _write_conf(base_dir)
    if set_env:
        current = os.environ.get(CONF_ENV)
        if current != str(conf) and _module_loaded(module_path):
            raise RuntimeError(
                f"SoftHSM2 is already loaded in this process with {CONF_ENV}={current}; "
                "python-pkcs11 loads a module once per process, so all tokens must share "
                "that config (create them in the same base_dir, before first use)"
            )
        os.environ[CONF_ENV] = str(conf)
    user_pin = SecretStr(pin if pin is not None else secrets.token_hex(8))
    so = SecretStr(so_pin if so_pin is not None else secrets.token_hex(8))
    env = {**os.environ, CONF_ENV: str(conf)}
    result = subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            so.get_secret_value(),
            "--pin",
            user_pin.get_secret_value(),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        # softhsm2-util does not echo PINs; its stderr is safe to show.
        raise RuntimeError(
            f"softhsm2-util --init-token failed ({result.returncode}): {result.stderr.strip()}"
        )
    return SoftHsmToken(
        module_path=module_path,
        label=label,
        pin=user_pin,
        so_pin=so,
        conf_path=conf,
        token_dir=base_dir / "tokens",
    )
