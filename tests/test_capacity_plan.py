"""The capacity plan: its arithmetic, and that the README shows what the script computes from the recorded figures."""

from __future__ import annotations

import json

import pytest

from scripts import capacity_plan, readme_sections
from shared.settings import PROJECT_ROOT


def test_the_cold_ramp_admits_500_then_750_then_1125_writes_per_second() -> None:
    assert capacity_plan.ramp_writes(900) == pytest.approx(500 * 300 + 750 * 300 + 1125 * 300)
    assert capacity_plan.ramp_minutes_to(500) == 0
    assert capacity_plan.ramp_minutes_to(501) == 5


def test_the_readme_shows_the_plan_the_script_computes_from_the_recorded_figures() -> None:
    figures = json.loads(capacity_plan.FIGURES_FILE.read_text())
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme_sections.section(readme, capacity_plan.README_SECTION)
    assert section.strip() == capacity_plan.plan(figures).strip(), (
        "the README's capacity plan is stale: run scripts/capacity_plan.py --write-readme"
    )


def test_the_plan_follows_the_measured_figures() -> None:
    figures = json.loads(capacity_plan.FIGURES_FILE.read_text())
    faster = {**figures, "cpu_seconds_per_student": figures["cpu_seconds_per_student"] / 2}
    assert capacity_plan.plan(faster) != capacity_plan.plan(figures)
    assert f"{1 / faster['cpu_seconds_per_student']:,.0f} students x 7 skills per vCPU-second" in capacity_plan.plan(faster)
