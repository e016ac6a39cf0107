"""README and docs/: every relative link reaches a file and heading of this repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(path: Path) -> set:
    heads = [l.lstrip("#").strip() for l in path.read_text().splitlines() if l.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_links_stay_inside_the_repository_and_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.is_relative_to(ROOT) and path.is_file(), f"{page.name}: {target}"
            assert not anchor or anchor in _anchors(path), f"{page.name}: {target}"


def test_readme_stays_a_user_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 380
