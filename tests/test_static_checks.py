"""The static checks: bandit (security) over the code, ruff (lint, configured in pyproject.toml), and pip-audit
(known vulnerabilities) over the pinned requirements. The tools are pinned in requirements.txt.

pip-audit asks PyPI's JSON API about each pinned release. Where that API cannot be reached, or answers for
none of the pins (as on the development machine and in CI, whose network reaches the package index but not
the per-release JSON), the audit test skips with one line saying so: everywhere, CI included, since failing
there would fail every run for a reason no change can fix. The README says how to run it elsewhere.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from shared.settings import PROJECT_ROOT

BANDIT_PATHS = ("shared", "functions", "scripts")
RUFF_PATHS = ("shared", "functions", "scripts", "tests")
AUDITED = ("requirements.txt", "functions/requirements.txt")
NOSEC = re.compile(r"#\s*nosec\b")
# `# nosec B310 # why this line is safe`: the ids after `nosec`, the reason after a second `#` (bandit reads
# every word up to the next `#` as a test name, and warns about each that is not one).
NOSEC_WITH_REASON = re.compile(r"# nosec B\d{3}(?:, ?B\d{3})* # \S.{14,}")
# What requests raises where the network stops it; pip-audit lets it through with a traceback.
UNREACHABLE = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "NameResolutionError", "Max retries exceeded")


def _run(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
    )
    if f"No module named {module}" in done.stderr:
        pytest.fail(f"{module} is not installed in this environment: run `make install` (requirements.txt pins it)")
    return done


def test_bandit_finds_no_medium_or_high_issue() -> None:
    done = _run("bandit", "--recursive", *BANDIT_PATHS, "--severity-level", "medium", "--format", "json", "--quiet")
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"bandit exited {done.returncode} without a report:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    assert not report["errors"], report["errors"]
    issues = [
        f"{r['filename']}:{r['line_number']}: {r['test_id']} ({r['issue_severity']}, confidence {r['issue_confidence']}) "
        f"{r['issue_text']}\n    {_flagged_line(r)}"
        for r in report["results"]
    ]
    assert not issues, "fix these, or skip one inline with `# nosec BXXX # the reason`:\n" + "\n".join(issues)


def _flagged_line(result: dict[str, Any]) -> str:
    """The flagged line from bandit's excerpt, whose lines start with their numbers."""
    prefix = f"{result['line_number']} "
    return next((line for line in result["code"].splitlines() if line.startswith(prefix)), "").strip()


def test_every_nosec_names_its_check_and_says_why() -> None:
    bare = []
    for folder in BANDIT_PATHS:
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if NOSEC.search(line) and not NOSEC_WITH_REASON.search(line):
                    bare.append(f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}")
    assert not bare, "write each skip as `# nosec BXXX # the reason`:\n" + "\n".join(bare)


def test_ruff_finds_nothing() -> None:
    done = _run("ruff", "check", "--no-cache", "--output-format", "concise", *RUFF_PATHS)
    assert done.returncode == 0, f"ruff (rules in pyproject.toml):\n{done.stdout[-6000:]}{done.stderr[-2000:]}"


def test_pip_audit_finds_no_known_vulnerability_in_the_pins() -> None:
    requirements = [arg for path in AUDITED for arg in ("--requirement", path)]
    # The files pin every package, transitive ones too: nothing to resolve, no environment to build.
    done = _run(
        "pip_audit", "--vulnerability-service", "pypi", "--no-deps", "--disable-pip", "--progress-spinner", "off",
        "--format", "json", *requirements,
    )
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        found = next((name for name in UNREACHABLE if name in done.stderr), None)
        if found:
            pytest.skip(f"pip-audit did not run: PyPI's vulnerability data could not be reached ({found}); see README, Tests")
        pytest.fail(f"pip-audit exited {done.returncode} without a report:\n{done.stderr[-4000:]}")
    dependencies = report["dependencies"]
    unaudited = [d for d in dependencies if "skip_reason" in d]
    if dependencies and len(unaudited) == len(dependencies):
        pytest.skip(
            f"pip-audit did not run: PyPI answered for none of the {len(dependencies)} pinned releases "
            f"(\"{unaudited[0]['skip_reason']}\"); see README, Tests"
        )
    assert not unaudited, "not audited:\n" + "\n".join(f"{d['name']}: {d['skip_reason']}" for d in unaudited)
    found_vulns = [
        f"{d['name']}=={d['version']}: {v['id']} {' '.join(v.get('aliases', []))}, fixed in "
        f"{', '.join(v.get('fix_versions', [])) or 'no release yet'}"
        for d in dependencies
        for v in d.get("vulns", [])
    ]
    assert not found_vulns, "known vulnerabilities (upgrade the pin in both files):\n" + "\n".join(found_vulns)
