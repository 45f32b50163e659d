"""The code base stays ruff clean (style and common bugs); part of the test command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install '.[test]')")
    r = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_example_config_is_valid() -> None:
    from ai_agent_proxy.config import load_settings

    s = load_settings(str(ROOT / ".ai-agent-proxy.conf.example"), {}, {})
    assert s.port == 7011 and s.reply


def test_one_door_into_sqlite() -> None:
    """Only db.py opens SQLite connections or writes transactions by hand; everything else
    goes through db.connect, db.connect_async and db.transaction."""
    import re

    door = re.compile(
        r"(?:sqlite3|aiosqlite)\.connect\(|execute\(\s*f?[\"'](?:BEGIN|COMMIT|ROLLBACK)"
    )
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "ai_agent_proxy").rglob("*.py"))
        if path.name != "db.py"
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if door.search(line)
    ]
    assert found == []
