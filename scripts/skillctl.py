"""Operator command line for the skill inference service: publish model versions, promote, run canaries,
roll back, read the registry's history, and fire a nightly run or a drift check on a server.

Runs against the stores the environment configures (ARTIFACT_STORE, DATABASE_URL), exactly as the
functions see them. Every command has --help, which shows its defaults. Every registry change is one
transaction, recorded in the skill's history with who (--actor, default: OPERATOR, else the OS user),
why (--reason) and each version's stage and traffic before and after.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse
from typing import Any, Mapping

from scripts.command_line import HelpFormatter
from shared.errors import ConfigError, ServiceError, ValidationError
from shared.publishing import AlreadyPublished, publish_version
from shared.registry import CANARY_ABORT, HistoryEvent, ModelRegistry, Rollout, check_rollout_steps, listing, percent
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings

DEFAULT_TRAINED = PROJECT_ROOT / "models" / "artifacts"
SKILL_HELP = "a skill of the catalog, e.g. leadership"
VERSION_HELP = "a registered version, MAJOR.MINOR.PATCH"


# -- publishing ---------------------------------------------------------------------------------------


def cmd_publish(services: Services, args: argparse.Namespace) -> int:
    if not (args.all or args.skill):
        raise SystemExit("publish: name --skill SKILL (repeatable) or --all")
    skills = services.catalog.names if args.all else [services.catalog.skill(s).skill for s in args.skill]
    registry = services.registry
    published: list[dict[str, Any]] = []
    unchanged: list[AlreadyPublished] = []
    refused: list[AlreadyPublished] = []
    for skill in skills:
        try:
            record = publish_version(
                registry, services.artifacts, args.trained / skill, args.version, args.bump,
                force=args.force, actor=args.actor, reason=args.reason,
            )
        except AlreadyPublished as exc:
            # Asked for by name, an unchanged skill is an error; under --all it is only unchanged.
            (unchanged if args.all else refused).append(exc)
            continue
        if args.promote:
            registry.make_production(skill, record.version, actor=args.actor, reason=args.reason)
            record = registry.get(skill, record.version)
        published.append({"skill": skill, **record.to_dict()})
    if args.json:
        _print_json({"published": published, "unchanged": [same.details for same in unchanged]})
    else:
        for entry in published:
            print(f"{entry['skill']}: published {entry['version']} ({entry['stage']})")
        for same in unchanged:
            print(f"{same.existing.skill}: unchanged, not published: {same.message}")
    for same in refused:
        print(f"error: {same.message}", file=sys.stderr)
    return 1 if refused else 0


# -- promotion, canaries, rollback ------------------------------------------------------------------------


def cmd_promote(services: Services, args: argparse.Namespace) -> int:
    if args.traffic is not None:
        args.parser.error(
            "promote makes a version production at full traffic and takes no --traffic. To give a version a "
            f"share of traffic, start a canary: skillctl canary start {args.skill} {args.version} --traffic {args.traffic}"
        )
    if args.stage is not None:
        args.parser.error(
            "promote takes no --stage: it always makes the version production at full traffic. For a canary "
            f"use `skillctl canary start {args.skill} {args.version} --traffic T`; to withdraw a version, "
            f"`skillctl archive {args.skill} {args.version}`."
        )
    skill = services.catalog.skill(args.skill).skill
    event = services.registry.make_production(skill, args.version, actor=args.actor, reason=args.reason)
    return _report(services.registry, skill, event, args, f"{args.version} is already in production; nothing changed.")


def cmd_archive(services: Services, args: argparse.Namespace) -> int:
    skill = services.catalog.skill(args.skill).skill
    event = services.registry.archive(skill, args.version, actor=args.actor, reason=args.reason)
    return _report(services.registry, skill, event, args, f"{args.version} is already archived; nothing changed.")


def cmd_rollback(services: Services, args: argparse.Namespace) -> int:
    skill = services.catalog.skill(args.skill).skill
    event = services.registry.revert(skill, actor=args.actor, reason=args.reason)
    headline = None
    if event is not None and event.action == CANARY_ABORT:
        canary = next(t for t in event.changes if t.before is not None and t.before.stage == "canary")
        headline = (
            f"{skill}: a canary was running, so rollback ABORTED THE CANARY: {canary.version} is archived and "
            "production takes all traffic back. Production itself was not rolled back; run rollback again for that."
        )
    return _report(services.registry, skill, event, args, "nothing changed.", headline)


def cmd_canary_start(services: Services, args: argparse.Namespace) -> int:
    skill = services.catalog.skill(args.skill).skill
    event = services.registry.start_canary(
        skill, args.version, args.traffic, steps=args.steps or (), actor=args.actor, reason=args.reason
    )
    return _report(services.registry, skill, event, args, "nothing changed.")


def cmd_canary_set(services: Services, args: argparse.Namespace) -> int:
    skill = services.catalog.skill(args.skill).skill
    event = services.registry.set_canary_traffic(skill, args.traffic, actor=args.actor, reason=args.reason)
    return _report(services.registry, skill, event, args, f"the canary already has {percent(args.traffic)}; nothing changed.")


def cmd_canary_promote(services: Services, args: argparse.Namespace) -> int:
    skill = services.catalog.skill(args.skill).skill
    event = services.registry.promote_canary(skill, actor=args.actor, reason=args.reason)
    return _report(services.registry, skill, event, args, "nothing changed.")


def cmd_canary_abort(services: Services, args: argparse.Namespace) -> int:
    skill = services.catalog.skill(args.skill).skill
    event = services.registry.abort_canary(skill, actor=args.actor, reason=args.reason)
    return _report(services.registry, skill, event, args, "nothing changed.")


def cmd_canary_status(services: Services, args: argparse.Namespace) -> int:
    skills = [services.catalog.skill(args.skill).skill] if args.skill else services.catalog.names
    rollouts = [services.registry.status(skill) for skill in skills]
    if args.json:
        _print_json({"skills": [r.to_dict() for r in rollouts]})
        return 0
    print(f"{'skill':<20}{'production':<20}{'since':<27}{'canary':<20}{'since':<27}{'next step':<11}last change")
    for rollout in rollouts:
        print(
            f"{rollout.skill:<20}{_serving(rollout.production):<20}{rollout.production_since or '-':<27}"
            f"{_serving(rollout.canary):<20}{rollout.canary_since or '-':<27}{_next_step(rollout):<11}"
            f"{_last_change(rollout.last_change)}"
        )
    return 0


def _next_step(rollout: Rollout) -> str:
    step = rollout.next_step()
    return "-" if step is None else percent(step)


def rollout_steps(value: str) -> list[float]:
    """Parses --steps `5,25,50,100` (percent of students) into shares of traffic; argparse reports a bad value."""
    try:
        steps = [float(part) / 100.0 for part in value.split(",") if part.strip()]
        return list(check_rollout_steps(steps))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be increasing percents ending at 100, e.g. 5,25,50,100; got {value!r}") from None
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problems[0]['problem']}; got {value!r}") from None


def _serving(version: Any) -> str:
    return "-" if version is None else f"{version.version} ({percent(version.traffic)})"


def _last_change(event: HistoryEvent | None) -> str:
    return "-" if event is None else f"{event.action} by {event.actor} at {event.at}"


def _report(
    registry: ModelRegistry, skill: str, event: HistoryEvent | None, args: argparse.Namespace, unchanged: str,
    headline: str | None = None,
) -> int:
    """Prints what a change did (each version's stage and traffic before and after) and where the skill stands now."""
    rollout = registry.status(skill)
    if args.json:
        _print_json({"skill": skill, "event": event.to_dict() if event else None, "status": rollout.to_dict()})
        return 0
    if event is None:
        print(f"{skill}: {unchanged}")
    else:
        if headline:
            print(headline)
        why = f" (reason: {event.reason})" if event.reason else ""
        print(f"{skill}: {event.action} by {event.actor}{why}")
        for move in event.changes:
            print(f"  {move.describe()}")
        if event.note:
            print(f"  note: {event.note}")
    print(f"{skill} now: {_standing(rollout)}")
    return 0


def _standing(rollout: Rollout) -> str:
    if rollout.production is None:
        return "no version in production"
    production = f"production {rollout.production.version} at {percent(rollout.production.traffic)}"
    if rollout.canary is None:
        return f"{production}; no canary"
    return f"{production}, canary {rollout.canary.version} at {percent(rollout.canary.traffic)} since {rollout.canary_since or '?'}"


# -- reading the registry -----------------------------------------------------------------------------


def cmd_history(services: Services, args: argparse.Namespace) -> int:
    skill = services.catalog.skill(args.skill).skill
    events = services.registry.history(skill)
    if args.json:
        _print_json({"skill": skill, "events": [e.to_dict() for e in events]})
        return 0
    if not events:
        print(f"{skill}: no registry changes recorded")
    for event in events:
        print(f"#{event.sequence:<4}{event.at}  {event.actor:<16}{event.action:<18}{event.describe()}")
        if event.reason:
            print(f"{'':<5}reason: {event.reason}")
        if event.note:
            print(f"{'':<5}note: {event.note}")
    return 0


def cmd_list(services: Services, args: argparse.Namespace) -> int:
    skills = [services.catalog.skill(args.skill).skill] if args.skill else services.catalog.names
    entries = listing(services.registry, skills)
    if args.json:
        _print_json({"skills": entries})
        return 0
    print(f"{'skill':<20}{'version':<10}{'stage':<12}{'traffic':>8}  {'auc':>7}  created_at")
    for entry in entries:
        for v in entry["versions"]:
            auc = v["metrics"].get("heldout", {}).get("auc", float("nan"))
            print(f"{entry['skill']:<20}{v['version']:<10}{v['stage']:<12}{v['traffic']:>8.2f}  {auc:>7.4f}  {v['created_at']}")
    return 0


# -- talking to a server ----------------------------------------------------------------------------------


def cmd_nightly(services: Services, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"full": args.full}
    if args.run_id:
        body["run_id"] = args.run_id
    started = time.monotonic()
    dispatched = _http_json("POST", f"{args.url.rstrip('/')}/tasks/nightly", body, args.timeout)
    run_id = dispatched["run_id"]
    total = dispatched["students"]
    print(f"run {run_id}: {total} students in {dispatched['tasks']} tasks", file=sys.stderr)
    deadline = started + args.timeout
    while True:
        run = _http_json("GET", f"{args.url.rstrip('/')}/api/v1/batch/runs/{run_id}", None, args.timeout)
        _progress(run["tasks_done"], run["tasks_total"], time.monotonic() - started)
        if run["status"] != "running":
            break
        if time.monotonic() > deadline:
            print(file=sys.stderr)
            raise SystemExit(f"nightly: run {run_id} still running after {args.timeout:.0f} s")
        time.sleep(args.poll)
    print(file=sys.stderr)
    print(
        f"run {run_id} {run['status']}: {run['students_scored']} of {total} students scored, "
        f"{run['students_failed']} with a failed skill",
        file=sys.stderr,
    )
    for skill, reasons in sorted(run.get("failures", {}).get("by_skill", {}).items()):
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            print(f"  {skill}: {count} failed: {reason}", file=sys.stderr)
    for failure in run.get("failures", {}).get("first", []):
        print(f"  e.g. {failure['student_id']} on {failure['skill']}: {failure['reason']}", file=sys.stderr)
    _print_json({**run, "seconds": round(time.monotonic() - started, 2)})
    # A run that ends partial or failed is not a success for a script that fired it.
    return 0 if run["status"] == "succeeded" else 1


def cmd_drift(services: Services, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.window_days is not None:
        body["window_days"] = args.window_days
    if args.skill:
        body["skills"] = args.skill
    check = _http_json("POST", f"{args.url.rstrip('/')}/tasks/drift-check", body, args.timeout)
    print(f"drift check {check['check_id']}: {check['window']['from']} to {check['window']['to']}", file=sys.stderr)
    print(f"{'skill':<20}{'version':<10}{'stage':<12}{'students':>9}{'psi(pred)':>11}{'max psi':>9}{'teacher r':>11}  alerts")
    for entry in check["skills"]:
        max_psi = max((f["psi"] for f in entry["features"]), default=None)
        correlation = entry["teacher_correlation"]
        alerts = ", ".join(
            f"{a['severity']}:{a.get('feature') or a['kind']}" for a in entry["alerts"]
        ) or ("insufficient data" if entry["status"] == "insufficient_data" else "-")
        print(
            f"{entry['skill']:<20}{entry['model_version']:<10}{entry['stage']:<12}{entry['students']:>9}"
            f"{_figure(entry['psi_prediction']):>11}{_figure(max_psi):>9}"
            f"{_figure(correlation['pearson'] if correlation else None):>11}  {alerts}"
        )
    location = check["report_uri"]
    if args.open is not None:
        path = args.open
        path.write_bytes(services.artifacts.get(location))
        location = str(path.resolve())
    print(f"report: {location}", file=sys.stderr)
    return 0


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _progress(done: int, total: int, seconds: float) -> None:
    width = 40
    share = done / total if total else 1.0
    bar = "#" * int(share * width)
    print(f"\r[{bar:<{width}}] {done}/{total} tasks  {seconds:6.1f} s", end="", file=sys.stderr, flush=True)


def _http_json(method: str, url: str, body: Any, timeout: float) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # nosec B310 # --url is http(s): service_url checks it
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{method} {url} answered {exc.code}: {exc.read().decode(errors='replace')}") from None
    except OSError as exc:
        raise SystemExit(f"{method} {url} failed: {exc}") from None


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=1))


# -- the parser -----------------------------------------------------------------------------------------


def default_actor(settings: Settings) -> str:
    """Returns who registry changes are recorded as made by when --actor is not given: OPERATOR, else the OS user."""
    if settings.operator:
        return settings.operator
    try:
        return getpass.getuser()
    except Exception:  # no login name anywhere (a container without a passwd entry)
        return "unknown"


def local_url(settings: Settings) -> str:
    """Returns the local stack's base URL: the server `make run` starts listens on HOST:PORT."""
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0", "::") else settings.host  # nosec B104 # binds nothing: maps a wildcard to loopback
    return f"http://{host}:{settings.port}"


def service_url(value: str) -> str:
    """Returns value if it is an http(s) URL; argparse reports anything else as a usage error (exit 2)."""
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL; got {value!r}")
    return value


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    """Returns the command line's parser; defaults that depend on the environment come from `settings`."""
    parser = argparse.ArgumentParser(prog="skillctl", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    change = argparse.ArgumentParser(add_help=False)
    change.add_argument(
        "--actor", default=default_actor(settings),
        help="who makes the change, as the history records it (from OPERATOR, else the OS user)",
    )
    change.add_argument("--reason", help="why, as the history records it")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of text")

    def command(group: Any, name: str, summary: str, *parents: argparse.ArgumentParser, details: str = "") -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name, help=summary, description=f"{summary}.\n\n{details}".strip(), formatter_class=HelpFormatter, parents=list(parents)
        )
        p.set_defaults(parser=p)
        return p

    p = command(
        sub, "publish", "upload trained artifacts and register each as a new version (stage staging)", change, output,
        details="Model files (model.ubj, model.onnx, scaler.json) identical by sha256 to a version already published\n"
        "are refused, naming that version; under --all such skills are reported unchanged and skipped.",
    )
    p.add_argument("--skill", action="append", default=[], help="skill to publish (repeatable)")
    p.add_argument("--all", action="store_true", help="publish every skill of the catalog whose model files changed")
    p.add_argument("--trained", type=Path, default=DEFAULT_TRAINED, help="folder of <skill>/ training outputs")
    p.add_argument("--version", help="version to register (default: the next one, per --bump)")
    p.add_argument("--bump", choices=("major", "minor", "patch"), default="minor", help="how to pick the next version")
    p.add_argument("--promote", action="store_true", help="also make the new version production")
    p.add_argument("--force", action="store_true", help="publish even model files identical to a published version's")
    p.set_defaults(run=cmd_publish)

    p = command(
        sub, "promote", "make a version production at full traffic (the previous production version is archived)",
        change, output,
        details="Refused while a canary of another version runs: end it with `canary promote` or `canary abort`.\n"
        "For a share of traffic, use `canary start SKILL VERSION --traffic T`.",
    )
    p.add_argument("skill", help=SKILL_HELP)
    p.add_argument("version", help=VERSION_HELP)
    # Not options of promote: accepted only to say what to use instead.
    p.add_argument("--traffic", type=float, help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_promote)

    p = command(
        sub, "canary", "run a new version on a share of traffic beside production",
        details="start SKILL VERSION --traffic T   the version takes T (0 < T < 1) of the students\n"
        "start SKILL VERSION --steps 5,25,50,100\n"
        "                                  a gradual rollout: each passing canary check moves it to the next\n"
        "                                  step, the last one promotes it; a tripped guardrail aborts it\n"
        "set SKILL --traffic T             change the canary's share\n"
        "promote SKILL                     the canary becomes production at 100%; the old production is archived\n"
        "abort SKILL                       the canary is archived; production takes 100% back\n"
        "status [SKILL]                    production and canary versions, traffic, since when",
    )
    canary = p.add_subparsers(dest="canary_command", required=True, metavar="ACTION")
    q = command(canary, "start", "start a canary: VERSION takes a share of traffic from production", change, output,
                details="Refused if a canary already runs: one at a time. Give --traffic, or --steps for a gradual rollout.")
    q.add_argument("skill", help=SKILL_HELP)
    q.add_argument("version", help=VERSION_HELP)
    share = q.add_mutually_exclusive_group(required=True)
    share.add_argument("--traffic", type=float, help="share of students the canary scores, 0 < T < 1")
    share.add_argument(
        "--steps", type=rollout_steps, metavar="P,P,...,100",
        help="gradual rollout: percents of students, increasing to 100; starts at the first, and each passing "
        "canary check (POST /tasks/canary-check) moves to the next, the last promoting the canary",
    )
    q.set_defaults(run=cmd_canary_start)
    q = command(canary, "set", "change the running canary's share of traffic", change, output)
    q.add_argument("skill", help=SKILL_HELP)
    q.add_argument("--traffic", type=float, required=True, help="share of students the canary scores, 0 < T < 1")
    q.set_defaults(run=cmd_canary_set)
    q = command(canary, "promote", "make the running canary production at full traffic; archive the old production", change, output)
    q.add_argument("skill", help=SKILL_HELP)
    q.set_defaults(run=cmd_canary_promote)
    q = command(canary, "abort", "archive the running canary; production takes all traffic back", change, output)
    q.add_argument("skill", help=SKILL_HELP)
    q.set_defaults(run=cmd_canary_abort)
    q = command(canary, "status", "show production and canary versions, their traffic and since when", output)
    q.add_argument("skill", nargs="?", help="only this skill (default: every skill)")
    q.set_defaults(run=cmd_canary_status)

    p = command(
        sub, "rollback", "abort the running canary; without one, restore the previous production version", change, output,
        details="During a canary, rollback ends the canary (production never stopped serving) and says so;\n"
        "run it again to roll back production itself. The version rolled back from is never restored by a\n"
        "later rollback, so rolling back twice walks further back.",
    )
    p.add_argument("skill", help=SKILL_HELP)
    p.set_defaults(run=cmd_rollback)

    p = command(
        sub, "archive", "withdraw a version that serves nothing, or abandon a reservation left by a dead publisher",
        change, output,
        details="The production version cannot be archived (promote another or roll back); archiving the running\n"
        "canary aborts it.",
    )
    p.add_argument("skill", help=SKILL_HELP)
    p.add_argument("version", help=VERSION_HELP)
    p.set_defaults(run=cmd_archive)

    p = command(sub, "history", "show every registry change of a skill: who, when, why, before and after", output)
    p.add_argument("skill", help=SKILL_HELP)
    p.set_defaults(run=cmd_history)

    p = command(sub, "list", "list registered versions (from the registry alone)", output)
    p.add_argument("--skill", help="only this skill (default: every skill)")
    p.set_defaults(run=cmd_list)

    url = local_url(settings)
    p = command(sub, "nightly", "fire the nightly run on a server and follow it to completion")
    p.add_argument("--url", type=service_url, default=url, help="base URL of the service (the local stack's, from HOST and PORT)")
    p.add_argument("--full", action="store_true", help="score every student, not only those with new data")
    p.add_argument("--run-id", help="run id (default: the server picks nightly-YYYYMMDD)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between progress checks")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    p.set_defaults(run=cmd_nightly)

    p = command(sub, "drift", "run a drift check on a server, print its summary and where its report is")
    p.add_argument("--url", type=service_url, default=url, help="base URL of the service (the local stack's, from HOST and PORT)")
    p.add_argument("--window-days", type=int, help="days of scoring to compare (default: the server's DRIFT_WINDOW_DAYS)")
    p.add_argument("--skill", action="append", default=[], help="only this skill (repeatable; default: every skill)")
    p.add_argument(
        "--open", type=Path, nargs="?", const=Path("drift-report.html"), default=None, metavar="FILE",
        help="write the HTML report to a local file (default name: drift-report.html) from the configured store",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.set_defaults(run=cmd_drift)
    return parser


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Runs one command; returns the exit status: 0, 1 for a refused or failed operation, 2 for a bad setting.
    A usage error exits 2 through argparse. `env` replaces the process environment (tests)."""
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = build_parser(settings).parse_args(argv)
    try:
        return int(args.run(Services(settings), args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.details:
            print(json.dumps(exc.details, indent=1), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
