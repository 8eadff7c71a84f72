"""The PostgreSQL test harness: real server, isolated databases, loopback only."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from regtest.postgres import PostgresError, PostgresNotFound, PostgresServer, find_pg_bin

pytest_plugins = ["regtest.pg_pytest_plugin", "pytester"]

pytestmark = pytest.mark.postgres


def _tcp_refused(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect((host, port))
        except OSError:
            return True
    return False


def _non_loopback_ipv4() -> list[str]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos if not str(info[4][0]).startswith("127.")})


def test_start_two_databases_write_read_stop() -> None:
    server = PostgresServer()
    server.start()
    try:
        assert server.running
        base_dir = server.base_dir
        assert base_dir is not None and (base_dir / "data" / "PG_VERSION").is_file()
        port = server.port
        assert port is not None

        url_a = server.create_database("harness_a")
        url_b = server.create_database("harness_b")
        parsed = make_url(url_a)
        assert parsed.drivername == "postgresql+psycopg"
        assert (parsed.host, parsed.port, parsed.database) == ("127.0.0.1", port, "harness_a")

        engine_a = create_engine(url_a)
        engine_b = create_engine(url_b)
        try:
            with engine_a.begin() as conn:
                conn.execute(text("CREATE TABLE loans (id int PRIMARY KEY, sats bigint)"))
                conn.execute(text("INSERT INTO loans VALUES (1, 2100000000000000)"))
            with engine_a.connect() as conn:
                assert conn.execute(text("SELECT sats FROM loans WHERE id = 1")).scalar_one() == (
                    2_100_000_000_000_000
                )
            # The second database is separate: the table does not exist there.
            with engine_b.connect() as conn:
                tables = conn.execute(
                    text("SELECT count(*) FROM pg_tables WHERE tablename = 'loans'")
                ).scalar_one()
                assert tables == 0
        finally:
            engine_a.dispose()
            engine_b.dispose()
    finally:
        server.stop()

    assert not server.running
    assert not base_dir.exists(), "temp dir must be removed unless keep_data"
    assert _tcp_refused("127.0.0.1", port)


def test_keep_data_leaves_cluster_for_post_mortem() -> None:
    with PostgresServer(keep_data=True) as server:
        base_dir = server.base_dir
        assert base_dir is not None
    try:
        assert (base_dir / "data" / "PG_VERSION").is_file()
        log = (base_dir / "postgres.log").read_text()
        assert "database system is ready to accept connections" in log
        assert "database system is shut down" in log
    finally:
        shutil.rmtree(base_dir)


def test_private_base_dir_only_refused_when_handing_over_to_postgres(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    server = PostgresServer(base_dir=private)
    if os.geteuid() == 0:
        # The cluster runs as 'postgres', which cannot enter a root-only directory.
        with pytest.raises(PostgresError, match="not searchable"):
            server.start()
        assert list(private.iterdir()) == []
    else:
        with server:
            assert server.running


def test_listens_on_loopback_only(postgres_server: PostgresServer) -> None:
    port = postgres_server.port
    assert port is not None
    with postgres_server.connect() as conn:
        row = conn.execute("SHOW listen_addresses").fetchone()
        assert row is not None and row[0] == "127.0.0.1"
        rules = conn.execute(
            "SELECT type, address FROM pg_hba_file_rules WHERE error IS NULL"
        ).fetchall()
    assert rules, "pg_hba.conf has rules"
    for rule_type, address in rules:
        assert rule_type == "local" or address == "127.0.0.1", (rule_type, address)

    # Bound to 127.0.0.1 itself, not 0.0.0.0: even another loopback address is refused.
    assert _tcp_refused("127.0.0.2", port)
    for address in _non_loopback_ipv4():
        assert _tcp_refused(address, port), f"reachable on {address}"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.2", port=port, user="postgres", connect_timeout=2)


def test_rejects_non_loopback_listen_setting(tmp_path: Path) -> None:
    with pytest.raises(PostgresError, match=r"127\.0\.0\.1 only"):
        PostgresServer(base_dir=tmp_path, extra_settings={"listen_addresses": "*"})
    assert list(tmp_path.iterdir()) == []


def test_start_failure_reports_log_tail() -> None:
    server = PostgresServer(extra_settings={"shared_buffers": "lots"})
    with pytest.raises(PostgresError, match="shared_buffers") as excinfo:
        server.start()
    assert "exited with code" in str(excinfo.value)
    server.stop()
    assert not server.running
    assert server.base_dir is None


def test_postgres_url_is_a_fresh_database(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    dbname = make_url(postgres_url).database
    assert dbname is not None and dbname.startswith("t_")
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            user_tables = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            ).scalar_one()
            assert user_tables == 0
            conn.execute(text("CREATE TABLE marker (id int)"))
    finally:
        engine.dispose()
    with postgres_server.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", [dbname]
        ).fetchone()
        assert row == (1,)


def test_missing_binaries_fail_with_clear_message(tmp_path: Path) -> None:
    with pytest.raises(PostgresNotFound, match="has no initdb"):
        find_pg_bin({"PG_BIN": str(tmp_path)})
    with pytest.raises(PostgresNotFound, match="has no initdb"):
        find_pg_bin({"PG_BIN": "/nonexistent"})


def test_fixture_fails_not_skips_without_postgres(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_BIN", "/nonexistent/pg/bin")
    # The test kit is in no installed package: it is found from the repository root.
    repo = str(Path(__file__).resolve().parents[1])
    inherited = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([repo, inherited] if inherited else [repo]))
    pytester.makepyfile(
        """
        def test_needs_db(postgres_url):
            assert postgres_url
        """
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "regtest.pg_pytest_plugin",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*PostgreSQL test server unavailable*PG_BIN=*has no initdb*"])


def test_finds_newest_installed_version() -> None:
    pg_bin = find_pg_bin({})
    assert (pg_bin / "initdb").is_file()
    assert (pg_bin / "postgres").is_file()


def test_rejects_unsafe_database_names(postgres_server: PostgresServer) -> None:
    with pytest.raises(ValueError, match="database name"):
        postgres_server.create_database('x"; DROP DATABASE postgres; --')
