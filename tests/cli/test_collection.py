"""`make test` (= ``pytest tests``) collects every test directory: pytest's default ``norecursedirs`` skips any
folder named ``dist``, which once left tests/dist (DDP, FSDP2, ZeRO-3) out of CI without a word."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.cli.conftest import REPO


def test_every_test_directory_under_tests_is_collected():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {Path(line.split("::", 1)[0]).parent for line in proc.stdout.splitlines() if "::" in line}
    with_tests = {p.parent.relative_to(REPO) for p in (REPO / "tests").rglob("test_*.py")
                  if "__pycache__" not in p.parts}
    assert Path("tests/dist") in with_tests and Path("tests/model") in with_tests
    missing = sorted(str(d) for d in with_tests - collected)
    assert not missing, f"`pytest tests` collects nothing from {missing} (norecursedirs? a conftest? a name?)"
