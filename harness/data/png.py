"""PNG decoding with the fastest decoder installed: libspng through pyspng (the `fast-decode` extra) where it is,
else Pillow, with the same pixels either way. A Cityscapes frame at 2048x1024 decodes in about 2/3 of Pillow's time
with libspng (its inflate and unfilter loops are tighter); OpenCV's and torchvision's libpng are no faster than
Pillow's. `bench speed --mode data` times each installed decoder beside the loader (the decode floor)."""

from __future__ import annotations

import functools
import importlib.util
import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from harness.errors import BenchError

Decoder = Callable[[bytes], np.ndarray]  # PNG bytes -> HxW or HxWxC uint8 pixels, channels in RGB order


def _pillow(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.array(img)


def _pyspng(data: bytes) -> np.ndarray:
    import pyspng

    return pyspng.load(data)


def _opencv(data: bytes) -> np.ndarray:
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("OpenCV could not decode the PNG")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB) if pixels.ndim == 3 else pixels


def _torchvision(data: bytes) -> np.ndarray:
    import torch
    from torchvision.io import decode_png

    pixels = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return pixels.permute(1, 2, 0).numpy() if pixels.shape[0] > 1 else pixels[0].numpy()


# name -> (the module it needs, the decoder); the loader's choice is the first installed of FASTEST_FIRST.
DECODERS: dict[str, tuple[str, Decoder]] = {
    "pillow": ("PIL", _pillow),
    "pyspng": ("pyspng", _pyspng),
    "opencv": ("cv2", _opencv),
    "torchvision": ("torchvision", _torchvision),
}
FASTEST_FIRST = ("pyspng", "pillow")  # measured on 2048x1024 frames: README, "Data loading"


DECODER_ENV = "SEGBENCH_PNG_DECODER"  # another installed decoder for the loader (`bench speed` times Pillow's too)


@functools.cache
def installed_decoders() -> tuple[str, ...]:
    return tuple(name for name, (module, _) in DECODERS.items() if importlib.util.find_spec(module) is not None)


def loader_decoder() -> str:
    """The decoder the loader uses: $SEGBENCH_PNG_DECODER, else the fastest installed."""
    installed = installed_decoders()
    chosen = os.environ.get(DECODER_ENV)
    if chosen:
        if chosen not in installed:
            raise BenchError(f"${DECODER_ENV}={chosen}: not an installed PNG decoder; use one of "
                             f"{', '.join(installed)} (pyspng: pip install '.[fast-decode]'), or unset it")
        return chosen
    return next(name for name in FASTEST_FIRST if name in installed)


@contextmanager
def using_decoder(name: str) -> Iterator[None]:
    """The loader (and the workers it starts from here) decoding with `name`."""
    previous = os.environ.get(DECODER_ENV)
    os.environ[DECODER_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[DECODER_ENV]
        else:
            os.environ[DECODER_ENV] = previous


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLAIN_COLOUR_TYPES = {0: "L", 2: "RGB"}  # the IHDR colour types that every decoder returns alike at 8 bits


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    mode: str  # Pillow's name for the pixels: "L", "RGB", "P", ...


def plain_header(data: bytes) -> PngHeader | None:
    """The size and mode ("L" or "RGB") of a PNG of 8-bit grey or RGB pixels, read from the IHDR chunk of its bytes;
    None for anything else (palette, 16-bit, fewer bits, alpha), which Pillow alone converts."""
    if len(data) < 26 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or data[24] != 8:
        return None
    mode = PLAIN_COLOUR_TYPES.get(data[25])
    if mode is None:
        return None
    return PngHeader(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), mode)


def decode_png(data: bytes, decoder: str | None = None) -> np.ndarray:
    """Writable uint8 pixels of a PNG whose `plain_header` is not None, HxW (grey) or HxWx3 (RGB)."""
    return DECODERS[decoder or loader_decoder()][1](data)
