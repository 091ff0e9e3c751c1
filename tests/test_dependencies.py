"""The installed packages lie inside the bounds setup.py declares, so a test run proves the versions it ran on.

CI installs into a fresh environment with `pip install --upgrade`, so it runs the newest release inside each
upper bound; a package that decides numbers (torch, numpy, scipy, pillow, torchvision) must carry both bounds.
"""

from importlib import metadata

import pytest
from packaging.requirements import Requirement

NUMERIC = ("torch", "torchvision", "numpy", "scipy", "pillow")


def requirements() -> dict[str, Requirement]:
    found = [Requirement(text) for text in metadata.requires("pid-diffusion") or []]
    return {req.name.lower(): req for req in found if req.marker is None}


@pytest.mark.parametrize("name", NUMERIC)
def test_numeric_dependency_has_both_bounds_and_is_inside_them(name):
    requirement = requirements()[name]
    operators = {spec.operator for spec in requirement.specifier}
    assert operators & {">=", ">"} and operators & {"<", "<="}, f"{requirement}: needs a lower and an upper bound"
    installed = metadata.version(name)
    assert requirement.specifier.contains(installed, prereleases=True), f"{name} {installed} outside {requirement}"
