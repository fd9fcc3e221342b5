"""Runs the whole local stack in the foreground: demo models (trained if absent), then every function on one server.

    python scripts/run_local.py            # serves http://127.0.0.1:$PORT until Ctrl-C

Settings come from the environment (see the README's table); the server runs one worker process
per core (SERVER_WORKERS), each with one thread, which measured steadiest for this CPU-bound work.
"""

from __future__ import annotations

import os
import sys

from shared.local_stack import ensure_demo_models, ensure_demo_students, gunicorn_args
from shared.logs import configure_logging
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings


def main() -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    services = Services(settings)
    ensure_demo_models(services, PROJECT_ROOT / "models" / "artifacts")
    ensure_demo_students(services)
    print(f"serving on http://{settings.host}:{settings.port} with {settings.server_workers} workers (Ctrl-C stops)", flush=True)
    args = gunicorn_args(settings)
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", *args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
