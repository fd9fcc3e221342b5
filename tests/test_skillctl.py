"""The operator command line: `main([...])` in process on the stores an environment names (a temporary
SQLite database and artifact folder), and the scripts themselves as operators start them."""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from scripts.skillctl import build_parser, main
from shared.artifacts import METADATA_FILE, SCALER_FILE, sha256_hex
from shared.registry import ABANDON, CANARY_ABORT, CANARY_PROMOTE, CANARY_START, CANARY_TRAFFIC, PROMOTE, RESERVE
from shared.settings import PROJECT_ROOT, Settings

SKILLCTL = PROJECT_ROOT / "scripts" / "skillctl.py"
RUN_LOCAL = PROJECT_ROOT / "scripts" / "run_local.py"
SKILL = "leadership"
COMMANDS = ("publish", "promote", "canary", "rollback", "archive", "history", "list", "nightly", "drift")
CANARY_ACTIONS = ("start", "set", "promote", "abort", "status")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)

    def ok(self) -> str:
        assert self.code == 0, self.err
        return self.out


Run = Callable[..., Result]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        "ARTIFACT_STORE": str(tmp_path / "artifacts"),
        "DATABASE_URL": str(tmp_path / "skills.sqlite3"),
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def skillctl(cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Run:
    """Runs `skillctl ARGS` in this process with the test's environment (plus `overrides`)."""

    def run(*args: str, **overrides: str) -> Result:
        capsys.readouterr()
        try:
            code = main(list(args), {**cli_env, **overrides})
        except SystemExit as exc:  # argparse's usage errors and --help, or a command's own exit
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)  # what the interpreter prints for SystemExit("...")
                code = 1
            else:
                code = exc.code or 0
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def retrained(trained_dir: Path, into: Path, n: int, skill: str = SKILL) -> Path:
    """A copy of the trained folder in which `skill` was "retrained": its scaler differs slightly (and so
    its checksum), as after training on new data; the other skills are copied unchanged."""
    for source in trained_dir.iterdir():
        shutil.copytree(source, into / source.name)
    folder = into / skill
    scaler = json.loads((folder / SCALER_FILE).read_text())
    scaler["mean"][0] += n * 1e-6
    (folder / SCALER_FILE).write_text(json.dumps(scaler))
    metadata = json.loads((folder / METADATA_FILE).read_text())
    metadata["artifacts"][SCALER_FILE] = sha256_hex((folder / SCALER_FILE).read_bytes())
    metadata["trained_at"] = f"2031-01-0{n}T00:00:00.000Z"
    (folder / METADATA_FILE).write_text(json.dumps(metadata))
    return into


@pytest.fixture
def trained_twice(trained_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The session's trained folder, and two retrainings of SKILL: three different models of it."""
    return trained_dir, retrained(trained_dir, tmp_path / "retrained-1", 1), retrained(trained_dir, tmp_path / "retrained-2", 2)


def stages(skillctl: Run, skill: str = SKILL) -> dict[str, tuple[str, float]]:
    entry = skillctl("list", "--json", "--skill", skill).json()["skills"][0]
    return {v["version"]: (v["stage"], v["traffic"]) for v in entry["versions"]}


def history(skillctl: Run, skill: str = SKILL) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = skillctl("history", skill, "--json").json()["events"]
    return events


def moves(event: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    def state(s: dict[str, Any] | None) -> tuple[str, float] | None:
        return None if s is None else (s["stage"], s["traffic"])

    return [(c["version"], state(c["before"]), state(c["after"])) for c in event["changes"]]


@pytest.fixture
def in_production(skillctl: Run, trained_twice: tuple[Path, Path, Path]) -> tuple[Path, Path, Path]:
    """SKILL 1.0.0 in production, 1.1.0 and 1.2.0 (other models) in staging."""
    first, second, third = trained_twice
    skillctl("publish", "--skill", SKILL, "--trained", str(first), "--promote", "--actor", "setup").ok()
    skillctl("publish", "--skill", SKILL, "--trained", str(second), "--actor", "setup").ok()
    skillctl("publish", "--skill", SKILL, "--trained", str(third), "--actor", "setup").ok()
    return trained_twice


# -- help ---------------------------------------------------------------------------------------------


def test_help_of_every_command_shows_its_defaults(skillctl: Run) -> None:
    top = skillctl("--help", PORT="9191")
    assert top.code == 0 and top.out.startswith("usage: skillctl")
    for command in COMMANDS:
        assert f"    {command} " in top.out, command
    for args in [(c,) for c in COMMANDS] + [("canary", a) for a in CANARY_ACTIONS]:
        result = skillctl(*args, "--help", PORT="9191")
        assert result.code == 0, (args, result.err)
        assert result.out.startswith(f"usage: skillctl {' '.join(args)}"), args
    publish = " ".join(skillctl("publish", "--help").out.split())  # as one line, whatever the terminal's width
    assert "(default: minor)" in publish and f"(default: {PROJECT_ROOT / 'models' / 'artifacts'})" in publish
    assert "(default: None)" not in publish and "(default: False)" not in publish
    for args in (("nightly",), ("drift",)):
        assert "(default: http://127.0.0.1:9191)" in " ".join(skillctl(*args, "--help", PORT="9191").out.split())
    start = " ".join(skillctl("canary", "start", "--help").out.split())
    assert "--actor ACTOR" in start and "(default:" in start and "0 < T < 1" in start
    # promote's --traffic and --stage exist only to be refused with directions: help does not offer them.
    promote = skillctl("promote", "--help").out
    assert "--traffic TRAFFIC" not in promote and "--stage" not in promote


def test_the_scripts_print_help_and_exit_without_doing_anything(tmp_path: Path) -> None:
    """As operators start them: `run_local.py --help` must not start a server."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "DATABASE_URL": str(tmp_path / "db.sqlite3"),
           "ARTIFACT_STORE": str(tmp_path / "artifacts"), "PORT": "9191"}
    for script, args in ((RUN_LOCAL, ["--help"]), (SKILLCTL, ["--help"]), (SKILLCTL, ["canary", "start", "--help"])):
        done = subprocess.run([sys.executable, str(script), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: "), done.stdout
        assert "Traceback" not in done.stderr and "serving on" not in done.stdout
    assert not (tmp_path / "db.sqlite3").exists() and not (tmp_path / "artifacts").exists()


def test_nightly_and_drift_default_to_the_local_stack_on_its_port(tmp_path: Path) -> None:
    settings = Settings.from_env({"PORT": "9191", "DATABASE_URL": str(tmp_path / "db.sqlite3")})
    parser = build_parser(settings)
    assert parser.parse_args(["nightly"]).url == "http://127.0.0.1:9191"
    assert parser.parse_args(["drift"]).url == "http://127.0.0.1:9191"
    assert build_parser(Settings.from_env({})).parse_args(["nightly"]).url == "http://127.0.0.1:8080"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/", "127.0.0.1:8080"])
def test_a_url_that_is_not_http_is_a_usage_error(tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser(Settings.from_env({"DATABASE_URL": str(tmp_path / "db.sqlite3")}))
    for command in ("nightly", "drift"):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([command, "--url", url])
        assert exited.value.code == 2
        assert "must be an http:// or https:// URL" in capsys.readouterr().err


# -- publishing -----------------------------------------------------------------------------------------


def test_publish_promote_list_and_rollback(skillctl: Run, trained_twice: tuple[Path, Path, Path]) -> None:
    first, second, _ = trained_twice
    out = skillctl("publish", "--skill", SKILL, "--trained", str(first)).ok()
    assert out == f"{SKILL}: published 1.0.0 (staging)\n"
    assert skillctl("promote", SKILL, "1.0.0").ok().startswith(f"{SKILL}: promote by ")

    published = skillctl("publish", "--skill", SKILL, "--trained", str(second), "--json").json()
    assert [(p["skill"], p["version"], p["stage"]) for p in published["published"]] == [(SKILL, "1.1.0", "staging")]
    promoted = skillctl("promote", SKILL, "1.1.0", "--json").json()
    assert moves(promoted["event"]) == [
        ("1.0.0", ("production", 1.0), ("archived", 0.0)), ("1.1.0", ("staging", 0.0), ("production", 1.0)),
    ]
    assert promoted["status"]["production"]["version"] == "1.1.0" and promoted["status"]["canary"] is None

    table = skillctl("list", "--skill", SKILL).ok().splitlines()
    assert table[0].split()[:4] == ["skill", "version", "stage", "traffic"]
    assert [tuple(line.split()[:3]) for line in table[1:]] == [(SKILL, "1.0.0", "archived"), (SKILL, "1.1.0", "production")]
    entries = {e["skill"]: e for e in skillctl("list", "--json").json()["skills"]}
    assert len(entries) == 7 and entries[SKILL]["deployed_version"] == "1.1.0"
    assert entries["creativity"] == {"skill": "creativity", "deployed_version": None, "versions": []}

    rolled_back = skillctl("rollback", SKILL).ok()
    assert f"{SKILL}: rollback by " in rolled_back and "1.0.0: archived -> production 100%" in rolled_back
    assert f"{SKILL} now: production 1.0.0 at 100%; no canary" in rolled_back
    assert stages(skillctl) == {"1.0.0": ("production", 1.0), "1.1.0": ("archived", 0.0)}


def test_publish_with_promote_and_an_explicit_version(skillctl: Run, trained_twice: tuple[Path, Path, Path]) -> None:
    first, second, _ = trained_twice
    published = skillctl("publish", "--skill", SKILL, "--trained", str(first), "--version", "2.3.4", "--promote", "--json").json()
    assert [(p["version"], p["stage"]) for p in published["published"]] == [("2.3.4", "production")]
    patch = skillctl("publish", "--skill", SKILL, "--trained", str(second), "--bump", "patch", "--json").json()
    assert patch["published"][0]["version"] == "2.3.5"


def test_publishing_identical_model_files_is_refused_unless_forced(skillctl: Run, trained_dir: Path) -> None:
    skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir), "--promote").ok()

    again = skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir))
    assert again.code == 1 and again.out == ""
    assert again.err.startswith("error: ") and "already published as 1.0.0 (production)" in again.err
    assert "--force" in again.err and "Traceback" not in again.err
    assert stages(skillctl) == {"1.0.0": ("production", 1.0)}  # nothing reserved, nothing spent

    forced = skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir), "--force", "--reason", "re-upload")
    assert forced.ok() == f"{SKILL}: published 1.1.0 (staging)\n"
    reserve = [e for e in history(skillctl) if e["action"] == RESERVE][-1]
    assert (reserve["reason"], reserve["note"]) == ("re-upload", "the same model files as 1.0.0, published again (force)")
    # Of several identical versions, the refusal names the one serving.
    assert "already published as 1.0.0 (production)" in skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir)).err


def test_publish_all_publishes_what_changed_and_names_what_did_not(
    skillctl: Run, trained_twice: tuple[Path, Path, Path]
) -> None:
    first, second, _ = trained_twice
    assert len(skillctl("publish", "--all", "--trained", str(first)).ok().splitlines()) == 7

    again = skillctl("publish", "--all", "--trained", str(first))
    lines = again.ok().splitlines()
    assert len(lines) == 7 and all("unchanged, not published" in line and "already published as 1.0.0" in line for line in lines)

    changed = skillctl("publish", "--all", "--trained", str(second), "--json").json()
    assert [(p["skill"], p["version"]) for p in changed["published"]] == [(SKILL, "1.1.0")]
    assert len(changed["unchanged"]) == 6
    assert {(u["existing_version"], u["stage"]) for u in changed["unchanged"]} == {("1.0.0", "staging")}


def test_a_publish_abandoned_mid_upload_does_not_block_publishing_the_same_files(
    skillctl: Run, trained_dir: Path, tmp_path: Path
) -> None:
    """A reservation left by a publisher that died is archived by hand; its files may be incomplete, so
    the same files must still be publishable afterwards."""
    from shared.registry import ModelRegistry, SqliteRegistryBackend
    from shared.sqlite import SqliteDatabase

    skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir)).ok()
    registry = ModelRegistry(SqliteRegistryBackend(SqliteDatabase(tmp_path / "skills.sqlite3")))
    crashed = registry.get(SKILL, "1.0.0")
    registry.reserve(
        SKILL, "2.0.0", trained_at=crashed.trained_at, metrics={}, artifact_uri="file:///nowhere/",
        sha256=crashed.sha256, checksums=crashed.checksums, actor="dead-publisher",
    )
    skillctl("archive", SKILL, "1.0.0").ok()
    assert "already published as 2.0.0 (still being published; if its publisher died, archive it first)" in (
        skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir)).err
    )
    archived = skillctl("archive", SKILL, "2.0.0", "--reason", "publisher died", "--json").json()
    assert archived["event"]["action"] == ABANDON
    # 1.0.0 was published whole and only withdrawn: it still counts.
    assert "already published as 1.0.0 (archived)" in skillctl("publish", "--skill", SKILL, "--trained", str(trained_dir)).err


# -- promote, canaries, rollback ----------------------------------------------------------------------------


def test_promote_refuses_traffic_and_says_to_start_a_canary(skillctl: Run, in_production: Any) -> None:
    result = skillctl("promote", SKILL, "1.1.0", "--traffic", "0.1")
    assert result.code == 2 and "usage: skillctl promote" in result.err
    assert f"skillctl canary start {SKILL} 1.1.0 --traffic 0.1" in result.err
    for stage in ("canary", "archived", "production"):
        refused = skillctl("promote", SKILL, "1.1.0", "--stage", stage)
        assert refused.code == 2 and "canary start" in refused.err and f"skillctl archive {SKILL} 1.1.0" in refused.err
    assert stages(skillctl)["1.1.0"] == ("staging", 0.0)
    assert stages(skillctl)["1.0.0"] == ("production", 1.0)


def test_a_canary_started_reweighted_and_promoted(skillctl: Run, in_production: Any) -> None:
    started = skillctl("canary", "start", SKILL, "1.1.0", "--traffic", "0.1", "--actor", "alice", "--reason", "new features")
    assert started.ok().splitlines() == [
        f"{SKILL}: canary.start by alice (reason: new features)",
        "  1.0.0: production 100% -> production 90%",
        "  1.1.0: staging -> canary 10%",
        f"{SKILL} now: production 1.0.0 at 90%, canary 1.1.0 at 10% since {history(skillctl)[-1]['at']}",
    ]
    status = skillctl("canary", "status", SKILL, "--json").json()["skills"][0]
    assert (status["production"]["version"], status["production"]["traffic"]) == ("1.0.0", 0.9)
    assert (status["canary"]["version"], status["canary"]["traffic"]) == ("1.1.0", 0.1)
    assert status["canary"]["since"] == history(skillctl)[-1]["at"]
    assert status["last_change"]["action"] == CANARY_START and status["last_change"]["actor"] == "alice"

    skillctl("canary", "set", SKILL, "--traffic", "0.5", "--actor", "bob").ok()
    assert stages(skillctl) == {"1.0.0": ("production", 0.5), "1.1.0": ("canary", 0.5), "1.2.0": ("staging", 0.0)}

    promoted = skillctl("canary", "promote", SKILL, "--actor", "alice", "--reason", "AUC holds", "--json").json()
    assert moves(promoted["event"]) == [
        ("1.0.0", ("production", 0.5), ("archived", 0.0)), ("1.1.0", ("canary", 0.5), ("production", 1.0)),
    ]
    assert stages(skillctl) == {"1.0.0": ("archived", 0.0), "1.1.0": ("production", 1.0), "1.2.0": ("staging", 0.0)}
    assert [(e["action"], e["actor"], e["reason"]) for e in history(skillctl)[-3:]] == [
        (CANARY_START, "alice", "new features"), (CANARY_TRAFFIC, "bob", None), (CANARY_PROMOTE, "alice", "AUC holds"),
    ]


def test_a_canary_aborted(skillctl: Run, in_production: Any) -> None:
    skillctl("canary", "start", SKILL, "1.1.0", "--traffic", "0.2").ok()
    aborted = skillctl("canary", "abort", SKILL, "--reason", "latency").ok()
    assert "  1.1.0: canary 20% -> archived" in aborted and f"{SKILL} now: production 1.0.0 at 100%; no canary" in aborted
    assert stages(skillctl)["1.1.0"] == ("archived", 0.0)
    assert skillctl("canary", "status", SKILL, "--json").json()["skills"][0]["canary"] is None


def test_a_second_canary_is_refused_and_the_error_says_how_to_end_the_first(skillctl: Run, in_production: Any) -> None:
    skillctl("canary", "start", SKILL, "1.1.0", "--traffic", "0.1").ok()
    refused = skillctl("canary", "start", SKILL, "1.2.0", "--traffic", "0.1")
    assert refused.code == 1 and refused.out == ""
    assert "already has a canary running: 1.1.0 at 10%" in refused.err
    assert f"canary promote {SKILL}" in refused.err and f"canary abort {SKILL}" in refused.err
    # So is promoting a third version while it runs.
    promote = skillctl("promote", SKILL, "1.2.0")
    assert promote.code == 1 and f"canary abort {SKILL}" in promote.err
    assert stages(skillctl)["1.2.0"] == ("staging", 0.0)


@pytest.mark.parametrize("traffic", ["0", "1", "1.5", "-0.2", "nan"])
def test_canary_traffic_outside_0_1_is_refused(skillctl: Run, in_production: Any, traffic: str) -> None:
    result = skillctl("canary", "start", SKILL, "1.1.0", "--traffic", traffic)
    assert result.code == 1 and "traffic" in result.err
    assert stages(skillctl)["1.1.0"] == ("staging", 0.0)


def test_rollback_during_a_canary_aborts_the_canary_and_says_so(skillctl: Run, in_production: Any) -> None:
    skillctl("canary", "start", SKILL, "1.1.0", "--traffic", "0.1").ok()
    out = skillctl("rollback", SKILL, "--actor", "oncall", "--reason", "pager").ok()
    assert out.startswith(f"{SKILL}: a canary was running, so rollback ABORTED THE CANARY: 1.1.0 is archived")
    assert "Production itself was not rolled back; run rollback again for that." in out
    assert f"{SKILL} now: production 1.0.0 at 100%; no canary" in out
    assert stages(skillctl) == {"1.0.0": ("production", 1.0), "1.1.0": ("archived", 0.0), "1.2.0": ("staging", 0.0)}
    last = history(skillctl)[-1]
    assert (last["action"], last["actor"], last["reason"]) == (CANARY_ABORT, "oncall", "pager")
    assert "rollback during a canary aborts the canary" in last["note"]

    # With no canary, and nothing served before 1.0.0, a second rollback has nothing to restore.
    again = skillctl("rollback", SKILL)
    assert again.code == 1 and "no earlier production version" in again.err


def test_history_shows_who_when_why_and_before_and_after(skillctl: Run, in_production: Any) -> None:
    skillctl("canary", "start", SKILL, "1.2.0", "--traffic", "0.25", "--actor", "alice", "--reason", "try it").ok()
    skillctl("rollback", SKILL, "--actor", "bob").ok()
    lines = skillctl("history", SKILL).ok().splitlines()
    events = history(skillctl)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1)) == list(range(1, 10))
    assert [e["action"] for e in events][:3] == [RESERVE, "publish.complete", PROMOTE]
    assert lines[0].split()[:4] == ["#1", events[0]["at"], "setup", RESERVE]
    assert lines[-4].split()[:4] == ["#8", events[7]["at"], "alice", CANARY_START]
    assert lines[-4].endswith("1.0.0: production 100% -> production 75%; 1.2.0: staging -> canary 25%")
    assert lines[-3].strip() == "reason: try it"
    assert lines[-2].split()[2:4] == ["bob", CANARY_ABORT]
    assert lines[-1].strip().startswith("note: rollback during a canary aborts the canary")
    assert "no registry changes recorded" in skillctl("history", "creativity").ok()


def test_canary_status_of_every_skill(skillctl: Run, in_production: Any) -> None:
    skillctl("canary", "start", SKILL, "1.1.0", "--traffic", "0.1", "--actor", "alice").ok()
    lines = skillctl("canary", "status").ok().splitlines()
    assert lines[0].split() == ["skill", "production", "since", "canary", "since", "next", "step", "last", "change"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert len(rows) == 7
    assert rows[SKILL].split()[1:3] == ["1.0.0", "(90%)"] and rows[SKILL].split()[4:6] == ["1.1.0", "(10%)"]
    assert rows[SKILL].split()[7] == "-"  # started without steps: no next step
    assert "canary.start by alice" in rows[SKILL]
    assert rows["creativity"].split()[1:] == ["-", "-", "-", "-", "-", "-"]


def test_a_canary_started_with_steps_shows_its_plan_and_next_step(skillctl: Run, in_production: Any) -> None:
    started = skillctl("canary", "start", SKILL, "1.1.0", "--steps", "5,25,50,100", "--actor", "alice").ok()
    assert "  1.1.0: staging -> canary 5% (steps 5%, 25%, 50%, 100%)" in started.splitlines()
    row = next(line for line in skillctl("canary", "status").ok().splitlines() if line.startswith(SKILL))
    assert row.split()[4:8] == ["1.1.0", "(5%)", row.split()[6], "25%"]
    status = skillctl("canary", "status", SKILL, "--json").json()["skills"][0]
    assert (status["canary_plan"], status["canary_next_step"]) == ([0.05, 0.25, 0.5, 1.0], 0.25)
    assert history(skillctl)[-1]["changes"][-1]["plan"] == [0.05, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("steps", ["5", "50,25,100", "5,25,50", "0,100", "5,lots,100", "5,150"])
def test_steps_that_do_not_increase_to_100_are_a_usage_error(skillctl: Run, steps: str) -> None:
    result = skillctl("canary", "start", SKILL, "1.1.0", "--steps", steps)
    assert result.code == 2 and "--steps" in result.err, result.err


def test_the_actor_defaults_to_the_os_user(skillctl: Run, in_production: Any) -> None:
    skillctl("archive", SKILL, "1.2.0").ok()
    assert history(skillctl)[-1]["actor"] == getpass.getuser()


def test_the_actor_defaults_to_operator(skillctl: Run, in_production: Any) -> None:
    skillctl("archive", SKILL, "1.2.0", OPERATOR="ops@school.example").ok()
    assert history(skillctl)[-1]["actor"] == "ops@school.example"
    assert "(default: ops@school.example)" in " ".join(skillctl("archive", "--help", OPERATOR="ops@school.example").out.split())


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (("promote", SKILL, "9.9.9"), "no version '9.9.9'"),
        (("promote", "juggling", "1.0.0"), "Unknown skill 'juggling'"),
        (("rollback", SKILL), "no version in production"),
        (("canary", "abort", SKILL), "no canary running"),
        (("canary", "promote", SKILL), "no canary running"),
        (("canary", "set", SKILL, "--traffic", "0.3"), "no canary running"),
        (("archive", SKILL, "1.0.0"), "no version '1.0.0'"),
        (("history", "juggling"), "Unknown skill"),
        (("list", "--skill", "juggling"), "Unknown skill"),
    ],
)
def test_errors_exit_1_with_a_message(skillctl: Run, args: tuple[str, ...], message: str) -> None:
    result = skillctl(*args)
    assert result.code == 1
    assert result.err.startswith("error: ")
    assert message in result.err
    assert result.out == ""


def test_publish_of_an_untrained_folder_fails_cleanly(skillctl: Run, tmp_path: Path) -> None:
    result = skillctl("publish", "--skill", SKILL, "--trained", str(tmp_path / "nothing"))
    assert result.code == 1
    assert result.err.startswith("error: ") and "train the skill first" in result.err


def test_usage_errors_exit_2(skillctl: Run) -> None:
    for args in (
        ("promote", SKILL),
        ("frobnicate",),
        ("canary",),
        ("canary", "start", SKILL, "1.1.0"),  # --traffic or --steps is required
        ("canary", "start", SKILL, "1.1.0", "--traffic", "0.1", "--steps", "10,100"),  # not both
        ("canary", "set", SKILL, "--traffic", "lots"),
    ):
        result = skillctl(*args)
        assert result.code == 2, args
        assert "usage: skillctl" in result.err


def test_publish_needs_a_skill_or_all(skillctl: Run) -> None:
    result = skillctl("publish")
    assert result.code == 1
    assert "--skill" in result.err and "--all" in result.err


@pytest.mark.parametrize(
    "variable, value, args",
    [
        ("DATABASE_URL", "postgres://db.internal/skills", ("list",)),
        ("ARTIFACT_STORE", "s3://bucket/models", ("publish", "--skill", SKILL)),
        ("LOG_LEVEL", "LOUD", ("list",)),
        ("PORT", "eighty", ("nightly", "--help")),
    ],
)
def test_a_bad_setting_is_reported_by_name(skillctl: Run, variable: str, value: str, args: tuple[str, ...]) -> None:
    result = skillctl(*args, **{variable: value})
    assert result.code == 2
    assert variable in result.err and result.err.startswith("error: ")


def test_a_bad_setting_is_reported_without_a_traceback_by_the_script(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "DATABASE_URL": "postgres://db.internal/skills"}
    done = subprocess.run([sys.executable, str(SKILLCTL), "list"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "DATABASE_URL" in done.stderr and "Traceback" not in done.stderr
