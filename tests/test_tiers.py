"""The suite's own rules (tests/conftest.py): the fast tier stays in-process, the tests that take both cores share
one pytest-xdist group, and test modules share helpers only through the helper modules."""

import ast
import subprocess
from pathlib import Path

import pytest

from conftest import FAST, SLOW, TWO_CORES

TESTS = Path(__file__).resolve().parent


def test_a_fast_test_that_starts_a_process_fails_naming_the_marker(request):
    assert request.node.get_closest_marker(FAST) and not request.node.get_closest_marker(SLOW)
    with pytest.raises(pytest.fail.Exception, match=f"mark the test @pytest.mark.{SLOW}"):
        subprocess.run(["true"], check=True)


@pytest.mark.two_cores
def test_a_two_cores_test_is_slow_and_in_its_xdist_group(request):
    groups = [mark.args[0] for mark in request.node.iter_markers("xdist_group")]
    assert request.node.get_closest_marker(SLOW) and not request.node.get_closest_marker(FAST)
    assert groups == [TWO_CORES]
    assert subprocess.run(["true"]).returncode == 0  # a slow test may start processes


def test_no_test_module_imports_another():
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        offenders = sorted(name for name in imported if name.split(".")[0].startswith("test_"))
        assert not offenders, f"{path.name} imports {offenders}: shared helpers belong in tests/factories.py"
