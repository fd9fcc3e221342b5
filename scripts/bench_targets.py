"""Benchmark targets: a figure's goal, judged and described the same way by every benchmark script."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A figure's goal: at most (or at least) a value."""

    limit: float
    at_most: bool = True

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit

    def describe(self, unit: str) -> str:
        return f"{'<=' if self.at_most else '>='} {self.limit:g}{unit}"
