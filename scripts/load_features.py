"""Loads student features from a CSV (header: student_id, <feature>, ...) or JSON Lines file into the feature store.

    python scripts/load_features.py var/demo_students.jsonl [--strict]

Bad rows are reported with their line numbers and skipped; the exit status is 1 if any row was bad.
A student left without a feature some skill requires is warned about (that skill fails at night);
with --strict, such a student's rows are refused as bad rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scripts.command_line import HelpFormatter
from shared.feature_store import load_feature_file
from shared.services import Services
from shared.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("path", type=Path, help="a .csv or .jsonl file")
    parser.add_argument("--strict", action="store_true", help="refuse a student left without a required feature")
    args = parser.parse_args(argv)
    if not args.path.is_file():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 2
    services = Services(Settings.from_env())
    report = load_feature_file(services.features, services.catalog, args.path, strict=args.strict)
    for bad in report.bad_rows:
        print(f"line {bad['line']}: {'; '.join(bad['problems'])}", file=sys.stderr)
    for entry in report.incomplete:
        missing = "; ".join(f"{skill} needs {', '.join(names)}" for skill, names in entry["missing"].items())
        print(f"warning: line {entry['line']}: student {entry['student_id']} lacks required features ({missing})", file=sys.stderr)
    summary = report.to_dict()
    summary.pop("bad_rows")
    print(json.dumps(summary))
    return 1 if report.bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
