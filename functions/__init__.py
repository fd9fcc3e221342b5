"""HTTP function targets of the skill inference service."""
