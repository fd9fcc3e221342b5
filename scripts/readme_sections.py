"""The README's generated sections: text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` that a script writes."""

from __future__ import annotations


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def section(readme: str, name: str) -> str:
    """Returns the text of the named section. Raises ValueError if its markers are missing."""
    begin, end = markers(name)
    if begin not in readme or end not in readme:
        raise ValueError(f"The README has no {begin} ... {end} section.")
    return readme.split(begin, 1)[1].split(end, 1)[0]


def with_section(readme: str, name: str, text: str) -> str:
    """Returns the README with the named section's text replaced by `text`. Raises ValueError if its markers are missing."""
    section(readme, name)
    begin, end = markers(name)
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}{end}{tail}"
