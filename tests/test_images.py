import numpy as np
import pytest
from PIL import Image

from allconv_cli.images import open_image


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
