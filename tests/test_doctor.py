"""`bench doctor`: each no-go of a prepared setup (a missing weight file, a batch that does not divide, a dataset
missing a city, a store unfit for concurrent writers, too little disk on a small tmpfs) is one line and a non-zero
exit; a complete setup passes; `bench run` on Cityscapes refuses too little disk before it starts."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.models import provenance
from harness.report.readiness import GO, NO_GO
from tests.helpers import official_tree

DEVICE = ["--device", "h100"]  # a catalogue GPU without speed records: memory and time estimated


@pytest.fixture(autouse=True)
def model_costs_cache(tmp_path_factory, monkeypatch):
    """FLOPs and sizes for the time and memory checks counted once per test session, under tmp."""
    monkeypatch.setenv("SEGBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "model-costs-cache"))


@pytest.fixture(scope="module")
def complete_tree(tmp_path_factory) -> Path:
    return official_tree(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture
def weights_ok(tmp_path, monkeypatch) -> Path:
    """df_seg_v1's file, present, with the provenance table publishing its checksum."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("SEGBENCH_WEIGHTS", str(folder))
    content = b"the published df1_imagenet.pth"
    (folder / "df1_imagenet.pth").write_bytes(content)
    entry = provenance.PROVENANCE["df1_imagenet.pth"]
    monkeypatch.setitem(provenance.PROVENANCE, "df1_imagenet.pth",
                        dataclasses.replace(entry, sha1=hashlib.sha1(content).hexdigest()))
    return folder


def verdicts(output: str) -> dict[str, list[str]]:
    """check name -> its table lines (one per check, as `bench doctor` prints them)."""
    found: dict[str, list[str]] = {}
    for line in output.splitlines()[2:]:
        for name in ("dataset", "starting weights", "batch", "GPU memory", "disk", "tracking store", "wall time"):
            if line.startswith(name + " "):
                found.setdefault(name, []).append(line)
    return found


def verdict_of(line: str) -> str:
    return re.split(r"\s{2,}", line.strip())[1]


def doctor(*args: str):
    return CliRunner().invoke(main, ["doctor", *args, *DEVICE])


def test_a_complete_setup_passes(complete_tree, weights_ok):
    result = doctor("--row", "df_seg_v1", "--data-root", str(complete_tree))
    assert result.exit_code == 0, result.output
    lines = verdicts(result.output)
    for name in ("dataset", "starting weights", "batch", "disk", "tracking store"):
        (line,) = lines[name]
        assert verdict_of(line) == GO, line
    assert provenance.CHECKSUM_OK in lines["starting weights"][0]
    assert "all go" in result.output.splitlines()[-1]


def test_each_no_go_is_one_line_and_the_exit_is_non_zero(tmp_path, monkeypatch):
    tree = official_tree(tmp_path / "cityscapes", skip_city="lindau")
    monkeypatch.setenv("SEGBENCH_WEIGHTS", str(tmp_path / "no-weights"))
    result = doctor("--row", "df_seg_v1", "--data-root", str(tree), "--gpus", "3", "--writers", "4")
    assert result.exit_code == 1, result.output
    lines = verdicts(result.output)
    expected = {"dataset": "lindau", "starting weights": "df1_imagenet.pth is missing",
                "batch": "does not divide over 3", "tracking store": "4 jobs writing at once"}
    for name, fragment in expected.items():
        (line,) = lines[name]
        assert verdict_of(line) == NO_GO and fragment in line, line
    assert verdict_of(lines["disk"][0]) == GO
    assert result.output.splitlines()[-1].startswith(f"{len(expected)} no-go: ")


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, as this sandbox gives): the runs folder where no checkpoint fits."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                              text=True)
    except FileNotFoundError as exc:
        pytest.skip(f"cannot mount a small tmpfs here: {exc}")
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        shutil.rmtree(mount, ignore_errors=True)


def test_too_little_disk_is_a_no_go_and_bench_run_refuses_it(complete_tree, weights_ok, small_disk, monkeypatch):
    monkeypatch.setenv("SEGBENCH_RUNS", str(small_disk))
    result = doctor("--row", "df_seg_v1", "--data-root", str(complete_tree))
    assert result.exit_code == 1, result.output
    (line,) = verdicts(result.output)["disk"]
    assert verdict_of(line) == NO_GO and "4 checkpoints" in line and str(small_disk) in line
    assert result.output.splitlines()[-1] == "1 no-go: disk"

    run = CliRunner().invoke(main, ["run", "--row", "df_seg_v1", "--data-root", str(complete_tree)])
    assert run.exit_code == 2, run.output
    (error,) = run.stderr.strip().splitlines()
    assert error.startswith("error: disk: ") and "SEGBENCH_RUNS" in error
    assert not any((small_disk / "cityscapes").glob("*/*")), "a run folder was created"
