"""A cache of decoded frames: every image and labelIds label of a split, uint8, in one memory-mapped file.

Decoding a Cityscapes pair (a 2048x1024 RGB PNG and its labelIds PNG) costs a core 50-70 ms, so one loader worker
delivers 14-20 samples/s. A light row on a fast GPU trains at 200+ img/s, more than the cores beside one GPU can
decode; reading a decoded frame back from a memory-mapped file (the page cache, or a local disk) is a copy.

    <dir>/<split>.frames   image (HxWx3) then label (HxW) of each sample, uint8, back to back
    <dir>/<split>.json     per sample: its files (relative to the dataset root), size, offset, and each file's
                           byte size and modification time, so a changed dataset is never read from a stale cache

About 8 MiB per Cityscapes frame: 23 GiB for train, 4 GiB for val. Built by `bench data cache` or by `bench run
--decoded-cache DIR` when missing; written beside its final name and renamed, index last, so an interrupted build
leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from harness.data.cityscapes import Sample, decode_pair, read_header
from harness.errors import BenchError
from harness.files import atomic_write_text, format_bytes, new_temporary_file

FORMAT = 2  # 2: labels hold labelIds as stored (1 held trainIds, mapped by the workers)


class CacheUnusable(BenchError):
    """The cache is missing, stale or damaged: `reason` says which; the message adds how to rebuild it."""

    def __init__(self, reason: str, rebuild: str):
        super().__init__(f"{reason}; {rebuild}")
        self.reason = reason


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _entry(sample: Sample, root: Path, height: int, width: int, offset: int) -> dict[str, Any]:
    label = sample.label
    assert label is not None  # build_cache refuses unlabelled samples before it gets here
    return {"image": str(sample.image.relative_to(root)), "label": str(label.relative_to(root)),
            "height": height, "width": width, "offset": offset,
            "image_stamp": _stamp(sample.image), "label_stamp": _stamp(label)}


def frame_bytes(height: int, width: int) -> int:
    return height * width * 4  # 3 image channels and 1 label channel


@dataclass
class DecodedFrames:
    """Indexable like the samples it was built from: (uint8 HxWx3 image, uint8 HxW labelIds). The file is mapped
    lazily in each process that reads it (loader workers included), never pickled."""

    frames_path: Path
    entries: list[dict[str, Any]]

    def __post_init__(self) -> None:
        self._mapped: Optional[np.memmap] = None

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, indices: Sequence[int]) -> DecodedFrames:
        """The frames at `indices`, in that order (a rank's evaluation shard)."""
        return DecodedFrames(self.frames_path, [self.entries[i] for i in indices])

    def __getstate__(self) -> dict[str, Any]:
        return {"frames_path": self.frames_path, "entries": self.entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._mapped = None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mapped is None:
            self._mapped = np.memmap(self.frames_path, dtype=np.uint8, mode="r")
        entry = self.entries[index]
        height, width, offset = entry["height"], entry["width"], entry["offset"]
        pixels = height * width
        image = np.array(self._mapped[offset : offset + 3 * pixels]).reshape(height, width, 3)
        label = np.array(self._mapped[offset + 3 * pixels : offset + 4 * pixels]).reshape(height, width)
        return torch.from_numpy(image), torch.from_numpy(label)


def paths_for(cache_dir: Path, split: str) -> tuple[Path, Path]:
    return Path(cache_dir) / f"{split}.frames", Path(cache_dir) / f"{split}.json"


def open_cache(cache_dir: Path, root: Path, split: str, samples: Sequence[Sample]) -> DecodedFrames:
    """The cache of `split` for exactly these samples; a one-line error when it is missing, for other files, or
    older than the dataset."""
    frames, index = paths_for(cache_dir, split)
    rebuild = f"rebuild it with: bench data cache --data-root {root} --out {cache_dir}"
    if not index.is_file() or not frames.is_file():
        raise CacheUnusable(f"no decoded cache of the {split} split in {cache_dir}", rebuild)
    try:
        info = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise CacheUnusable(f"decoded cache index {index} is unreadable ({exc})", rebuild) from None
    found = info.get("format") if isinstance(info, dict) else None
    if found != FORMAT:
        raise CacheUnusable(f"decoded cache {index} is in format {found}, this version reads format {FORMAT}", rebuild)
    entries = info.get("samples", [])
    if len(entries) != len(samples):
        raise CacheUnusable(f"decoded cache {index} holds {len(entries)} {split} frames, the dataset {len(samples)}",
                            rebuild)
    for entry, sample in zip(entries, samples):
        if sample.label is None:
            raise BenchError(f"{sample.image} has no ground truth; the decoded cache holds labelled splits only")
        if (entry["image"] != str(sample.image.relative_to(root))
                or entry["label"] != str(sample.label.relative_to(root))
                or entry["image_stamp"] != _stamp(sample.image) or entry["label_stamp"] != _stamp(sample.label)):
            raise CacheUnusable(f"decoded cache {index} is stale: {sample.image} changed or is not the file it decoded",
                                rebuild)
    expected = sum(frame_bytes(e["height"], e["width"]) for e in entries)
    if frames.stat().st_size != expected:
        raise CacheUnusable(f"decoded cache {frames} is {frames.stat().st_size} bytes, its index says {expected}",
                            rebuild)
    return DecodedFrames(frames, entries)


def _decode_into(job: tuple[Sample, str, int]) -> None:
    sample, frames_path, offset = job
    image, label = decode_pair(sample)
    mapped = np.memmap(frames_path, dtype=np.uint8, mode="r+")
    pixels = label.numel()
    mapped[offset : offset + 3 * pixels] = image.numpy().reshape(-1)
    mapped[offset + 3 * pixels : offset + 4 * pixels] = label.numpy().reshape(-1)
    mapped.flush()
    del mapped


def layout(root: Path, samples: Sequence[Sample]) -> tuple[list[dict[str, Any]], int]:
    """The index entries of `samples` in one frames file, from their headers, and the file's size in bytes."""
    entries, offset = [], 0
    for sample in samples:
        if sample.label is None:
            raise BenchError(f"{sample.image} has no ground truth; the decoded cache holds labelled splits only")
        header = read_header(sample.image)
        entries.append(_entry(sample, root, header.height, header.width, offset))
        offset += frame_bytes(header.height, header.width)
    return entries, offset


def check_space(cache_dir: Path, split: str, needed: int) -> None:
    free = _free_bytes(cache_dir)
    if free is not None and free < needed:
        raise BenchError(f"the decoded {split} split needs {format_bytes(needed)} in {cache_dir}, which has "
                         f"{format_bytes(free)} free; free space or choose another --decoded-cache folder")


def build_cache(cache_dir: Path, root: Path, split: str, samples: Sequence[Sample], workers: Optional[int] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> DecodedFrames:
    """Decode every pair of `samples` (in `workers` processes) into `cache_dir`; returns the opened cache."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create the decoded cache folder {cache_dir} ({exc.strerror or exc}); "
                         "choose a writable folder with --decoded-cache") from None
    frames, index = paths_for(cache_dir, split)
    entries, offset = layout(root, samples)
    check_space(cache_dir, split, offset)
    try:
        fd, tmp = new_temporary_file(cache_dir, prefix=f".{split}-", suffix=".frames.tmp")
    except OSError as exc:
        raise BenchError(f"cannot write the decoded cache in {cache_dir} ({exc.strerror or exc}); make it writable "
                         "or choose another folder") from None
    try:
        os.ftruncate(fd, offset)
        os.close(fd)
        jobs = [(sample, tmp, entry["offset"]) for sample, entry in zip(samples, entries)]
        workers = workers or max(1, (os.cpu_count() or 2) - 1)
        if workers == 1:
            for done, job in enumerate(jobs, 1):
                _decode_into(job)
                if progress:
                    progress(done, len(jobs))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for done, _ in enumerate(pool.map(_decode_into, jobs, chunksize=4), 1):
                    if progress:
                        progress(done, len(jobs))
        os.replace(tmp, frames)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_text(index, json.dumps({"format": FORMAT, "root": str(root), "split": split, "samples": entries}))
    return open_cache(cache_dir, root, split, samples)


def check_cache_folder(cache_dir: Path) -> None:
    """The cache folder exists (or can be made) and takes new files; else one line naming it."""
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".write-check-", dir=cache_dir):
            pass
    except OSError as exc:
        raise BenchError(f"the decoded cache folder {cache_dir} is not writable ({exc.strerror or exc}); make it "
                         "writable or choose another folder (--out / --decoded-cache)") from None


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def cached_or_built(cache_dir: Path, root: Path, split: str, samples: Sequence[Sample],
                    echo: Callable[[str], None] = print) -> DecodedFrames:
    """The split's cache, built first when missing or stale (with a progress bar on a terminal, and a line saying
    how fast the frames decoded)."""
    try:
        return open_cache(cache_dir, root, split, samples)
    except CacheUnusable as unusable:
        # Before saying it decodes: a folder it cannot write, or too small, fails in one line now.
        check_cache_folder(cache_dir)
        check_space(cache_dir, split, layout(root, samples)[1])
        echo(f"decoded cache: {unusable.reason}; decoding {len(samples)} {split} frames now")
    bar = tqdm(total=len(samples), desc=f"decode {split}", disable=not sys.stderr.isatty(), leave=False)
    started = time.perf_counter()

    def advance(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        frames = build_cache(cache_dir, root, split, samples, progress=advance)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    echo(f"decoded cache: {len(samples)} {split} frames in {elapsed:.0f} s ({len(samples) / max(elapsed, 1e-9):.1f} "
         f"frames/s) into {cache_dir}")
    return frames
