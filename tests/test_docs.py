"""The docs: README short enough to read, the MkDocs site builds with --strict (broken links, anchors and
pages left out of the nav fail it), and the config reference page is what the code generates."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_is_a_front_page_not_a_manual():
    lines = open(os.path.join(REPO, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= 250, f"README has {len(lines)} lines: move detail to a page under docs/"


def test_the_config_reference_page_is_generated_from_the_code():
    from sail_jax.config_reference import markdown

    page = open(os.path.join(REPO, "docs", "config_reference.md"), encoding="utf-8").read()
    assert page == markdown(), "docs/config_reference.md is stale: python -m sail_jax.config_reference > it"


def test_the_site_builds_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "quickstart" / "index.html").exists()


def test_readme_links_to_docs_pages_that_exist():
    import re

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all(os.path.exists(os.path.join(REPO, link)) for link in links), links
