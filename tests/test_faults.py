"""The fault suite (values, data, filesystem, stale status, listening sockets): every fault is one line
naming the bad input, a non-zero exit, no traceback, and nothing written before it is changed."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import struct
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from harness.cli import main
from harness.launch.run import find_resume_target
from harness.engine import checkpoint
from harness.engine.metrics import ConfusionMatrix
from harness.engine.run_folder import RUN_FILE, RunFolder
from harness.errors import BenchError
from harness.paths import runs_dir
from harness.report.records import load_records, write_record
from tests.helpers import LOOPBACK, bench, experiments_with

TINY = {
    "inherit": "df_seg_v1-ema",
    "reference": {"miou": [1.0]},
    "synthetic": {"iters": 2, "batch_size": 2, "crop_size": [64, 64], "test_size": [128, 64],
                  "checkpoint_every": 1, "log_every": 1},
}


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def one_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def nothing_started() -> None:
    assert not any(runs_dir().glob("*/*/*")), "a run folder was created"
    assert load_records() == []


@pytest.fixture
def rows(tmp_path, monkeypatch):
    def make(extra: dict) -> Path:
        root = experiments_with(tmp_path, extra)
        monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(root))
        return root
    return make


# --- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("section, key, value, accepted", [
    ("synthetic", "batch_size", 0, "a positive integer"),
    ("synthetic", "batch_size", -8, "a positive integer"),
    ("train", "lr_per_image", -0.01, "a positive number"),
    ("train", "crop_size", [0, 128], "two positive integers"),
    ("loss", "ohem_thresh", 1.5, "0 < thresh <= 1"),
])
def test_spec_values_that_cannot_train_are_refused_at_load(rows, section, key, value, accepted):
    rows({"bad": {**TINY, section: {**TINY.get(section, {}), key: value}}})
    line = one_line(invoke("run", "--row", "bad", "--synthetic"), "bad.yaml", f"{section}.{key}", repr(value), accepted)
    assert line.startswith("error: ")
    nothing_started()


def test_non_utf8_spec_file_names_the_file_and_line(rows):
    root = rows({"latin": TINY})
    (root / "latin.yaml").write_bytes((root / "latin.yaml").read_bytes() + b"# caf\xe9\n")
    one_line(invoke("show", "latin"), "latin.yaml", "not UTF-8", "0xe9", "save the file as UTF-8")


def test_row_key_naming_another_row_is_refused(rows):
    rows({"copy": {**TINY, "row": "tiny"}})
    one_line(invoke("show", "copy"), "copy.yaml", "'row' says 'tiny'")


@pytest.mark.parametrize("args, fragments", [
    (["--seed", "-1"], ["--seed -1", "0 to 4294967295"]),
    (["--device", "banana"], ["--device banana", "cpu, cuda or cuda:N"]),
    (["--iters", "0"], ["--iters", "at least 1"]),
])
def test_options_out_of_range_are_refused_before_anything_starts(rows, args, fragments):
    rows({"tiny": TINY})
    one_line(invoke("run", "--row", "tiny", "--synthetic", *args), *fragments)
    nothing_started()


def test_one_image_per_cpu_process_is_refused_naming_batch_and_crop(rows):
    rows({"tiny": TINY})  # batch 2 over 2 CPU processes: one image each, and DF-Seg pools to 1x1 before a BN
    line = one_line(invoke("run", "--row", "tiny", "--synthetic", "--gpus", "2", "--device", "cpu"),
                    "1 image per process", "synthetic.batch_size 2 over 2", "synthetic.crop_size [64, 64]",
                    "batch norm")
    assert "distributed run failed" not in line
    nothing_started()


def test_data_root_that_is_a_file(tmp_path, rows):
    rows({"tiny": TINY})
    file = tmp_path / "cityscapes.tar"
    file.write_bytes(b"not a folder")
    one_line(invoke("run", "--row", "tiny", "--data-root", str(file)), str(file), "is a file, not a folder")


def test_resume_with_a_missing_or_foreign_file_names_that_file(tmp_path, rows, synthetic_root):
    rows({"tiny": TINY})
    missing = tmp_path / "runs-elsewhere" / "ckpt-00000004.pt"
    line = one_line(invoke("run", "--row", "tiny", "--synthetic", "--resume", str(missing)), str(missing), "does not exist")
    assert "not a segbench run folder" not in line
    foreign = tmp_path / "notes.pt"
    foreign.write_text("hello")
    one_line(invoke("run", "--row", "tiny", "--synthetic", "--resume", str(foreign)), f"--resume {foreign}", "unreadable")
    nothing_started()


@pytest.mark.slow
def test_distributed_failure_reports_the_first_workers_error_line(tmp_path, rows):
    rows({"tiny": {**TINY, "synthetic": {**TINY["synthetic"], "batch_size": 4}}})
    empty = tmp_path / "empty-root"
    empty.mkdir()  # exists (the launcher's checks pass); the workers find no images
    process = bench("run", "--row", "tiny", "--data-root", str(empty), "--gpus", "2", "--device", "cpu")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: distributed run failed: rank ") and "no Cityscapes images found" in last, err
    assert "Traceback" not in err
    assert sum("no Cityscapes images found" in line for line in err.splitlines()) == 1, err


# --- data ----------------------------------------------------------------------------------------


def damaged_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    return root


def first_label(root: Path, split: str = "train") -> Path:
    return sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))[0]


def first_image(root: Path, split: str = "train") -> Path:
    return sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[0]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (PIL checks the size at open, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("damage, fragments", [
    ("label_size", ["is 128x64 but its image is 256x128"]),
    ("rgb_label", ["is a RGB image", "labelIds"]),
    ("huge_image", ["too large"]),
])
def test_bad_pairs_are_refused_naming_the_file_before_training(tmp_path, rows, synthetic_root, damage, fragments):
    rows({"tiny": TINY})
    root = damaged_copy(synthetic_root, tmp_path)
    label, image = first_label(root), first_image(root)
    if damage == "label_size":
        Image.open(label).resize((128, 64), Image.NEAREST).save(label)
        bad = label
    elif damage == "rgb_label":
        Image.open(label).convert("RGB").save(label)
        bad = label
    else:
        image.write_bytes(png_claiming(16000, 12000))
        bad = image
    one_line(invoke("run", "--row", "tiny", "--data-root", str(root), "--iters", "1"), str(bad), *fragments)
    nothing_started()


def test_labels_with_no_valid_pixel_are_an_error_and_no_record_holds_nan(tmp_path):
    matrix = ConfusionMatrix(19)
    matrix.update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 255))
    with pytest.raises(BenchError, match="no valid pixel"):
        matrix.compute()
    record = {"dataset": "cityscapes", "row": "r", "time": "2026-01-01T00:00:00Z", "tracking_run_id": "abc",
              "miou": 50.0, "per_class_iou": {"road": 50.0, "train": math.nan}}
    path = write_record(record, tmp_path / "results")
    saved = json.loads(path.read_text())  # strict JSON: Python's json would also read NaN, so check the text
    assert saved["per_class_iou"]["train"] is None and "NaN" not in path.read_text()
    with pytest.raises(BenchError, match="miou is nan"):
        write_record({**record, "miou": math.nan}, tmp_path / "results")
    assert [p.name for p in (tmp_path / "results" / "cityscapes" / "r").iterdir()] == [path.name]


# --- filesystem ----------------------------------------------------------------------------------


@contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    """A small tmpfs at `where`: a real full or read-only file system. Needs root and mount rights."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (a size-capped folder cannot be made otherwise)")
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> None:
    """Take every free byte of `folder`'s file system."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("which", ["SEGBENCH_RESULTS", "SEGBENCH_RUNS"])
def test_read_only_output_folder_is_refused_before_training(tmp_path, rows, synthetic_root, which):
    rows({"tiny": TINY})
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        one_line(invoke("run", "--row", "tiny", "--synthetic", env={which: str(ro)}),
                 str(ro / "synthetic"), "not writable", "Read-only file system", which)
    nothing_started()


def test_read_only_sqlite_store_is_refused_in_one_line(tmp_path, rows, synthetic_root):
    """MLflow would retry a read-only SQLite store for minutes (27 retry lines over 109 s)."""
    rows({"tiny": TINY})
    with tmpfs(tmp_path / "store", "4m") as store:
        (store / "mlflow.db").write_bytes(b"")
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(store)], capture_output=True, text=True)
        if remounted.returncode:
            pytest.skip(f"cannot remount the tmpfs read-only ({remounted.stderr.strip()})")
        result = invoke("run", "--row", "tiny", "--synthetic", "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}")
        one_line(result, str(store / "mlflow.db"), "read-only", "--offline-tracking")
    assert load_records() == []


def test_full_disk_while_checkpointing_keeps_earlier_checkpoints_and_leaves_no_partial_file(tmp_path):
    with tmpfs(tmp_path / "small", "2m") as small:
        folder = small / "checkpoints"
        first = checkpoint.save({"iteration": 1, "w": torch.ones(10)}, folder, 1, keep=2)
        before = first.read_bytes()
        with pytest.raises(BenchError, match=r"cannot write checkpoint .*ckpt-00000002.pt: No space left on device"):
            checkpoint.save({"iteration": 2, "w": torch.zeros(1_000_000)}, folder, 2, keep=2)
        assert sorted(p.name for p in folder.iterdir()) == [first.name] and first.read_bytes() == before


def test_full_disk_while_writing_a_record_leaves_no_partial_file(tmp_path):
    with tmpfs(tmp_path / "small", "256k") as small:
        (small / "cityscapes" / "r").mkdir(parents=True)
        fill(small)
        record = {"dataset": "cityscapes", "row": "r", "time": "2026-01-01T00:00:00Z", "miou": 1.0,
                  "padding": "x" * 100_000}
        with pytest.raises(BenchError, match=r"cannot write the result record under .*No space left on device"):
            write_record(record, small)
        assert list((small / "cityscapes" / "r").iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_renamed_into_place_get_the_mode_of_any_new_file(tmp_path, umask):
    """Records, tables, checkpoints and predictions are written to a unique temporary file first; they end up with
    the mode the umask gives a new file (readable by the team sharing a results folder), not mkstemp's 0600."""
    import numpy as np

    from harness.files import atomic_write_text
    from harness.outputs.predictions import save_prediction

    before = os.umask(umask)
    try:
        written = [
            write_record({"dataset": "cityscapes", "row": "r", "time": "2026-01-01T00:00:00Z", "miou": 1.0},
                         tmp_path / "results"),
            atomic_write_text(tmp_path / "benchmark.md", "table\n"),
            checkpoint.save({"iteration": 1, "w": torch.ones(3)}, tmp_path / "checkpoints", 1, keep=2),
            save_prediction(np.zeros((4, 8), dtype=np.uint8), tmp_path / "pred" / "a.png"),
        ]
    finally:
        os.umask(before)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == \
        {path.name: oct(0o666 & ~umask) for path in written}


@pytest.mark.slow
def test_full_runs_folder_fails_the_run_in_one_line_and_run_json_says_failed(tmp_path, rows, synthetic_root):
    rows({"tiny": TINY})
    with tmpfs(tmp_path / "runs", "4m") as small:
        process = bench("run", "--row", "tiny", "--synthetic", env={"SEGBENCH_RUNS": str(small)})
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, err
        assert "Traceback" not in err
        assert "error: cannot write checkpoint" in err.strip().splitlines()[-1] and "No space left on device" in err
        (run_file,) = small.glob(f"synthetic/tiny/*/{RUN_FILE}")
        assert json.loads(run_file.read_text())["status"] == "failed"
        assert not list(small.glob("**/.*.tmp"))
    assert load_records() == []


# --- stale status --------------------------------------------------------------------------------


def test_running_status_of_a_dead_process_reads_interrupted_and_a_live_one_is_not_resumed(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBENCH_RUNS", str(tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "synthetic" / "tiny" / "20260101-000000"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint.save({"iteration": 1}, run_dir / "checkpoints", 1, keep=2)
    dead = subprocess.Popen(["true"])
    dead.wait()
    info = {"row": "tiny", "dataset": "synthetic", "status": "running", "pid": dead.pid, "host": socket.gethostname()}
    (run_dir / RUN_FILE).write_text(json.dumps(info))
    assert RunFolder.open(run_dir).status == "interrupted"
    assert find_resume_target("latest", "tiny", "synthetic")[0].path == run_dir

    alive = subprocess.Popen(["sleep", "30"])
    try:
        (run_dir / RUN_FILE).write_text(json.dumps({**info, "pid": alive.pid}))
        assert RunFolder.open(run_dir).status == "running"
        with pytest.raises(BenchError, match="is still running"):
            find_resume_target("latest", "tiny", "synthetic")
    finally:
        alive.kill()
        alive.wait()


# --- listening sockets ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp to read sockets")
def test_two_process_run_on_one_node_listens_on_loopback_only(pair_reference):
    """The rendezvous and gloo sockets of `bench run --gpus 2` (watched in the launcher's whole process tree while the
    session's two-process run trained) listen on loopback only, never on every interface."""
    seen = pair_reference.listening
    assert seen, "no listening socket observed: the check saw nothing"
    assert seen <= LOOPBACK, f"listening beyond loopback: {seen - LOOPBACK}"
