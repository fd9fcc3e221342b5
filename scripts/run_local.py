"""Runs the whole local stack in the foreground: demo models (trained if absent), then every function on one server.

    python scripts/run_local.py            # serves http://127.0.0.1:$PORT until Ctrl-C

Settings come from the environment (see the README's table); the server runs one worker process
per core (SERVER_WORKERS), each with one thread, which measured steadiest for this CPU-bound work.
"""

from __future__ import annotations

import argparse
import os
import sys

from scripts.command_line import HelpFormatter
from shared.local_stack import ensure_demo_models, ensure_demo_students, gunicorn_args
from shared.logs import configure_logging
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser: the script takes no options (settings come from the environment), so that
    --help prints this help and exits instead of starting a server."""
    return argparse.ArgumentParser(
        prog="run_local.py", description=__doc__, formatter_class=HelpFormatter
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
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
