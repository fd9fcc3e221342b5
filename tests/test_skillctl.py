"""The operator command line, run as operators run it: a subprocess on the stores the environment names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from shared.settings import PROJECT_ROOT

SKILLCTL = PROJECT_ROOT / "scripts" / "skillctl.py"
SKILL = "leadership"
SUBCOMMANDS = ("publish", "promote", "rollback", "list", "nightly")

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def skillctl(tmp_path: Path) -> Run:
    env = {
        key: value
        for key, value in os.environ.items()
        # The stores and settings come from this test alone.
        if key not in {"ARTIFACT_STORE", "DATABASE_URL", "SKILL_CATALOG", "PYTHONPATH"}
    }
    env.update(
        {
            "PYTHONPATH": str(PROJECT_ROOT),
            "ARTIFACT_STORE": str(tmp_path / "artifacts"),
            "DATABASE_URL": str(tmp_path / "skills.sqlite3"),
            "LOG_LEVEL": "WARNING",
        }
    )

    def run(*args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SKILLCTL), *args],
            env={**env, **overrides},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_of_the_command_and_every_subcommand(skillctl: Run) -> None:
    top = skillctl("--help")
    assert top.returncode == 0
    assert top.stdout.startswith("usage: skillctl")
    for command in SUBCOMMANDS:
        assert command in top.stdout
    for command in SUBCOMMANDS:
        result = skillctl(command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.startswith(f"usage: skillctl {command}"), command
        assert "Traceback" not in result.stderr


def test_publish_promote_list_and_rollback(skillctl: Run, trained_dir: Path) -> None:
    first = json.loads(_ok(skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir))))
    assert [(p["skill"], p["version"], p["stage"]) for p in first] == [(SKILL, "1.0.0", "staging")]
    _ok(skillctl("promote", SKILL, "1.0.0"))

    second = json.loads(_ok(skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir))))
    assert [(p["version"], p["stage"]) for p in second] == [("1.1.0", "staging")]
    promoted = json.loads(_ok(skillctl("promote", SKILL, "1.1.0")))
    assert (promoted["skill"], promoted["version"], promoted["stage"], promoted["traffic"]) == (SKILL, "1.1.0", "production", 1.0)

    table = _ok(skillctl("list", "--skill", SKILL)).splitlines()
    assert table[0].split()[:4] == ["skill", "version", "stage", "traffic"]
    rows = [line.split() for line in table[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [(SKILL, "1.0.0", "archived"), (SKILL, "1.1.0", "production")]

    listing = json.loads(_ok(skillctl("list", "--json")))
    entries = {e["skill"]: e for e in listing["skills"]}
    assert len(entries) == 7
    assert entries[SKILL]["deployed_version"] == "1.1.0"
    assert [(v["version"], v["stage"]) for v in entries[SKILL]["versions"]] == [("1.0.0", "archived"), ("1.1.0", "production")]
    assert entries["creativity"] == {"skill": "creativity", "deployed_version": None, "versions": []}

    restored = json.loads(_ok(skillctl("rollback", SKILL)))
    assert (restored["version"], restored["stage"]) == ("1.0.0", "production")
    after = json.loads(_ok(skillctl("list", "--json", "--skill", SKILL)))
    assert after["skills"][0]["deployed_version"] == "1.0.0"
    assert [(v["version"], v["stage"]) for v in after["skills"][0]["versions"]] == [("1.0.0", "production"), ("1.1.0", "archived")]


def test_publish_with_promote_and_an_explicit_version(skillctl: Run, trained_dir: Path) -> None:
    published = json.loads(
        _ok(skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir), "--version", "2.3.4", "--promote"))
    )
    assert [(p["version"], p["stage"]) for p in published] == [("2.3.4", "production")]
    patch = json.loads(_ok(skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir), "--bump", "patch")))
    assert patch[0]["version"] == "2.3.5"


def test_a_canary_from_the_command_line(skillctl: Run, trained_dir: Path) -> None:
    _ok(skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir), "--promote"))
    _ok(skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir)))
    canary = json.loads(_ok(skillctl("promote", SKILL, "1.1.0", "--stage", "canary", "--traffic", "0.1")))
    assert (canary["stage"], canary["traffic"]) == ("canary", 0.1)
    entry = json.loads(_ok(skillctl("list", "--json", "--skill", SKILL)))["skills"][0]
    assert {v["version"]: v["traffic"] for v in entry["versions"]} == {"1.0.0": 0.9, "1.1.0": 0.1}


@pytest.mark.parametrize(
    "args, message",
    [
        (("promote", SKILL, "9.9.9"), "no version '9.9.9'"),
        (("promote", "juggling", "1.0.0"), "Unknown skill 'juggling'"),
        (("rollback", SKILL), "no version in production"),
        (("list", "--skill", "juggling"), "Unknown skill"),
    ],
)
def test_errors_exit_1_with_a_message_and_no_traceback(skillctl: Run, args: tuple[str, ...], message: str) -> None:
    result = skillctl(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_publish_of_an_untrained_folder_fails_cleanly(skillctl: Run, tmp_path: Path) -> None:
    result = skillctl("publish", "--skill", SKILL, "--trained", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "train the skill first" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(skillctl: Run) -> None:
    for args in (("promote", SKILL), ("promote", SKILL, "1.0.0", "--stage", "live"), ("frobnicate",)):
        result = skillctl(*args)
        assert result.returncode == 2, args
        assert "usage: skillctl" in result.stderr
        assert "Traceback" not in result.stderr


def test_publish_needs_a_skill_or_all(skillctl: Run) -> None:
    result = skillctl("publish")
    assert result.returncode == 1
    assert "--skill" in result.stderr and "--all" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "variable, value, args",
    [
        ("DATABASE_URL", "postgres://db.internal/skills", ("list",)),
        ("ARTIFACT_STORE", "s3://bucket/models", ("publish", "--skill", SKILL)),
        ("LOG_LEVEL", "LOUD", ("list",)),
    ],
)
def test_a_bad_setting_is_reported_by_name_without_a_traceback(
    skillctl: Run, variable: str, value: str, args: tuple[str, ...]
) -> None:
    result = skillctl(*args, **{variable: value})
    assert result.returncode != 0
    assert variable in result.stderr
    assert "Traceback" not in result.stderr
