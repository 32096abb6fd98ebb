import numpy as np
import pytest
import torch
from PIL import Image

from allconv_cli.data.images import open_image


def test_modes_are_converted(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cases = {
        "gray.png": Image.fromarray(rgb[..., 0], "L"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)]), "RGBA"),
        "deep.png": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).convert("I;16"),
        "photo.jpg": Image.fromarray(rgb),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        assert open_image(tmp_path / name).mode == "RGB"
        assert open_image(tmp_path / name, channels=1).size == (30, 20)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 40, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg").size == (10, 40)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        open_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        open_image(tmp_path / "text.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        open_image(tmp_path / "cut.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="decompression bomb"):
        open_image(tmp_path / "big.png")


def test_fit_image_scales_to_cover_then_center_crops():
    import torch

    from allconv_cli.data import folders
    from allconv_cli.data.images import fit_image, fit_options

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    # crop_pct 1: the 60 px side is scaled to 32 (90 -> 48), then 8 px are cut from each side
    expected = np.asarray(img.resize((48, 32), Image.Resampling.BILINEAR).crop((8, 0, 40, 32)))
    fitted = fit_image(img, (3, 32, 32), "bilinear", 1.0)
    assert fitted.dtype == torch.uint8 and fitted.shape == (3, 32, 32)
    assert torch.equal(fitted, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    assert torch.equal(folders.fit_file(img, (3, 32, 32), ("bilinear", 1.0)), fitted)  # training fits images the same way
    # crop_pct 0.8: cover 40 px (90 -> 60), keep the centre 32 px
    expected = np.asarray(img.resize((60, 40), Image.Resampling.BICUBIC).crop((14, 4, 46, 36)))
    assert torch.equal(fit_image(img, (3, 32, 32), "bicubic", 0.8), torch.from_numpy(expected.copy()).permute(2, 0, 1))
    at_size = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert torch.equal(fit_image(at_size, (3, 32, 32)), torch.from_numpy(np.asarray(at_size).copy()).permute(2, 0, 1))
    assert fit_image(img, (1, 8, 12)).shape == (1, 8, 12)
    assert fit_options({"interpolation": "bicubic", "crop_pct": 0.875}) == ("bicubic", 0.875)
    assert fit_options(None) == ("bilinear", 1.0)
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        fit_image(img, (3, 32, 32), "cubic")
    with pytest.raises(ValueError, match="crop_pct 1.5"):
        fit_image(img, (3, 32, 32), crop_pct=1.5)


def test_the_registered_configuration_sets_the_fitting(tmp_path):
    import torch

    from allconv_cli.files.loading import load_checkpoint
    from allconv_cli.files.weights import save_weights
    from allconv_cli.models import create_model

    meta = {"model": "all_cnn_imagenet", "model_kwargs": {"num_classes": 4}, "input_size": [3, 224, 224],
            "classes": ["a", "b", "c", "d"],
            "preprocess": {"kind": "standardize", "mean": [0.5] * 3, "std": [0.25] * 3}}
    save_weights(tmp_path / "model.safetensors", create_model("all-cnn-imagenet", num_classes=4), meta)
    loaded = load_checkpoint(tmp_path)
    assert (loaded.interpolation, loaded.crop_pct) == ("bilinear", 0.875)  # 256 -> 224, the registry's
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "a.png")
    images, inputs = loaded.read_images([tmp_path / "a.png"])
    assert images.shape == (1, 3, 224, 224) and torch.equal(inputs, loaded.preprocess(images))


def test_training_and_evaluation_fit_images_by_the_models_configuration(tmp_path, monkeypatch):
    """load_split fits every file with the (interpolation, crop_pct) it is given, and the trainer
    and evaluation give it the model's registered ones."""
    from PIL import Image as PILImage

    from allconv_cli import train as trainer
    from allconv_cli.data import datasets
    from allconv_cli.data.images import fit_image, fit_options, open_image
    from allconv_cli.models import default_config
    from allconv_cli.train import settings as configuration

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            PILImage.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(tmp_path / split / cls / "0.png")
    data = datasets.load_split("imagefolder", "train", tmp_path, (3, 32, 32), fit=("bicubic", 0.5))
    expected = fit_image(open_image(tmp_path / "train" / "a" / "0.png"), (3, 32, 32), "bicubic", 0.5)
    assert torch.equal(data.images[0], expected)
    assert not torch.equal(data.images[0], fit_image(open_image(tmp_path / "train" / "a" / "0.png"), (3, 32, 32)))

    asked = []
    real = datasets.load_split
    monkeypatch.setattr(datasets, "load_split", lambda *args: asked.append(args[-1]) or real(*args))
    config = configuration.resolve(None, dataset="imagefolder", data_dir=str(tmp_path), batch_size=2, epochs=1)
    trainer.build(config, torch.device("cpu"))
    assert asked == [fit_options(default_config("all-cnn-c"))] * 2 == [("bilinear", 1.0)] * 2
