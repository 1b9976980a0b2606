"""The decoded-frame cache: a memory-mapped copy of decoded frames that reads back exactly what decoding
gives, refuses to serve a changed dataset, and trains the same run as the PNGs do."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.data.cityscapes import CityscapesEval, CityscapesTrain, decode_pair, find_samples
from harness.data.decoded import build_cache, open_cache
from harness.errors import BenchError
from harness.report.records import load_records
from tests.helpers import experiments_with


@pytest.fixture
def tree(tmp_path: Path, synthetic_root: Path) -> Path:
    """A private copy of the synthetic dataset, safe to change."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "tree"))


def test_cached_frames_are_exactly_the_decoded_ones_in_every_dataset(tree: Path, tmp_path: Path):
    samples = find_samples(tree, "val")
    frames = build_cache(tmp_path / "cache", tree, "val", samples, workers=2)
    assert len(frames) == len(samples) and (tmp_path / "cache" / "val.frames").stat().st_size == len(samples) * 256 * 128 * 4
    for index, sample in enumerate(samples):
        image, label = decode_pair(sample)
        cached_image, cached_label = frames[index]
        assert torch.equal(cached_image, image) and torch.equal(cached_label, label)
    plain, cached = CityscapesTrain(samples, [96, 64], [0.5, 2.0]), CityscapesTrain(samples, [96, 64], [0.5, 2.0], decoded=frames)
    for key in [(0, 11), (3, 12), (7, 13)]:
        assert all(torch.equal(a, b) for a, b in zip(plain[key], cached[key]))
    shard = frames.subset([1, 3])
    assert torch.equal(CityscapesEval([samples[1], samples[3]], shard)[1][0], decode_pair(samples[3])[0])


def test_a_changed_or_missing_dataset_is_refused_in_one_line(tree: Path, tmp_path: Path):
    samples = find_samples(tree, "val")
    with pytest.raises(BenchError, match="no decoded cache of the val split.*bench data cache") as err:
        open_cache(tmp_path / "cache", tree, "val", samples)
    assert "\n" not in str(err.value)
    build_cache(tmp_path / "cache", tree, "val", samples, workers=1)
    open_cache(tmp_path / "cache", tree, "val", samples)
    with pytest.raises(BenchError, match="holds 8 val frames, the dataset 7"):
        open_cache(tmp_path / "cache", tree, "val", samples[:7])
    index = tmp_path / "cache" / "val.json"
    built = index.read_text()
    index.write_text(built.replace('"format": 2', '"format": 1'))  # a cache of trainIds, from before labelIds
    with pytest.raises(BenchError, match="in format 1, this version reads format 2; rebuild it with: bench data cache"):
        open_cache(tmp_path / "cache", tree, "val", samples)
    index.write_text(built)
    stamp = samples[2].label.stat()
    os.utime(samples[2].label, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    with pytest.raises(BenchError, match=f"stale: {samples[2].image} changed"):
        open_cache(tmp_path / "cache", tree, "val", samples)


@pytest.mark.slow
def test_bench_data_cache_then_a_run_reading_it_trains_the_same_weights(synthetic_root: Path, tmp_path: Path,
                                                                        monkeypatch):
    row = {"inherit": "df_seg_v1", "reference": {"miou": [1.0]},
           "synthetic": {"iters": 3, "batch_size": 2, "crop_size": [64, 64], "test_size": [128, 64], "log_every": 1}}
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": row})))
    cache = tmp_path / "decoded"
    made = CliRunner().invoke(main, ["data", "cache", "--data-root", str(synthetic_root), "--out", str(cache)])
    assert made.exit_code == 0, made.output
    assert "24 train frames" in made.output and "8 val frames" in made.output
    for options in ([], ["--decoded-cache", str(cache)]):
        result = CliRunner().invoke(main, ["run", "--row", "tiny", "--synthetic", "--deterministic", *options])
        assert result.exit_code == 0, result.output
    plain, cached = sorted(load_records(dataset="synthetic"), key=lambda r: r.time)
    a, b = (torch.load(r.checkpoint, map_location="cpu", weights_only=True)["model"] for r in (plain, cached))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain.miou == cached.miou
