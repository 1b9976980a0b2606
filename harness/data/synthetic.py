"""A small synthetic dataset in exactly the Cityscapes layout, for tests and CPU smoke runs.

Street-like scenes: sky above a horizon, buildings with windows, trees, a road converging to a
vanishing point with lane marks, sidewalks with tiles, terrain, walls, poles carrying signs and
traffic lights, people and cars. Several classes share a grey palette (road, sidewalk, building,
pole, some cars), and all carry texture and noise, so a model must learn shape and context rather
than colour. Ground truth uses the real labelIds, including ignored ones (ego vehicle, static).
Everything is drawn from one seeded generator: the same seed writes the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from harness.data.cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX

ROAD, SIDEWALK, BUILDING, WALL, POLE, LIGHT, SIGN = 7, 8, 11, 12, 17, 19, 20
VEGETATION, TERRAIN, SKY, PERSON, CAR = 21, 22, 23, 24, 26
EGO_VEHICLE, STATIC = 1, 4

SPLITS = {"train": ("synthtown", "synthville"), "val": ("synthburg",)}
COMPLETE_MARKER = ".complete"
# A softened scene without grain: 2048x1024 frames of about 2.2 MB, as Cityscapes' leftImg8bit PNGs (11 GB for 5000),
# where the training set's sharp, grainy frames are 4.5 MB and would overstate the cost of decoding.
PHOTO_LIKE: dict[str, Any] = {"grain": 0.0, "soften": 1}
MANIFEST = "synthetic.json"  # what was generated: lets `bench data check` apply the synthetic dataset's own rule


class _Canvas:
    def __init__(self, rng: np.random.Generator, width: int, height: int):
        self.rng = rng
        self.w, self.h = width, height
        self.image = np.zeros((height, width, 3), dtype=np.float32)
        self.label = np.zeros((height, width), dtype=np.uint8)
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)

    def paint(self, mask: np.ndarray, label_id: int, colour, texture: np.ndarray | float = 0.0) -> None:
        colour = np.asarray(colour, dtype=np.float32)
        texture = np.broadcast_to(np.asarray(texture, dtype=np.float32), mask.shape)
        self.image[mask] = colour + texture[mask][:, None]
        self.label[mask] = label_id

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return (self.xx >= x0) & (self.xx < x1) & (self.yy >= y0) & (self.yy < y1)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.xx - cx) / max(rx, 0.5)) ** 2 + ((self.yy - cy) / max(ry, 0.5)) ** 2 <= 1.0

    def grey(self, lo: float = 70, hi: float = 150) -> np.ndarray:
        value = self.rng.uniform(lo, hi)
        return value + self.rng.uniform(-12, 12, size=3)

    def noise(self, scale: float) -> np.ndarray:
        return self.rng.normal(0.0, scale, size=(self.h, self.w)).astype(np.float32)


def _soften(image: np.ndarray, passes: int) -> np.ndarray:
    """A camera's optics: neighbouring pixels share light (a 3x3 binomial blur per pass), so a PNG filter predicts
    most of a photo's texture, as it does in Cityscapes' frames."""
    for _ in range(passes):
        for axis in (0, 1):
            padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in range(image.ndim)], mode="edge")
            before, here, after = (np.take(padded, range(k, k + image.shape[axis]), axis=axis) for k in (0, 1, 2))
            image = (before + 2 * here + after) / 4
    return image


def _draw_scene(rng: np.random.Generator, width: int, height: int, grain: float = 6.0, soften: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    c = _Canvas(rng, width, height)
    horizon = height * rng.uniform(0.38, 0.5)
    vanish_x = width * rng.uniform(0.35, 0.65)

    # Sky: blue or overcast grey, with a vertical gradient.
    sky_colour = rng.choice([np.array([110, 150, 200]), c.grey(150, 210)])
    c.paint(c.yy < horizon, SKY, sky_colour, -20 * c.yy / horizon + c.noise(3))

    # Buildings along the skyline, windows as a periodic darker texture.
    x = rng.uniform(-20, 0)
    while x < width:
        bw = rng.uniform(0.12, 0.3) * width
        top = height * rng.uniform(0.03, 0.3)
        if rng.random() < 0.85:
            windows = ((c.xx % rng.integers(6, 11)) < 3) & ((c.yy % rng.integers(7, 12)) < 4)
            c.paint(c.rect(x, top, x + bw, horizon + 2), BUILDING, c.grey(60, 170), -35 * windows + c.noise(6))
        x += bw + rng.uniform(0, 0.08) * width

    # Trees: trunk and a noisy canopy, both vegetation as in Cityscapes.
    for _ in range(rng.integers(1, 4)):
        tx, ty = rng.uniform(0, width), horizon + rng.uniform(-2, 6)
        r = rng.uniform(0.06, 0.14) * width
        green = np.array([rng.uniform(40, 110), rng.uniform(90, 150), rng.uniform(20, 70)])
        c.paint(c.rect(tx - 2, ty - r, tx + 2, ty + 4), VEGETATION, green * 0.5)
        c.paint(c.ellipse(tx, ty - r * 1.4, r, r * 0.9), VEGETATION, green, c.noise(18))

    below = c.yy >= horizon
    depth = np.clip((c.yy - horizon) / (height - horizon), 0, 1)  # 0 at the horizon, 1 at the bottom
    road_half = depth * width * rng.uniform(0.45, 0.7)
    walk_half = road_half + depth * width * rng.uniform(0.15, 0.3)
    offset = np.abs(c.xx - vanish_x)

    # Terrain beyond the sidewalks, optionally a low wall in front of the buildings.
    c.paint(below, TERRAIN, [rng.uniform(90, 150), rng.uniform(120, 170), rng.uniform(60, 100)], c.noise(14))
    if rng.random() < 0.5:
        c.paint(below & (c.yy < horizon + 0.08 * height) & (offset > walk_half), WALL, c.grey(90, 160), c.noise(4))

    tiles = (((c.xx.astype(int) // 5) + (c.yy.astype(int) // 3)) % 2) * 10.0
    c.paint(below & (offset < walk_half), SIDEWALK, c.grey(110, 170) + [12, 0, 12], tiles + c.noise(5))
    lane_marks = (np.abs(c.xx - vanish_x) < 0.5 + 1.5 * depth) & ((c.yy.astype(int) // 6) % 2 == 0)
    c.paint(below & (offset < road_half), ROAD, c.grey(70, 130) + [10, -5, 10], 90 * lane_marks + c.noise(5))

    # Poles on the sidewalk edges, some carrying a sign or a traffic light.
    for _ in range(rng.integers(1, 4)):
        side = rng.choice([-1, 1])
        py = horizon + rng.uniform(0.2, 0.9) * (height - horizon)
        d = (py - horizon) / (height - horizon)
        px = vanish_x + side * (d * width * 0.6)
        pole_h, pole_w = 0.6 * d * height + 8, max(1.0, 2.5 * d)
        c.paint(c.rect(px - pole_w, py - pole_h, px + pole_w, py), POLE, c.grey(90, 140))
        if rng.random() < 0.5:
            s = 3 + 6 * d
            c.paint(c.ellipse(px, py - pole_h, s, s), SIGN, rng.choice([[200, 30, 30], [30, 70, 190], [230, 200, 30]]))
        else:
            lw, lh = 2 + 3 * d, 5 + 8 * d
            c.paint(c.rect(px - lw, py - pole_h - lh, px + lw, py - pole_h), LIGHT, [30, 30, 30])
            c.paint(c.ellipse(px, py - pole_h - lh * 0.7, lw * 0.6, lw * 0.6), LIGHT,
                    rng.choice([[230, 40, 40], [40, 220, 60]]))

    # People on the sidewalks, cars on the road; nearer means larger.
    for _ in range(rng.integers(1, 5)):
        py = horizon + rng.uniform(0.15, 0.95) * (height - horizon)
        d = (py - horizon) / (height - horizon)
        side = rng.choice([-1, 1])
        px = vanish_x + side * d * width * rng.uniform(0.5, 0.75)
        ph = 6 + 40 * d
        clothes = rng.uniform(20, 220, size=3)
        c.paint(c.ellipse(px, py - ph * 0.45, ph * 0.13, ph * 0.4), PERSON, clothes, c.noise(8))
        c.paint(c.ellipse(px, py - ph * 0.9, ph * 0.09, ph * 0.1), PERSON, [200, 160, 130])
    for _ in range(rng.integers(1, 4)):
        py = horizon + rng.uniform(0.2, 1.0) * (height - horizon)
        d = (py - horizon) / (height - horizon)
        px = vanish_x + rng.uniform(-0.4, 0.4) * d * width
        cw, ch = 10 + 60 * d, 6 + 28 * d
        body = c.grey(60, 140) if rng.random() < 0.4 else rng.uniform(20, 230, size=3)
        c.paint(c.rect(px - cw / 2, py - ch * 0.6, px + cw / 2, py - ch * 0.15), CAR, body, c.noise(4))
        c.paint(c.rect(px - cw * 0.35, py - ch, px + cw * 0.35, py - ch * 0.6), CAR, [40, 50, 60], c.noise(4))
        for wx in (px - cw * 0.3, px + cw * 0.3):
            c.paint(c.ellipse(wx, py - ch * 0.15, ch * 0.16, ch * 0.16), CAR, [15, 15, 15])

    # Ignored regions: a static object at the roadside and sometimes the ego vehicle's bonnet.
    if rng.random() < 0.5:
        sx, sy = rng.uniform(0, width), horizon + rng.uniform(0.1, 0.5) * (height - horizon)
        c.paint(c.rect(sx, sy - 6, sx + 8, sy), STATIC, c.grey(40, 200), c.noise(10))
    if rng.random() < 0.5:
        c.paint(c.ellipse(width / 2, height * 1.05, width * 0.45, height * 0.12), EGO_VEHICLE, [30, 30, 35])

    image = _soften(c.image * rng.uniform(0.75, 1.2), soften) + rng.normal(0, grain, size=c.image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), c.label


def write_synthetic(out: Path, seed: int = 0, train_images: int = 24, val_images: int = 8,
                    size: tuple[int, int] = (256, 128), progress: bool = True, grain: float = 6.0,
                    soften: int = 0) -> Path:
    """Write a synthetic Cityscapes tree at `out` ([width, height] images); returns `out`. `grain`: the sensor
    noise's standard deviation in grey levels (no PNG filter predicts it); `soften`: passes of the optics' blur
    (PHOTO_LIKE: frames that compress as Cityscapes' photos do, about 2 MB at 2048x1024)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    counts = {"train": train_images, "val": val_images}
    jobs = [(split, i) for split in SPLITS for i in range(counts[split])]
    for split, i in tqdm(jobs, desc="synthetic cityscapes", disable=not (progress and sys.stderr.isatty()),
                         leave=False):
        cities = SPLITS[split]
        city = cities[i % len(cities)]
        stem = f"{city}_{i // len(cities):06d}_{19 + i:06d}"
        image, label = _draw_scene(rng, *size, grain=grain, soften=soften)
        for kind, name, array in (("leftImg8bit", stem + IMAGE_SUFFIX, image), ("gtFine", stem + LABEL_SUFFIX, label)):
            folder = out / kind / split / city
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / name)
    (out / MANIFEST).write_text(json.dumps({"dataset": "segbench synthetic", "seed": seed, "size": list(size),
                                            "counts": counts}, indent=2) + "\n")
    return out


def read_manifest(root: Path) -> Optional[dict[str, Any]]:
    """What `write_synthetic` generated at `root` ({"size": [w, h], "counts": {split: n}}), or None for a tree it did
    not write. A cached tree from before the manifest (marked complete) has unknown size and counts."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("dataset") == "segbench synthetic":
        return manifest
    if (Path(root) / COMPLETE_MARKER).is_file():
        return {"dataset": "segbench synthetic", "size": None, "counts": None}
    return None


def ensure_synthetic(cache: Path, seed: int = 0, **kwargs) -> Path:
    """The cached synthetic dataset for `seed`, generated once; a half-written one is never reused."""
    cache = Path(cache)
    target = cache / f"synthetic-cityscapes-seed{seed}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=cache))
    try:
        write_synthetic(staging, seed=seed, **kwargs)
        (staging / COMPLETE_MARKER).write_text("ok\n")
        if target.exists():  # an incomplete leftover from a crash
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
