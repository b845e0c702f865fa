"""`spillover check` run as a subprocess: the exit status and the line-numbered problems
a deployer sees (the parsing itself is tested in tests/unit/test_config.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, parse_config
from tests.unit.test_config import BAD, RESERVED, ROOT


def test_check_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    cli = [sys.executable, "-m", "router.cli", "check", "--config"]
    r = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "line 9: aliases.demo.local.0.port" in r.stderr
    r = subprocess.run([*cli, str(ROOT / "models.yaml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    # The shipped catalog: demo, the hosted flagship, and the tiered alias over both.
    assert "ok (3 aliases, 1 local deployments, 2 hosted offerings" in r.stdout



def test_reserved_caller_names_are_refused_with_their_line(tmp_path: Path) -> None:
    """A caller named admin would share the admin's limits and usage; one named anonymous
    would collect the keyless rows."""
    with pytest.raises(ConfigError) as info:
        parse_config(RESERVED, "r.yaml")
    text = [str(p) for p in info.value.problems]
    assert any(t.startswith("line 8: callers.admin: the name 'admin' is reserved")
               for t in text), text
    assert any(t.startswith("line 10: callers.Anonymous: the name 'Anonymous' is reserved")
               for t in text), text
    assert not any("callers.app" in t for t in text), text
    bad = tmp_path / "reserved.yaml"
    bad.write_text(RESERVED)
    r = subprocess.run([sys.executable, "-m", "router.cli", "check", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "line 8: callers.admin: the name 'admin' is reserved" in r.stderr
