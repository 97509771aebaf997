"""`.ci/run`: a checkout whose tests folder is empty fails (pytest exit 5 is not mapped to success)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_run_fails_when_no_test_ran(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    (checkout / "tests").mkdir()  # empty: nothing to collect
    for name in ("README.md", "pyproject.toml", ".ci/run"):
        shutil.copy2(REPO / name, checkout / name)
    # the Quickstart's `pip install -e .` must not re-point this environment's predet at the copy
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "pip").write_text('#!/bin/sh\necho "pip $*"\n')
    (shim / "pip").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(checkout / ".ci" / "run")], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "python -m pytest" in proc.stdout  # it ran the README's test command ...
    assert "no tests ran" in proc.stdout
    assert proc.returncode == 5  # ... and reports pytest's "no tests collected", not success
