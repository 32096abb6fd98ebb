import functools
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

# The tests run in this process on the CPU (two threads, the size of the CI machine), so CUDA is
# hidden from it before torch looks; tests marked `gpu` run their commands in subprocesses with
# the environment pytest was started with, CUDA included, and are skipped where there is none.
STARTED_WITH = dict(os.environ)
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# One thread per core, as torch starts, and not one per core free of other work (allconv's own
# choice): tests compare runs bit for bit, and the thread count changes the rounding. Their
# subprocesses inherit it; tests of the choice itself remove it.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR10_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"


@functools.cache
def cuda_devices() -> int:
    """GPUs visible to the environment pytest started with: asked of torch in a subprocess (this
    one has CUDA hidden), and only where an NVIDIA driver is present at all."""
    if not (Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi")):
        return 0
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, env=STARTED_WITH, timeout=120)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and cuda_devices() == 0:
        skip = pytest.mark.skip(reason="needs CUDA: no GPU is visible to this machine")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def own_working_directory(tmp_path_factory, monkeypatch) -> Path:
    """Each test runs in a folder of its own, so no test reads a file that a user's commands (or
    another test) left in the working directory, nor leaves one there: tests reach the checkout's
    files through REPO."""
    folder = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def image_cache(tmp_path_factory) -> Path:
    """The folder decoded image folders are cached in (allconv_cli.data.cache): one of this
    session's, so no test writes to the user's ~/.cache or reads an entry another session left."""
    folder = tmp_path_factory.mktemp("image-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALLCONV_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def gpu_env(image_cache) -> dict:
    """The environment for a `gpu` test's subprocesses: pytest's own (CUDA visible), unbuffered,
    with this checkout on PYTHONPATH and this test run's image cache."""
    return {**STARTED_WITH, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "ALLCONV_CACHE_DIR": str(image_cache)}


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


@pytest.fixture(scope="session")
def cuda_count() -> int:
    """How many GPUs the `gpu` tests' subprocesses see."""
    return cuda_devices()
