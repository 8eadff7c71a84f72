"""docker-compose.yml is checked against the code, since no Docker engine runs it here.

A typo in a variable name or a command that no longer exists would otherwise only
show up at deployment time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from pydantic import AliasChoices

from custody.cli import app
from custody.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

SERVICE_COMMANDS = {"api": "serve", "watcher": "watch", "risk": "risk", "notify": "notify"}
# Fields whose defaults are only right for a developer laptop: deployment must set them.
REQUIRED_FIELDS = {"database_url", "network", "node_rpc_url", "node_rpc_user", "node_rpc_password"}
SECRET_VARS = {"CUSTODY_NODE_RPC_PASSWORD", "CUSTODY_HSM_SERVE_TOKEN"}
BITCOIN_CORE_IMAGES = ("bitcoin/bitcoin", "lncm/bitcoind", "ruimarinho/bitcoin-core")

_INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    service = compose["services"][name]
    assert isinstance(service, dict)
    return service


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # ["KEY=value", ...] form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _interpolate(value: str) -> str:
    """Resolve compose's ${VAR:-default} / ${VAR:?err} as a deployment with a full .env would."""

    def repl(match: re.Match[str]) -> str:
        if match["op"] in (":-", "-"):
            return match["arg"]
        return f"value-of-{match['name'].lower()}"

    return _INTERPOLATION.sub(repl, value)


def _settings_env_names() -> dict[str, set[str]]:
    """Environment names each Settings field is read from (pydantic-settings rules)."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: dict[str, set[str]] = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            choices = {c for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            choices = {alias}
        else:
            choices = {f"{prefix}{field_name}"}
        names[field_name] = {c.upper() for c in choices}
    return names


def _cli_command_names() -> set[str]:
    # Typer 0.29 vendors its own click, so duck-type the group instead of isinstance.
    command = typer.main.get_command(app)
    subcommands = getattr(command, "commands", None)
    if isinstance(subcommands, dict):
        return {str(name) for name in subcommands}
    return {command.name or ""}


def test_compose_has_the_four_services(compose: dict[str, Any]) -> None:
    assert {"bitcoind", "postgres", "api", "watcher"} <= set(compose["services"])


@pytest.mark.parametrize(("service_name", "subcommand"), sorted(SERVICE_COMMANDS.items()))
def test_service_runs_an_existing_cli_command(
    compose: dict[str, Any], service_name: str, subcommand: str
) -> None:
    assert _command(_service(compose, service_name)) == ["custody", subcommand]
    assert subcommand in _cli_command_names(), f"`custody {subcommand}` is not a CLI command"


@pytest.mark.parametrize("service_name", sorted(SERVICE_COMMANDS))
def test_service_env_matches_settings(compose: dict[str, Any], service_name: str) -> None:
    env = _environment(_service(compose, service_name))
    by_field = _settings_env_names()
    known = set().union(*by_field.values())

    ours = {k for k in env if k.startswith("CUSTODY_") or k == "DATABASE_URL"}
    assert ours, "no service variables at all"
    assert ours <= known, f"not fields of custody.config.Settings: {sorted(ours - known)}"
    unset = {f for f in REQUIRED_FIELDS if not by_field[f] & set(env)}
    assert not unset, f"{service_name} must set {sorted(unset)}"


@pytest.mark.parametrize("service_name", sorted(SERVICE_COMMANDS))
def test_service_env_loads_into_settings(
    compose: dict[str, Any], service_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values parse (types, Literal network) and point at the compose services."""
    for key in list(os.environ):
        if key.upper().startswith("CUSTODY_") or key.upper() == "DATABASE_URL":
            monkeypatch.delenv(key)
    for key, value in _environment(_service(compose, service_name)).items():
        monkeypatch.setenv(key, _interpolate(value))

    settings = Settings()
    assert settings.network == "mainnet"
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in settings.database_url
    assert settings.node_rpc_url == "http://bitcoind:8332"
    assert settings.node_rpc_password.get_secret_value() == "value-of-custody_node_rpc_password"
    if service_name == "api":
        assert settings.api_host == "0.0.0.0"
        assert settings.api_port == 8080


@pytest.mark.parametrize("service_name", sorted(SERVICE_COMMANDS))
def test_secrets_come_from_env_file_not_compose(compose: dict[str, Any], service_name: str) -> None:
    env = _environment(_service(compose, service_name))
    for var in SECRET_VARS:
        assert re.fullmatch(rf"\$\{{{var}:\?[^}}]+\}}", env[var]), f"{var} must be ${{{var}:?..}}"
    assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"]
    postgres_env = _environment(_service(compose, "postgres"))
    assert postgres_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_node_is_bitcoin_core_not_btcd(compose: dict[str, Any]) -> None:
    node = _service(compose, "bitcoind")
    image = str(node["image"])
    assert "btcd" not in image
    assert image.split(":")[0] in BITCOIN_CORE_IMAGES, image
    args = _command(node)
    assert "-txindex=1" in args
    assert any(a.startswith("-rpcauth=${") for a in args), "rpcauth comes from .env"
    assert not any(a.startswith(("--", "-rpcpassword")) for a in args), args


def test_published_ports_are_loopback_only(compose: dict[str, Any]) -> None:
    published: dict[str, list[Any]] = {
        name: svc.get("ports", []) for name, svc in compose["services"].items()
    }
    assert published["api"], "the API is published"
    for name, ports in published.items():
        for port in ports:
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
    assert not published["postgres"] and not published["bitcoind"]
    assert "127.0.0.1:8080:8080" in [str(p) for p in published["api"]]


def test_backend_network_is_internal(compose: dict[str, Any]) -> None:
    assert compose["networks"]["backend"]["internal"] is True
    assert _service(compose, "postgres")["networks"] == ["backend"]
    assert _service(compose, "watcher")["networks"] == ["backend"]


def test_dockerfile_is_slim_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert "pip wheel" in text or "pip install ." in text
