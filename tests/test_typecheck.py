"""The core and the function adapters pass the type checker (configuration in mypy.ini)."""

from __future__ import annotations

import subprocess
import sys

from shared.settings import PROJECT_ROOT


def test_mypy_passes_on_shared_and_functions():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
