"""Loads teacher ratings from a CSV (header: student_id, skill, rating[, rated_at, rater]) or JSON Lines file.

    python scripts/load_ratings.py ratings.csv
    python scripts/load_ratings.py var/demo_students.jsonl     # the generator's rows carry teacher_ratings

Ratings use a five-point rubric (1 to 5). Bad rows are reported with their line numbers and skipped;
the exit status is 1 if any row was bad.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scripts.command_line import HelpFormatter
from shared.ratings import load_ratings_file
from shared.services import Services
from shared.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("path", type=Path, help="a .csv or .jsonl file")
    args = parser.parse_args(argv)
    if not args.path.is_file():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 2
    services = Services(Settings.from_env())
    report = load_ratings_file(services.ratings, services.catalog, args.path)
    for bad in report.bad_rows:
        print(f"line {bad['line']}: {'; '.join(bad['problems'])}", file=sys.stderr)
    summary = report.to_dict()
    summary.pop("bad_rows")
    print(json.dumps(summary))
    return 1 if report.bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
