"""The pinned stack (constraints.txt) installs on every Python that setup.py's python_requires admits,
and on none just outside it: each pin resolved for that interpreter against the package index."""

import os
import re
import subprocess
import sys

import pytest
from packaging.specifiers import SpecifierSet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_requires() -> SpecifierSet:
    setup = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    return SpecifierSet(re.search(r'python_requires="([^"]+)"', setup).group(1))


def _resolve(version: str, tmp_path) -> subprocess.CompletedProcess:
    """pip's answer to "is there a release of each pin for Python ``version``?" (no install)."""
    pins = [line.split("#")[0].strip() for line in open(os.path.join(REPO, "constraints.txt"), encoding="utf-8")]
    requirements = tmp_path / "pins.txt"
    requirements.write_text("\n".join(p for p in pins if p) + "\n")
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                           "--python-version", version, "--target", str(tmp_path / "target"), "-q",
                           "-r", str(requirements)], capture_output=True, text=True, timeout=600)


ADMITTED = [f"3.{minor}" for minor in range(8, 20) if _python_requires().contains(f"3.{minor}.0")]


@pytest.mark.parametrize("version", ADMITTED + [f"3.{int(ADMITTED[0][2:]) - 1}", f"3.{int(ADMITTED[-1][2:]) + 1}"])
def test_the_pins_install_on_every_python_that_python_requires_admits(version, tmp_path):
    out = _resolve(version, tmp_path)
    if version in ADMITTED:
        assert out.returncode == 0, out.stderr[-2000:]
    else:  # the bound is tight: the pins do not install just outside it
        assert out.returncode != 0 and "No matching distribution found" in out.stderr, out.stderr[-2000:]


def test_the_libtpu_pin_is_the_one_the_pinned_jax_asks_for():
    """``.[tpu]`` installs libtpu as pinned in constraints.txt; jax's own tpu extra says which it was built with."""
    import importlib.metadata

    from packaging.requirements import Requirement

    pins = dict(line.split("#")[0].strip().split("==") for line in open(os.path.join(REPO, "constraints.txt"))
                if "==" in line.split("#")[0])
    assert importlib.metadata.version("jax") == pins["jax"]
    [wanted] = [Requirement(r) for r in importlib.metadata.requires("jax")
                if r.startswith("libtpu") and 'extra == "tpu"' in r]
    assert wanted.specifier.contains(pins["libtpu"]), (str(wanted), pins["libtpu"])
