import os
from pathlib import Path

import pytest

# Tests run on the CPU with two threads, the size of the CI machine.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR10_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    """The real CIFAR-10 JPEG archive in ../shared/data; skips where a clone has none."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is not beside this checkout")
    return CIFAR10_ARCHIVE
