"""A throwaway PostgreSQL server for tests, in the style of Bitcoin Core's TestNode.

Each test worker gets its own cluster in a temp dir, listening on 127.0.0.1 only,
so tests never touch (or depend on) the system PostgreSQL service and can run in
parallel. As root the cluster belongs to the ``postgres`` system user, because
``initdb``/``postgres`` refuse to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from regtest.wait import wait_until

__all__ = [
    "DEFAULT_TIMEOUT",
    "PostgresError",
    "PostgresNotFound",
    "PostgresServer",
    "find_pg_bin",
    "wait_until",
]

DEFAULT_TIMEOUT = 60.0
SUPERUSER = "postgres"
SYSTEM_USER = "postgres"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_POLL_INTERVAL = 0.05


class PostgresError(RuntimeError):
    """The test server could not be set up, started or used."""


class PostgresNotFound(PostgresError):
    """No PostgreSQL binaries: a missing component must fail tests, not skip them."""


def _version_key(path: str) -> tuple[int, ...]:
    """Sort ``/usr/lib/postgresql/<ver>/bin`` numerically (so 16 beats 9.6)."""
    version = Path(path).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_pg_bin(env: dict[str, str] | None = None) -> Path:
    """Directory holding initdb/postgres/pg_ctl: ``$PG_BIN``, else newest Debian install."""
    environ = os.environ if env is None else env
    override = environ.get("PG_BIN")
    if override:
        candidate = Path(override)
        if not (candidate / "initdb").is_file():
            raise PostgresNotFound(f"PG_BIN={override} has no initdb")
        return candidate
    found = sorted(
        (d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.isfile(f"{d}/initdb")),
        key=_version_key,
    )
    if found:
        return Path(found[-1])
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresNotFound(
        "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb, "
        "no initdb on PATH, PG_BIN unset). Run `make test` (its bootstrap installs the "
        "Debian `postgresql` package) or `apt-get install postgresql`."
    )


def _free_loopback_port() -> int:
    """A port nobody listens on right now; the start loop retries if we lose a race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL cluster in a temp dir; ``start()``/``stop()`` or use as a context manager."""

    def __init__(
        self,
        *,
        pg_bin: Path | str | None = None,
        base_dir: Path | str | None = None,
        keep_data: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        extra_settings: dict[str, str] | None = None,
    ) -> None:
        self.pg_bin = Path(pg_bin) if pg_bin is not None else find_pg_bin()
        self.keep_data = keep_data
        self.timeout = timeout
        self.extra_settings = dict(extra_settings or {})
        if self.extra_settings.get("listen_addresses", "127.0.0.1") != "127.0.0.1":
            raise PostgresError("test servers listen on 127.0.0.1 only")
        self._base_parent = Path(base_dir) if base_dir is not None else None
        self.base_dir: Path | None = None
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._as_root = os.geteuid() == 0
        self._run_as: dict[str, Any] = {}
        if self._as_root:
            try:
                entry = pwd.getpwnam(SYSTEM_USER)
            except KeyError as exc:
                raise PostgresNotFound(
                    f"running as root but there is no '{SYSTEM_USER}' system user to own "
                    "the cluster (install the Debian `postgresql` package)"
                ) from exc
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            # Same effect as `setpriv --reuid --regid --clear-groups`, without a wrapper
            # process between us and the server (so terminate() reaches postgres itself).
            self._run_as = {"user": self._uid, "group": self._gid, "extra_groups": []}

    # -- paths -------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        if self.base_dir is None:
            raise PostgresError("server has not been started")
        return self.base_dir / name

    @property
    def data_dir(self) -> Path:
        return self._dir("data")

    @property
    def socket_dir(self) -> Path:
        return self._dir("sock")

    @property
    def log_file(self) -> Path:
        return self._dir("postgres.log")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """initdb, then start the server and wait until it accepts connections."""
        if self._proc is not None:
            raise PostgresError("server already started")
        self._make_dirs()
        self._initdb()
        attempts = 5
        for attempt in range(attempts):
            self.port = _free_loopback_port()
            self._launch()
            try:
                self._wait_ready()
                return
            except PostgresError:
                # Another worker may have grabbed the port between probe and bind.
                lost_race = "could not bind" in self.log_tail() or "in use" in self.log_tail()
                self._kill()
                if not lost_race or attempt == attempts - 1:
                    raise

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions), then delete the temp dir unless kept."""
        if self._proc is not None:
            if self._proc.poll() is None:
                result = self._run(
                    [
                        "pg_ctl",
                        "stop",
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        str(int(self.timeout)),
                    ],
                    check=False,
                )
                if result.returncode != 0:
                    self._proc.terminate()
            try:
                self._proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._kill()
            self._proc = None
        if self.base_dir is not None and not self.keep_data:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    # -- databases ---------------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL for ``dbname`` over TCP on loopback (trust auth: no password)."""
        if self.port is None:
            raise PostgresError("server has not been started")
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A plain psycopg connection (the caller closes it)."""
        if self.port is None:
            raise PostgresError("server has not been started")
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            connect_timeout=5,
            **kwargs,
        )

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create a database and return its SQLAlchemy URL: empty, or a copy of `template`.

        A copy is how tests get a migrated schema cheaply: PostgreSQL copies the template's
        files instead of running the migrations again. Nobody may be connected to the
        template while it is copied (PostgreSQL refuses)."""
        self._check_name(name)
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        with self.connect(autocommit=True) as conn:
            if template is not None:
                self._check_name(template)
                query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
                if conn.info.server_version >= 150000:
                    # Copying files beats WAL-logging every page here (fsync is off, so
                    # the checkpoint it costs is cheap): ~25 ms instead of ~175 ms.
                    query = sql.SQL("{} STRATEGY FILE_COPY").format(query)
            conn.execute(query)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database even if a test leaked connections to it."""
        self._check_name(name)
        with self.connect(autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    @staticmethod
    def _check_name(name: str) -> None:
        if not _DB_NAME.match(name):
            raise ValueError(f"database name must match {_DB_NAME.pattern}: {name!r}")

    # -- diagnostics -------------------------------------------------------------------
    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except (OSError, PostgresError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ---------------------------------------------------------------------
    def _check_traversable(self, path: Path) -> None:
        """As root, the postgres user must be able to reach the temp dir (pytest's are 0700)."""
        for parent in [path, *path.parents]:
            st = parent.stat()
            if st.st_uid != self._uid and not st.st_mode & 0o001:
                raise PostgresError(
                    f"{parent} is not searchable by the '{SYSTEM_USER}' user that runs the "
                    "test cluster; use a base_dir under a world-searchable directory like /tmp"
                )

    def _make_dirs(self) -> None:
        parent = self._base_parent or Path(tempfile.gettempdir())
        if self._as_root:
            self._check_traversable(parent.resolve())
        self.base_dir = Path(tempfile.mkdtemp(prefix="custody-pg-", dir=parent))
        for sub in ("data", "sock"):
            (self.base_dir / sub).mkdir(mode=0o700)
        self.log_file.touch(mode=0o600)
        if self._as_root:
            for path in (self.base_dir, self.data_dir, self.socket_dir, self.log_file):
                os.chown(path, self._uid, self._gid)

    def _run(self, args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.pg_bin / args[0]), *args[1:]]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=self.base_dir,
            env=self._env(),
            timeout=self.timeout,
            check=False,
            **self._run_as,
        )
        if check and result.returncode != 0:
            raise PostgresError(
                f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"LC_ALL": "C", "LANG": "C", "TZ": "UTC"})
        if self.base_dir is not None:
            env["HOME"] = str(self.base_dir)
        return env

    def _initdb(self) -> None:
        self._run(
            [
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ]
        )
        # Only loopback TCP and our private socket; nothing else may even try.
        hba = (
            "# written by regtest.postgres: loopback only\n"
            "local all all trust\n"
            "host  all all 127.0.0.1/32 trust\n"
        )
        hba_path = self.data_dir / "pg_hba.conf"
        hba_path.write_text(hba)
        if self._as_root:
            os.chown(hba_path, self._uid, self._gid)

    def _settings(self) -> dict[str, str]:
        assert self.port is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            # Durability is pointless for a throwaway cluster; speed is not.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            # Two `custody serve` replicas (the load benchmark) may each open two full
            # pools (writes and reads: 2 x (40 + 10)); past this the server refuses.
            "max_connections": "250",
            "logging_collector": "off",
        }
        settings.update(self.extra_settings)
        return settings

    def _launch(self) -> None:
        args = [str(self.pg_bin / "postgres"), "-D", str(self.data_dir)]
        for key, value in self._settings().items():
            args += ["-c", f"{key}={value}"]
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self._env(),
                **self._run_as,
            )

    def _pause_or_fail(self) -> None:
        """Between polls, wait on the process itself: if it exits, say why at once."""
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=_POLL_INTERVAL)
        except subprocess.TimeoutExpired:
            return
        raise PostgresError(f"postgres exited with code {code} during start:\n{self.log_tail()}")

    def _accepts_connections(self) -> bool:
        try:
            with self.connect() as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def _wait_ready(self) -> None:
        try:
            wait_until(
                self._accepts_connections,
                self.timeout,
                interval=self._pause_or_fail,
                message=lambda: f"postgres on 127.0.0.1:{self.port}",
            )
        except TimeoutError as exc:
            raise PostgresError(f"{exc}\n--- log tail ---\n{self.log_tail()}") from exc

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
