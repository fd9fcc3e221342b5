"""Operator command line for the skill inference service: publish, promote, roll back and list model versions,
and fire a nightly run against a server.

Runs against the stores the environment configures (ARTIFACT_STORE, DATABASE_URL), exactly as the
functions see them. Every subcommand has --help.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, ServiceError
from shared.publishing import publish_version
from shared.registry import STAGES, listing
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings

DEFAULT_TRAINED = PROJECT_ROOT / "models" / "artifacts"


def cmd_publish(services: Services, args: argparse.Namespace) -> Any:
    skills = services.catalog.names if args.all else [services.catalog.skill(s).skill for s in args.skill]
    if not skills:
        raise SystemExit("publish: name --skill SKILL (repeatable) or --all")
    published = []
    for skill in skills:
        record = publish_version(services.registry, services.artifacts, args.trained / skill, args.version, args.bump)
        if args.promote:
            record = services.registry.promote(skill, record.version, "production")
        published.append({"skill": skill, **record.to_dict()})
    return published


def cmd_promote(services: Services, args: argparse.Namespace) -> Any:
    skill = services.catalog.skill(args.skill).skill
    record = services.registry.promote(skill, args.version, args.stage, args.traffic)
    return {"skill": skill, **record.to_dict()}


def cmd_rollback(services: Services, args: argparse.Namespace) -> Any:
    skill = services.catalog.skill(args.skill).skill
    record = services.registry.rollback(skill)
    return {"skill": skill, **record.to_dict()}


def cmd_list(services: Services, args: argparse.Namespace) -> Any:
    skills = [services.catalog.skill(args.skill).skill] if args.skill else services.catalog.names
    entries = listing(services.registry, skills)
    if args.json:
        return {"skills": entries}
    print(f"{'skill':<20}{'version':<10}{'stage':<12}{'traffic':>8}  {'auc':>7}  created_at")
    for entry in entries:
        for v in entry["versions"]:
            auc = v["metrics"].get("heldout", {}).get("auc", float("nan"))
            print(f"{entry['skill']:<20}{v['version']:<10}{v['stage']:<12}{v['traffic']:>8.2f}  {auc:>7.4f}  {v['created_at']}")
    return None


def cmd_nightly(services: Services, args: argparse.Namespace) -> Any:
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
        done = run["students_scored"] + run["students_failed"]
        _progress(done, total, time.monotonic() - started)
        if run["status"] != "running":
            break
        if time.monotonic() > deadline:
            print(file=sys.stderr)
            raise SystemExit(f"nightly: run {run_id} still running after {args.timeout:.0f} s")
        time.sleep(args.poll)
    print(file=sys.stderr)
    return {**run, "seconds": round(time.monotonic() - started, 2)}


def _progress(done: int, total: int, seconds: float) -> None:
    width = 40
    share = done / total if total else 1.0
    bar = "#" * int(share * width)
    print(f"\r[{bar:<{width}}] {done}/{total} students  {seconds:6.1f} s", end="", file=sys.stderr, flush=True)


def _http_json(method: str, url: str, body: Any, timeout: float) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{method} {url} answered {exc.code}: {exc.read().decode(errors='replace')}") from None
    except OSError as exc:
        raise SystemExit(f"{method} {url} failed: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skillctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("publish", help="upload trained artifacts and register a new version (stage staging)")
    p.add_argument("--skill", action="append", default=[], help="skill to publish (repeatable)")
    p.add_argument("--all", action="store_true", help="publish every skill of the catalog")
    p.add_argument("--trained", type=Path, default=DEFAULT_TRAINED, help="folder of <skill>/ training outputs")
    p.add_argument("--version", help="version to register (default: the next one)")
    p.add_argument("--bump", choices=("major", "minor", "patch"), default="minor", help="how to pick the next version")
    p.add_argument("--promote", action="store_true", help="also promote the new version to production")
    p.set_defaults(run=cmd_publish)

    p = sub.add_parser("promote", help="move a version to a stage (production by default)")
    p.add_argument("skill")
    p.add_argument("version")
    p.add_argument("--stage", choices=STAGES, default="production")
    p.add_argument("--traffic", type=float, help="share of students for a canary, between 0 and 1")
    p.set_defaults(run=cmd_promote)

    p = sub.add_parser("rollback", help="restore the skill's previous production version")
    p.add_argument("skill")
    p.set_defaults(run=cmd_rollback)

    p = sub.add_parser("list", help="list registered versions (from the registry alone)")
    p.add_argument("--skill", help="only this skill")
    p.add_argument("--json", action="store_true", help="print the model-listing API's JSON")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("nightly", help="fire the nightly run on a server and follow it to completion")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="base URL of the service")
    p.add_argument("--full", action="store_true", help="score every student, not only those with new data")
    p.add_argument("--run-id", help="run id (default: the server picks nightly-YYYYMMDD)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between progress checks")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    p.set_defaults(run=cmd_nightly)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        services = Services(Settings.from_env())
        result = args.run(services, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.details:
            print(json.dumps(exc.details, indent=1), file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
