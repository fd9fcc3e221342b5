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
