"""The Google Cloud backends: one module per Google service, each filling a Protocol of the core.

Nothing in the core imports this package; `shared.services` imports a module of it only when the
settings name a GCP backend, so a process on the embedded default never loads a Google client.
"""
