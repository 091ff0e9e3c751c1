"""Shared pytest fixtures and session settings."""

from pathlib import Path

import pytest
import torch

# The reference outputs of NVlabs/edm's own code live beside the checkout: /work/shared/fixtures/edm.
EDM_FIXTURES_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "edm"


def pytest_configure(config: pytest.Config) -> None:
    # The suite runs tiny networks on a 2-core machine: intra-op threads cost more in synchronisation than
    # they gain (10× slower when the cores are busy), and EDM's fixtures were computed with one thread.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def edm_fixtures_dir() -> Path:
    """Folder of the EDM reference fixtures; tests that need it are skipped when it is absent."""
    if not EDM_FIXTURES_DIR.is_dir():
        pytest.skip(f"EDM reference fixtures not found at {EDM_FIXTURES_DIR} "
                    "(they sit beside the repository in shared/fixtures/edm)")
    return EDM_FIXTURES_DIR
