"""Wall-clock timestamps as the service stores and shows them: ISO 8601, UTC, millisecond precision."""

from __future__ import annotations

from datetime import datetime, timezone


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
