"""`bench data check`: validate a whole Cityscapes tree before an expensive run.

Pairs, counts per split against the official 2975 / 500 / 1525 and the official cities (`list_tree`, file names
only: the fast part, which `bench doctor` runs), image sizes, label modes and labelId ranges (decoding labels, in a
process pool), unreadable files. Images are read from their headers only (in threads), or
with `--full` decoded whole (in the process pool), which finds a file cut short behind an intact header. The
synthetic dataset (`synthetic.json` at its root) is checked by its own rule: its generated counts and frame size.
Identical findings are one line with a count and examples; the exit code says whether there was any defect.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tabulate import tabulate

from harness.config.benchmark import FRAME_SIZE, OFFICIAL_CITIES, OFFICIAL_SPLIT_IMAGES
from harness.data.cityscapes import IMAGE_SUFFIX, LABEL_MODES, LABEL_SUFFIX, MAX_PIXELS
from harness.data.labels import IGNORE_INDEX, LABEL_TO_TRAIN
from harness.data.source import cityscapes_root
from harness.data.synthetic import read_manifest

OFFICIAL_COUNTS = OFFICIAL_SPLIT_IMAGES
OFFICIAL_SIZE = FRAME_SIZE
LABELLED = ("train", "val")  # the test split's labels are withheld (placeholders): never checked
MAX_LABEL_ID = 33  # cityscapesscripts' labels.py: ids 0-33 (-1, license plate, is never written to a PNG)
SHOWN_FINDINGS = 50  # lines of grouped findings
EXAMPLES = 2  # files named on a grouped line


@dataclass
class Defect:
    split: str
    kind: str
    path: Path
    detail: str


@dataclass
class SplitSummary:
    split: str
    images: int = 0
    labels: int = 0
    expected: Optional[int] = None
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)
    valid_pixels: int = 0


@dataclass
class Report:
    root: Path
    splits: list[SplitSummary]
    defects: list[Defect]
    notes: list[Defect] = field(default_factory=list)  # findings that are not defects under the tree's rule
    rule: str = "official"  # "official", "subset" or "synthetic"
    full: bool = False  # every image decoded, not only its header read

    @property
    def ok(self) -> bool:
        return not self.defects


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk, every PNG's last 12 bytes
PNG_SMALLEST = len(PNG_SIGNATURE) + 25 + len(PNG_END)  # signature, IHDR chunk, IEND chunk


def png_cut(path: Path) -> str:
    """Why a PNG is cut short or no PNG at all, from its first 16 and last 12 bytes (the signature, IHDR first, IEND
    last); "" when its two ends are intact. The cheap check `bench doctor` runs over every file of a tree: a file
    cut by an interrupted copy or unpacking loses its end."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - len(PNG_END)))
            tail = f.read()
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return f"no PNG ({size} bytes without a PNG signature and header)"
    if size < PNG_SMALLEST or tail != PNG_END:
        return f"cut short ({size} bytes, no IEND chunk at its end)"
    return ""


def cut_files(listing: Listing) -> list[Defect]:
    """Every image and label of the tree whose ends are not a PNG's (`png_cut`), read in threads."""
    jobs = [*listing.image_jobs, *((split, label) for split, label, _ in listing.label_jobs)]
    with ThreadPoolExecutor(max_workers=16) as threads:
        found = list(threads.map(png_cut, [path for _, path in jobs]))
    return [Defect(split, "cut file", path, why) for (split, path), why in zip(jobs, found) if why]


def _image_header(path: Path) -> tuple[Optional[tuple[int, int]], str]:
    """(width, height) from the header, or None and why it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.size, ""
    except Image.DecompressionBombError:
        return None, "beyond PIL's decompression limit"
    except (OSError, ValueError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _decode_image(path: Path) -> tuple[Optional[tuple[int, int]], str]:
    """(width, height) after decoding every pixel, or None and why it cannot be decoded (a worker process)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.size, ""
    except Image.DecompressionBombError:
        return None, "beyond PIL's decompression limit"
    except (OSError, ValueError, SyntaxError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _inspect_label(path: Path) -> tuple[Optional[tuple[int, int]], str, Optional[int], int, str]:
    """(size, mode, largest labelId, valid pixel count, error); decodes the pixels (run in a worker process)."""
    try:
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            if mode not in LABEL_MODES or size[0] * size[1] > MAX_PIXELS:
                return size, mode, None, 0, ""
            ids = np.asarray(img)
    except Image.DecompressionBombError:
        return None, "", None, 0, "beyond PIL's decompression limit"
    except (OSError, ValueError) as exc:
        return None, "", None, 0, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    valid = int((LABEL_TO_TRAIN[ids] != IGNORE_INDEX).sum())
    return size, mode, int(ids.max()) if ids.size else 0, valid, ""


@dataclass
class Listing:
    """What the file names alone say about a tree: the fast part of the check, no file opened."""

    report: Report
    image_jobs: list[tuple[str, Path]]  # (split, image)
    label_jobs: list[tuple[str, Path, Optional[Path]]]  # (split, label, its image)
    frame: Optional[tuple[int, ...]] = None  # the synthetic dataset's frame size, from its manifest


def list_tree(root: Path, official: bool = True) -> Listing:
    """Pairs, counts per split and (with `official`) the official counts and cities, from the file names alone. The
    synthetic dataset (its manifest at the root) is held to its generated counts instead, what differs from
    Cityscapes kept as notes."""
    manifest = read_manifest(root)
    rule = "synthetic" if manifest is not None else "official" if official else "subset"
    official = rule == "official"
    notes: list[Defect] = []
    generated = (manifest or {}).get("counts") or {}
    frame = tuple((manifest or {}).get("size") or ()) or None
    defects: list[Defect] = []
    summaries = []
    label_jobs: list[tuple[str, Path, Optional[Path]]] = []  # (split, label, its image)
    image_jobs: list[tuple[str, Path]] = []
    for split in OFFICIAL_COUNTS:
        summary = SplitSummary(split, expected=OFFICIAL_COUNTS[split] if official else None)
        summaries.append(summary)
        image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        images = {p.relative_to(image_dir).as_posix()[: -len(IMAGE_SUFFIX)]: p
                  for p in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))}
        labels = {p.relative_to(label_dir).as_posix()[: -len(LABEL_SUFFIX)]: p
                  for p in sorted(label_dir.glob(f"*/*{LABEL_SUFFIX}"))}
        summary.images, summary.labels = len(images), len(labels)
        if not images and (official or split in LABELLED):
            defects.append(Defect(split, "missing split", image_dir, f"no *{IMAGE_SUFFIX} under <city>/ folders"))
        if official and images and len(images) != OFFICIAL_COUNTS[split]:
            defects.append(Defect(split, "count", image_dir,
                                  f"{len(images)} images, the official {split} split has {OFFICIAL_COUNTS[split]}"))
        if rule == "synthetic":
            if split in generated and len(images) != generated[split]:
                defects.append(Defect(split, "count", image_dir,
                                      f"{len(images)} images, the synthetic dataset was generated with "
                                      f"{generated[split]}"))
            elif images:
                notes.append(Defect(split, "count", image_dir, f"{len(images)} images (synthetic; the official "
                                                               f"{split} split has {OFFICIAL_COUNTS[split]})"))
            elif split not in LABELLED:
                notes.append(Defect(split, "no split", image_dir, "the synthetic dataset has no test split"))
        if official and images:
            present = {stem.split("/", 1)[0] for stem in images}
            for city in OFFICIAL_CITIES[split]:
                if city not in present:
                    defects.append(Defect(split, "missing city", image_dir / city,
                                          f"no images of {city}, one of the official {split} cities"))
        image_jobs += [(split, p) for p in images.values()]
        if split not in LABELLED:
            continue
        for stem, image in images.items():
            if stem not in labels:
                defects.append(Defect(split, "missing label", label_dir / f"{stem}{LABEL_SUFFIX}",
                                      f"ground truth of {image.name} is missing"))
        for stem, label in labels.items():
            if stem not in images:
                defects.append(Defect(split, "orphan label", label, f"no image {stem}{IMAGE_SUFFIX} in {image_dir}"))
            label_jobs.append((split, label, images.get(stem)))
    return Listing(Report(root, summaries, defects, notes, rule), image_jobs, label_jobs, frame)


def check_tree(data_root: Optional[str], workers: Optional[int] = None, official: bool = True,
               full: bool = False) -> Report:
    """Every defect of the tree at `data_root` (default: $CITYSCAPES_DATASET). `official`: also require the
    official split sizes, cities and 2048x1024 frames (off for a subset); the synthetic dataset is held to its own
    counts and frame size instead, what differs from Cityscapes reported as notes. `full`: decode every image."""
    listing = list_tree(cityscapes_root(data_root), official)
    root, rule, frame = listing.report.root, listing.report.rule, listing.frame
    summaries, defects, notes = listing.report.splits, listing.report.defects, listing.report.notes
    image_jobs, label_jobs = listing.image_jobs, listing.label_jobs
    official = rule == "official"

    by_split = {s.split: s for s in summaries}
    # Labels decode in processes (the CPU-bound part); images are decoded there too with `full`, else only their
    # headers are read, in threads.
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as processes:
        pending_labels = processes.map(_inspect_label, [label for _, label, _ in label_jobs], chunksize=16)
        image_paths = [p for _, p in image_jobs]
        if full:
            image_sizes = dict(zip(image_paths, processes.map(_decode_image, image_paths, chunksize=16)))
        else:
            with ThreadPoolExecutor(max_workers=16) as threads:
                image_sizes = dict(zip(image_paths, threads.map(_image_header, image_paths)))
        label_results = list(pending_labels)
    if rule == "synthetic" and frame is None:  # a tree from before the manifest: its most common size
        sizes = [size for size, _ in image_sizes.values() if size is not None]
        frame = max(set(sizes), key=sizes.count) if sizes else None

    for split, image in image_jobs:
        size, error = image_sizes[image]
        if size is None:
            defects.append(Defect(split, "unreadable", image, error))
            continue
        by_split[split].sizes[size] = by_split[split].sizes.get(size, 0) + 1
        if size[0] < 1 or size[1] < 1 or size[0] * size[1] > MAX_PIXELS:
            defects.append(Defect(split, "image size", image, f"{size[0]}x{size[1]} is not a sane frame size"))
        elif official and size != OFFICIAL_SIZE:
            defects.append(Defect(split, "image size", image,
                                  f"{size[0]}x{size[1]}, Cityscapes frames are {FRAME_SIZE[0]}x{FRAME_SIZE[1]}"))
        elif rule == "synthetic" and frame is not None and size != frame:
            defects.append(Defect(split, "image size", image,
                                  f"{size[0]}x{size[1]}, the synthetic dataset's frames are {frame[0]}x{frame[1]}"))
        elif rule == "synthetic" and size != OFFICIAL_SIZE:
            notes.append(Defect(split, "image size", image, f"{size[0]}x{size[1]} (synthetic; Cityscapes frames "
                                                            f"are {FRAME_SIZE[0]}x{FRAME_SIZE[1]})"))

    for (split, label, label_image), (size, mode, largest, valid, error) in zip(label_jobs, label_results):
        if error or size is None:
            defects.append(Defect(split, "unreadable", label, error))
            continue
        image_size = image_sizes.get(label_image, (None, ""))[0] if label_image is not None else None
        if image_size is not None and size != image_size:
            defects.append(Defect(split, "label size", label,
                                  f"{size[0]}x{size[1]}, its image is {image_size[0]}x{image_size[1]}"))
        if mode not in LABEL_MODES:
            defects.append(Defect(split, "label mode", label,
                                  f"a {mode} image, not an 8-bit single-channel labelIds PNG"))
            continue
        if largest is None:
            continue  # too large to decode: reported with its image's size
        if largest > MAX_LABEL_ID:
            defects.append(Defect(split, "label values", label,
                                  f"labelId {largest} beyond the official 0-{MAX_LABEL_ID}"))
        if not valid:
            defects.append(Defect(split, "no valid pixel", label, "every labelId maps to ignore (255)"))
        by_split[split].valid_pixels += valid
    for summary in summaries:
        if summary.split in LABELLED and summary.labels and not summary.valid_pixels:
            defects.append(Defect(summary.split, "no valid pixel", root / "gtFine" / summary.split,
                                  "no label of the split holds a valid pixel: nothing to train on or score"))
    return Report(root, summaries, defects, notes, rule, full)


def group(findings: list[Defect]) -> list[tuple[Defect, list[Path]]]:
    """Identical findings (same split, kind and detail) as one: (the first, every file it names), in order."""
    groups: dict[tuple[str, str, str], tuple[Defect, list[Path]]] = {}
    for finding in findings:
        groups.setdefault((finding.split, finding.kind, finding.detail), (finding, []))[1].append(finding.path)
    return list(groups.values())


def _finding_line(prefix: str, finding: Defect, files: list[Path]) -> str:
    if len(files) == 1:
        return f"{prefix}{finding.split}: {finding.kind}: {files[0]}: {finding.detail}"
    shown = ", ".join(str(p) for p in files[:EXAMPLES]) + (", ..." if len(files) > EXAMPLES else "")
    return f"{prefix}{finding.split}: {finding.kind}: {len(files)} files ({shown}): {finding.detail}"


RULES = {
    "official": "the official Cityscapes counts and 2048x1024 frames",
    "subset": "a subset: any counts, any sane frame size",
    "synthetic": "the synthetic dataset: its generated counts and frame size",
}


def format_report(report: Report) -> str:
    rows = []
    for s in report.splits:
        sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(s.sizes.items(), key=lambda kv: -kv[1])[:3]) or "-"
        defects = sum(1 for d in report.defects if d.split == s.split)
        rows.append([s.split, s.images, s.labels if s.split in LABELLED else "-",
                     s.expected if s.expected is not None else "-", sizes, defects])
    kind = "synthetic dataset" if report.rule == "synthetic" else "Cityscapes tree"
    decoded = ("every image and label decoded" if report.full else
               "labels decoded; images read from their headers only, pixels not decoded (--full decodes them)")
    lines = [f"{kind} {report.root} (checked against {RULES[report.rule]}; {decoded})",
             tabulate(rows, headers=["split", "images", "labels", "official", "image sizes", "defects"],
                      disable_numparse=True)]
    grouped = group(report.defects)
    for finding, files in grouped[:SHOWN_FINDINGS]:
        lines.append(_finding_line("", finding, files))
    if len(grouped) > SHOWN_FINDINGS:
        rest = sum(len(files) for _, files in grouped[SHOWN_FINDINGS:])
        lines.append(f"... and {rest} more defects")
    for finding, files in group(report.notes):
        lines.append(_finding_line("note: ", finding, files))
    lines.append(f"{len(report.defects)} defect(s)" if report.defects else "no defects")
    return "\n".join(lines)
