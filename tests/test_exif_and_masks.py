"""Phone photos (EXIF orientation) read as viewers show them in every loader and in predict's
outputs, and class-folder masks of any 0/k or one-colour convention read as their object."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from datamodules.folders import read_binary_mask
from datamodules.source import PngLabelSource, image_size, open_image
from tasks.segment import main

STORED_HW, SHOWN_HW = (60, 80), (80, 60)  # a portrait phone photo, stored sideways


def photo(path: Path, orientation: int = 6, seed: int = 0) -> np.ndarray:
    """Save a photo stored ``STORED_HW`` with EXIF ``orientation``; return its stored pixels
    (smooth, for little JPEG loss: a green ramp down the rows, a bright left edge, so that a
    wrong turn or flip shows)."""
    pixels = np.zeros((*STORED_HW, 3), dtype=np.uint8)
    pixels[..., 1] = np.linspace(0, 150, STORED_HW[0], dtype=np.uint8)[:, None]
    pixels[..., 2] = 40 * seed
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_open_image_applies_every_orientation_as_exif_transpose(
    tmp_path: Path, orientation: int
) -> None:
    """Lossless PNGs, so OpenCV (orientation 1) and Pillow decode the same pixels."""
    path = tmp_path / "photo.png"
    photo(path, orientation)
    with Image.open(path) as image:
        shown = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    pixels = open_image(path)
    np.testing.assert_array_equal(pixels, shown)
    assert image_size(path) == pixels.shape[:2]


def test_a_phone_jpeg_is_read_as_shown(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    stored = photo(path)
    pixels = open_image(path)
    assert pixels.shape == (*SHOWN_HW, 3) and image_size(path) == SHOWN_HW
    assert pixels[:10].mean() > 200 and pixels[10:].mean() < 100  # the left edge, turned on top
    turned = np.rot90(stored, k=-1).astype(int)  # orientation 6: a quarter turn clockwise
    assert np.abs(pixels.astype(int) - turned).mean() < 4  # JPEG loss only


def test_labels_match_the_image_as_shown(tmp_path: Path) -> None:
    image = tmp_path / "phone.jpg"
    photo(image)
    label = tmp_path / "phone.png"
    files = {"phone": (image, label)}
    Image.fromarray(np.ones(SHOWN_HW, dtype=np.uint8)).save(label)
    source = PngLabelSource("phones", 1, files)
    assert source.read("phone")[1].shape == SHOWN_HW and source.class_pixels("phone") == {0: 4800}
    Image.fromarray(np.ones(STORED_HW, dtype=np.uint8)).save(label)  # drawn on the stored pixels
    message = (
        r"size mismatch: image \S+phone\.jpg is \(80, 60\) as shown \(EXIF orientation 6 "
        r"applied\) but label \S+phone\.png is \(60, 80\) \(height, width\)$"
    )
    for read in (source.read, source.class_pixels):
        with pytest.raises(ValueError, match=message):
            read("phone")


def predict(tmp_path: Path, mask: Path) -> Path:
    """``predict`` (untrained: only the geometry matters) of the phone queries; the outputs."""
    output = tmp_path / "predictions"
    main(["predict", "--data.root", str(tmp_path / "shapes"), "--data.image_size", "64",
          "--data.num_workers", "0", "--untrained", "allow",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
          "--data.predict_support", f"[{tmp_path / 'support.jpg'}]",
          "--data.predict_support_masks", f"[{mask}]",
          "--data.predict_queries", f"[{tmp_path / 'queries'}]",
          "--prediction_writer.output_dir", str(output),
          "--prediction_writer.alpha", "0"])  # fmt: skip
    return output


def test_predict_writes_phone_photos_as_shown(tmp_path: Path) -> None:
    photo(tmp_path / "support.jpg")
    (tmp_path / "queries").mkdir()
    stored = {name: photo(tmp_path / "queries" / f"{name}.jpg", seed=k)
              for k, name in enumerate(("q1", "q2"), 1)}  # fmt: skip
    shown_mask = tmp_path / "shown.png"
    mask = np.zeros(SHOWN_HW, dtype=np.uint8)
    mask[20:60, 10:50] = 1
    Image.fromarray(mask).save(shown_mask)
    output = predict(tmp_path, shown_mask)
    for name, pixels in stored.items():
        assert Image.open(output / f"{name}.png").size == SHOWN_HW[::-1]  # (width, height)
        overlay = np.array(Image.open(output / f"{name}_overlay.jpg")).astype(int)
        turned = np.rot90(pixels, k=-1).astype(int)  # alpha 0: the query as shown
        assert overlay.shape == turned.shape and np.abs(overlay - turned).mean() < 4
    stored_mask = tmp_path / "stored.png"
    Image.fromarray(np.ascontiguousarray(mask.T)).save(stored_mask)
    message = (
        r"support mask '\S+stored\.png' is 80x60 but its image '\S+support\.jpg' is 60x80 as "
        r"shown \(EXIF orientation 6 applied\) \(width x height\)$"
    )
    with pytest.raises(ValueError, match=message):
        predict(tmp_path, stored_mask)


# --- class-folder masks -------------------------------------------------------------------------


def object_square(value: int | tuple[int, int, int] = 1) -> np.ndarray:
    """A 16 x 16 mask whose 8 x 8 centre holds ``value`` (grey level or colour)."""
    shape = (16, 16) if isinstance(value, int) else (16, 16, 3)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[4:12, 4:12] = value
    return mask


EXPECTED = object_square() == 1


@pytest.mark.parametrize(
    "mask",
    [object_square(1), object_square(2), object_square(100), object_square(255),
     object_square((255, 0, 0)), object_square((0, 0, 255)), object_square((255, 255, 255))],
    ids=["0/1", "0/2", "0/100", "0/255", "red-on-black", "blue-on-black", "white-on-black"],
)  # fmt: skip
def test_a_mask_of_0_and_one_value_is_binary(tmp_path: Path, mask: np.ndarray) -> None:
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    np.testing.assert_array_equal(read_binary_mask(path), EXPECTED)


def test_a_mask_with_values_from_128_keeps_hsnets_threshold(tmp_path: Path) -> None:
    """FSS-1000's anti-aliased masks: ``>= 128`` is the object, whatever lies below."""
    mask = object_square(255)
    mask[3, 4:12], mask[12, 4:12] = 127, 128  # edges of the object
    mask[0, 0] = 40
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    np.testing.assert_array_equal(read_binary_mask(path), mask >= 128)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(path)
    assert not read_binary_mask(path).any()  # an empty mask stays empty, no error


@pytest.mark.parametrize(
    ("mask", "found"),
    [(object_square(2) + object_square(1) * (np.arange(16) < 8), r"\[0, 2, 3\] \(L read as "),
     (object_square((255, 0, 0)) + object_square((0, 0, 200)) * (np.arange(16) < 8)[:, None],
      r"\[0, 76, 99\] \(RGB read as ")],
    ids=["grey-levels-below-128", "red-and-magenta"],
)  # fmt: skip
def test_several_values_below_128_are_an_error_not_an_empty_mask(
    tmp_path: Path, mask: np.ndarray, found: str
) -> None:
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    message = rf"^mask \S+mask\.png has values {found}grayscale\), several below 128: expected 0 "
    with pytest.raises(ValueError, match=message + r"and one object value .* >= 128 \(FSS-1000\)$"):
        read_binary_mask(path)
