"""The README documents every setting the service reads, and nothing it does not read."""

from __future__ import annotations

import re

from shared.settings import PROJECT_ROOT


def test_readme_settings_table_matches_the_settings_the_code_reads():
    source = (PROJECT_ROOT / "shared" / "settings.py").read_text()
    read = set(re.findall(r'reader\.\w+\(\s*"([A-Z_]+)"', source))
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.MULTILINE))
    assert read, "no settings found in shared/settings.py"
    assert documented == read


def test_no_module_but_settings_reads_the_environment():
    offenders = [
        str(path.relative_to(PROJECT_ROOT))
        for folder in ("shared", "functions")
        for path in (PROJECT_ROOT / folder).rglob("*.py")
        if path.name != "settings.py" and re.search(r"os\.environ|os\.getenv", path.read_text())
    ]
    # local_stack passes the environment on to the server processes it starts; it reads no setting from it.
    assert set(offenders) <= {"shared/local_stack.py"}, offenders


def test_make_help_lists_every_target_with_its_purpose():
    import subprocess

    makefile = (PROJECT_ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    listed = subprocess.run(["make", "--no-print-directory", "help"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    described = {line.split()[0] for line in listed.stdout.splitlines() if len(line.split()) > 1}
    assert phony <= described, f"make help does not describe: {sorted(phony - described)}"
