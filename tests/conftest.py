import os
import tarfile
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


@pytest.fixture(scope="session")
def cifar10_test_folder(cifar10_archive, tmp_path_factory) -> Path:
    """The archive's 10,000 test JPEGs unpacked as ``ROOT/test/<class>/*.jpg``; skips like the archive."""
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(cifar10_archive) as tar:
        tar.extractall(root, members=[m for m in tar if m.name.startswith("test/")], filter="data")
    return root
