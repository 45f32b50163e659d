"""Numbered SQL migrations, applied in order at start-up, one transaction each.

The files live in the repo's top-level ``migrations/`` and ship inside the wheel as
``ai_agent_proxy/migrations/``. Applied versions are recorded in ``schema_migrations``;
a DB written by a newer ai-agent-proxy is refused instead of being misread.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .db import connect, transaction
from .errors import SchemaError

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations_dir() -> Path:
    here = Path(__file__).parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise SchemaError(f"migrations folder not found next to {here}")


def load_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or migrations_dir()
    found = []
    for path in sorted(folder.iterdir()):
        m = _NAME.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), path.name, path.read_text("utf-8")))
    return found


def latest_version() -> int:
    return max((m.version for m in load_migrations()), default=0)


def applied_version(conn: sqlite3.Connection) -> int:
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not has_table:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def check_version(conn: sqlite3.Connection, db_path: Path) -> int:
    """The DB's schema version; raises SchemaError if it is newer than this code knows."""
    try:
        version = applied_version(conn)
    except sqlite3.DatabaseError as exc:
        raise SchemaError(f"cannot read database {db_path}: {exc}") from None
    known = latest_version()
    if version > known:
        raise SchemaError(
            f"database {db_path} has schema version {version}, newer than this "
            f"ai-agent-proxy knows ({known}); upgrade ai-agent-proxy to use it"
        )
    return version


def create_private_file(path: Path) -> None:
    """Create the DB file owner-only before SQLite does (its -wal/-shm inherit the mode)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def migrate(db_path: Path) -> int:
    """Bring the DB up to date; return the number of migrations applied."""
    create_private_file(db_path)
    try:
        conn = connect(db_path)
    except sqlite3.DatabaseError as exc:
        raise SchemaError(f"cannot use database {db_path}: {exc}") from None
    try:
        current = check_version(conn, db_path)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        applied = 0
        for mig in load_migrations():
            if mig.version <= current:
                continue
            with transaction(conn):
                # Re-check under the write lock: another process may have just migrated.
                if applied_version(conn) >= mig.version:
                    continue
                for statement in _statements(mig.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, datetime('now'))",
                    (mig.version, mig.name),
                )
            applied += 1
        return applied
    except sqlite3.DatabaseError as exc:
        raise SchemaError(f"cannot use database {db_path}: {exc}") from None
    finally:
        conn.close()


def _statements(sql: str) -> list[str]:
    """Split a migration script into statements (executescript would commit on its own)."""
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            stmt = buf.strip()
            if stmt.strip(";").strip():
                out.append(stmt)
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        out.append(buf)
    return out
