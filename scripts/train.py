"""Trains every skill of the catalog on synthetic students and writes their artifacts.

    python scripts/train.py [--out models/artifacts] [--seed 7] [--students 8000] [--skills a,b] [--if-absent]
    python scripts/train.py --write-readme     # also writes the README's table of held-out AUC

The README's AUC table is generated here from the training output, so it cannot drift from what
training produces; tests/test_training.py checks that they agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scripts import readme_sections
from scripts.command_line import HelpFormatter
from shared.artifacts import ARTIFACT_FILES
from shared.catalog import SkillCatalog
from shared.settings import PROJECT_ROOT, Settings
from shared.training import TrainingConfig, train_catalog, write_trained

DEFAULT_OUT = PROJECT_ROOT / "models" / "artifacts"
README = PROJECT_ROOT / "README.md"
README_SECTION = "auc-table"  # the README section --write-readme writes


def auc_table(metadata: dict[str, dict], skills: list[str]) -> str:
    """Returns the README's Markdown table of held-out AUC (model and baseline) from each skill's metadata."""
    config = next(iter(metadata.values()))["training"]
    lines = [
        f"Held-out AUC of the demo models (seed {config['seed']}, {config['n_students']:,} students), "
        "as `scripts/train.py --write-readme` wrote it:",
        "",
        "| skill | XGBoost | logistic baseline |",
        "| --- | --- | --- |",
    ]
    for skill in skills:
        m, b = metadata[skill]["metrics"], metadata[skill]["baseline_metrics"]
        lines.append(f"| {skill} | {m['auc']:.3f} | {b['auc']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for <skill>/ artifact folders")
    parser.add_argument("--seed", type=int, default=TrainingConfig.seed, help="seed of the data and the model")
    parser.add_argument("--students", type=int, default=TrainingConfig.n_students, help="synthetic students")
    parser.add_argument("--skills", help="comma-separated skills (default: all in the catalog)")
    parser.add_argument("--if-absent", action="store_true", help="train only skills whose artifacts are missing")
    parser.add_argument(
        "--write-readme", action="store_true", help="write the README's AUC table from this training (all skills, default seed and size)"
    )
    args = parser.parse_args(argv)

    catalog = SkillCatalog.load(Settings.from_env().skill_catalog)
    skills = [s for s in (args.skills or "").split(",") if s] or catalog.names
    for skill in skills:
        catalog.skill(skill)
    if args.if_absent:
        skills = [s for s in skills if not all((args.out / s / name).is_file() for name in ARTIFACT_FILES)]
        if not skills:
            print(f"all skills already trained in {args.out}")
            return 0
    started = time.perf_counter()
    config = TrainingConfig(n_students=args.students, seed=args.seed)
    trained = train_catalog(catalog, config, skills)
    print(f"{'skill':<20}{'auc':>8}{'baseline':>10}{'f1':>8}{'brier':>8}  folder")
    for skill, result in trained.items():
        folder = write_trained(result, args.out)
        m, b = result.metadata["metrics"], result.metadata["baseline_metrics"]
        print(f"{skill:<20}{m['auc']:>8.4f}{b['auc']:>10.4f}{m['f1']:>8.4f}{m['brier']:>8.4f}  {folder}")
    if args.write_readme:
        if set(trained) != set(catalog.names) or config != TrainingConfig():
            parser.error("--write-readme needs every skill trained with the default --seed and --students")
        table = auc_table({skill: result.metadata for skill, result in trained.items()}, catalog.names)
        README.write_text(readme_sections.with_section(README.read_text(), README_SECTION, table))
    print(json.dumps({"trained": len(trained), "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
