"""Schema migrations (Alembic), run in-process so the CLI, the tests and the demo
all build the schema the same way production does."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


# Advisory lock key reserved for schema migrations (PostgreSQL).
_PG_MIGRATE_LOCK = 0x5C0A_0D1B


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Every process runs this at start, so two may run it at the same instant: the
    second waits for the first and then finds the schema at its revision. PostgreSQL:
    a transaction-level advisory lock taken before Alembic reads its version table
    (the migration's DDL and the version commit with the lock's release). SQLite: the
    write transaction's BEGIN IMMEDIATE holds the database for the same span."""
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATE_LOCK}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
