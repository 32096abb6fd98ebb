"""Make the bundled weights (allconv_cli/assets/all-cnn-c-cifar10.safetensors) from a finished run.

    python scripts/bundle_weights.py RUN_DIR [MORE ...] --data-dir /tmp/cifar10 --trained-on "what, where, when"

Casts the run's weights to fp16 (half the file), evaluates that fp16 file itself on the whole
test split (one view, then with the mirror averaged in), and writes it with metadata stating the
measured errors, the recipe and the words of ``--trained-on``; a run started with ``--init``
also keeps, as ``init_from``, the recipe, words and errors of the weights it started from.
Given MORE weights (run folders or allconv .safetensors of the same model, e.g. the end of the
cycle RUN_DIR started from), it bundles the mean of all their weights and BatchNorm statistics
instead, and names them under ``averaged_with``. Prints the metrics it wrote.
"""

import argparse
import json
from pathlib import Path

import torch

from allconv_cli.evaluate import evaluate_checkpoint
from allconv_cli.files import weights as checkpoint
from allconv_cli.files.loading import BUNDLED_CHECKPOINT
from allconv_cli.train import load_run_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished allconv train run folder")
    parser.add_argument("more", type=Path, nargs="*", help="weights of the same model to average with it")
    parser.add_argument("--data-dir", required=True, help="the CIFAR-10 ImageFolder copy (train/, test/)")
    parser.add_argument("--trained-on", required=True, help="data, hardware and date, in words")
    parser.add_argument("--out", type=Path, default=BUNDLED_CHECKPOINT)
    args = parser.parse_args()

    model, meta, preprocess = checkpoint.load_model(args.run)
    if args.more:
        averaged = checkpoint.average_weights([args.run, *args.more])
        checkpoint.load_state(model, averaged, "averaged weights")
    config = load_run_config(args.run)
    meta.update(data_dir=None, trained_on=args.trained_on, recipe=json.loads(config.to_json()))
    meta["recipe"]["data_dir"] = None  # a path on the machine that trained it, meaningless elsewhere
    if config.init is not None:  # a further cycle: keep the recipe and figures of the weights it began from
        earlier = checkpoint.load_weights(config.init)[1]
        meta["recipe"]["init"] = Path(config.init).name
        meta["init_from"] = {key: earlier.get(key) for key in ("trained_on", "recipe", "metrics", "init_from")}
    if args.more:
        meta["averaged_with"] = [path.name for path in args.more]
    unmeasured = args.out.with_name(args.out.stem + ".unmeasured.safetensors")
    checkpoint.save_weights(unmeasured, model, {**meta, "metrics": {}}, preprocess, dtype=torch.float16)
    try:
        single, mirrored = (evaluate_checkpoint(unmeasured, "imagefolder", args.data_dir, tta=tta, precision="fp32")
                            for tta in ("none", "flip"))
    finally:
        unmeasured.unlink()  # evaluated below or not at all: never left beside the real file
    metrics = {"test_top1_error": round(single["top1_error"], 2), "test_top5_error": round(single["top5_error"], 2),
               "test_loss": round(single["loss"], 4), "test_top1_error_flip_tta": round(mirrored["top1_error"], 2),
               "test_images": single["count"],
               "measured_on": "this fp16 file in fp32 arithmetic, the 10,000 test images of the CIFAR-10 JPEG copy"}
    checkpoint.save_weights(args.out, model, {**meta, "metrics": metrics}, preprocess, dtype=torch.float16)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
