"""Build allconv_cli/assets/cifar10-sample.safetensors from the CIFAR-10 JPEG copy in ../shared/data.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10 && python scripts/make_sample.py /tmp/cifar10

The first 400 training and 100 test JPEGs of each class (sorted by file name), bytes unchanged.
"""

import sys
from pathlib import Path

from allconv_cli.data.sample import SAMPLE_FILE, write_sample

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "allconv_cli" / "assets" / SAMPLE_FILE
    print(write_sample(Path(sys.argv[1]), out, {"train": 400, "test": 100}))
