"""The embedded stack's preparation: demo models trained and published if absent, so a fresh clone serves."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.artifacts import ARTIFACT_FILES
from shared.publishing import publish_version
from shared.services import Services

log = logging.getLogger(__name__)


def ensure_demo_models(services: Services, trained_dir: Path, seed: int = 7) -> list[str]:
    """Trains the skills that have no artifacts in trained_dir, then publishes and promotes every skill
    that has no production version; returns the skills it published."""
    catalog = services.catalog
    registry = services.registry
    serving = registry.serving()
    missing = [s for s in catalog.names if not any(v.stage == "production" for v in serving.get(s, []))]
    if not missing:
        return []
    untrained = [s for s in missing if not all((trained_dir / s / name).is_file() for name in ARTIFACT_FILES)]
    if untrained:
        from shared.training import TrainingConfig, train_catalog, write_trained

        log.info("training demo models", extra={"skills": untrained})
        for result in train_catalog(catalog, TrainingConfig(seed=seed), untrained).values():
            write_trained(result, trained_dir)
    for skill in missing:
        record = publish_version(registry, services.artifacts, trained_dir / skill)
        registry.promote(skill, record.version, "production")
        log.info("published demo model", extra={"skill": skill, "model_version": record.version})
    return missing
