"""The loader's PNG decoding: every installed decoder gives Pillow's pixels, bit for bit, on RGB frames and 8-bit
label PNGs; other PNG modes go to Pillow; a damaged file is a one-line error whichever decoder reads it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import png
from harness.data.cityscapes import decode_image, decode_train_ids
from harness.data.labels import label_ids_to_train_ids
from harness.data.synthetic import PHOTO_LIKE, write_synthetic
from harness.errors import BenchError

INSTALLED = png.installed_decoders()


def encoded(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = write_synthetic(tmp_path_factory.mktemp("png"), train_images=2, val_images=0, size=(320, 160),
                           progress=False, **PHOTO_LIKE)
    return sorted(root.rglob("*.png"))


@pytest.mark.parametrize("decoder", INSTALLED)
def test_every_installed_decoder_gives_pillows_pixels_on_frames_and_labels(decoder: str, frames: list[Path]):
    rng = np.random.default_rng(0)
    inputs = [path.read_bytes() for path in frames] + [
        encoded(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),  # odd sizes, every value
        encoded(rng.integers(0, 256, (37, 53), dtype=np.uint8)),
        encoded(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), transparency=(0, 0, 0)),  # tRNS: not applied
    ]
    for data in inputs:
        with Image.open(io.BytesIO(data)) as img:
            expected = np.asarray(img)
            assert png.plain_header(data) == png.PngHeader(img.width, img.height, img.mode)  # the IHDR read as Pillow
        assert img.mode in ("L", "RGB")
        got = png.decode_png(data, decoder)
        assert got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected)
        assert got.flags.writeable


def test_the_loader_decodes_with_pyspng_where_installed_and_other_modes_with_pillow(tmp_path: Path):
    assert png.loader_decoder() == ("pyspng" if "pyspng" in INSTALLED else "pillow")
    # A palette label's indices are its labelIds, 16-bit and RGBA images convert: none of these is plain.
    ids = np.random.default_rng(1).integers(0, 34, (16, 24), dtype=np.uint8)
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    palette.save(tmp_path / "palette.png")
    assert png.plain_header((tmp_path / "palette.png").read_bytes()) is None
    assert np.array_equal(decode_train_ids(tmp_path / "palette.png").numpy(), label_ids_to_train_ids(ids))
    rgba = np.random.default_rng(2).integers(0, 256, (16, 24, 4), dtype=np.uint8)
    (tmp_path / "rgba.png").write_bytes(encoded(rgba))
    assert png.plain_header((tmp_path / "rgba.png").read_bytes()) is None
    assert np.array_equal(decode_image(tmp_path / "rgba.png").numpy(), rgba[..., :3])
    (tmp_path / "grey16.png").write_bytes(encoded(np.full((8, 8), 1000, dtype=np.uint16)))
    assert png.plain_header((tmp_path / "grey16.png").read_bytes()) is None


def test_a_truncated_frame_is_a_one_line_error(tmp_path: Path, frames: list[Path]):
    image = next(p for p in frames if p.name.endswith("leftImg8bit.png"))
    cut = tmp_path / image.name
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(BenchError, match=f"cannot read image {cut}") as err:
        decode_image(cut)
    assert "\n" not in str(err.value)


def test_photo_like_frames_compress_as_cityscapes_photos(tmp_path: Path):
    """Cityscapes' leftImg8bit PNGs: 11 GB for 5000 frames (cityscapes-dataset.com's download page), ~2.2 MB each;
    at 512x256 that is 2.2 MB / 16 = ~140 kB, where the training set's grainy frames are twice that."""
    photo = write_synthetic(tmp_path / "photo", train_images=1, val_images=0, size=(512, 256), progress=False,
                            **PHOTO_LIKE)
    grainy = write_synthetic(tmp_path / "grainy", train_images=1, val_images=0, size=(512, 256), progress=False)
    size = next(photo.rglob("*leftImg8bit.png")).stat().st_size
    assert 100_000 < size < 190_000, size
    assert next(grainy.rglob("*leftImg8bit.png")).stat().st_size > 1.5 * size


def test_the_floors_time_every_installed_decoder_on_the_image_and_its_label(frames: list[Path], monkeypatch):
    from harness.data.cityscapes import find_samples
    from harness.engine.benchmark import measure_decode_floors

    sample = find_samples(frames[0].parents[3], "train")[0]
    calls: list[tuple[str, int]] = []
    real = png.decode_png

    def counted(data: bytes, decoder: str | None = None):
        calls.append((decoder or "", len(data)))
        return real(data, decoder)

    monkeypatch.setattr(png, "decode_png", counted)  # measure_decode_floors imports it when it runs
    floors = measure_decode_floors(sample, repeats=3)
    assert set(floors) == set(INSTALLED) and all(rate > 0 for rate in floors.values())
    sizes = [sample.image.stat().st_size, sample.label.stat().st_size]
    for name in INSTALLED:  # one warm-up and three timed decodes of each file
        assert sorted(size for decoder, size in calls if decoder == name) == sorted(sizes * 4)
