"""Writes synthetic demo students (features and teacher ratings) as JSON Lines, deterministic for a seed.

    python scripts/generate_students.py --students 1000 --seed 11 --out var/demo_students.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.command_line import HelpFormatter
from shared.catalog import SkillCatalog
from shared.feature_store import write_cohort_jsonl
from shared.settings import PROJECT_ROOT, Settings
from shared.synthetic import generate_cohort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--students", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--prefix", default="student", help="student ids are <prefix>-<number>")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "var" / "demo_students.jsonl")
    args = parser.parse_args(argv)
    catalog = SkillCatalog.load(Settings.from_env().skill_catalog)
    cohort = generate_cohort(catalog, args.students, args.seed, id_prefix=args.prefix)
    rows = write_cohort_jsonl(args.out, cohort.student_ids, cohort.features, cohort.teacher_ratings)
    print(f"wrote {rows} students to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
