"""Issue 34: bad input and faults at the edges of weights, doctor, export, server, sweep, the journal, compare and the
Python API. Each case ends in one line naming the input and the fix, the right exit code, no traceback, nothing
written before it changed, and nothing left running or listening."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.config.spec import load_spec
from harness.launch.sweep import sweeps_dir
from harness.models import build_model, provenance
from tests.helpers import bench, experiments_with, official_tree, process_tree
from tests.test_faults import tmpfs
from tests.test_training_resilience import TINY


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def error_line(result, code: int, *fragments: str) -> str:
    """The one `error:` line of a refused command, with its exit code and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def doctor_line(output: str, check: str) -> list[str]:
    """The verdict and detail of one check of `bench doctor`'s table."""
    (line,) = [line for line in output.splitlines() if line.startswith(check + "  ")]
    return re.split(r"\s{2,}", line.strip())


# --- starting weights (models/provenance.py, models/weights.py) ------------------------------------------------


def dfnet1_file(folder: Path) -> Path:
    """df_seg_v1's starting file as SFSegNets publishes it (DFNet1's backbone names plus an ImageNet classifier); no
    checksum of it is published."""
    model = build_model(load_spec("df_seg_v1"))
    state = {**model.backbone.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = folder / "df1_imagenet.pth"
    torch.save(state, path)
    return path


def test_weights_verify_checks_a_file_without_checksum_as_far_as_it_can(weights_dir):
    path = dfnet1_file(weights_dir)
    whole = path.read_bytes()
    result = invoke("weights", "--rows", "df_seg_v1", "--verify")
    assert result.exit_code == 0, result.output
    assert provenance.NO_CHECKSUM in result.stdout and "error" not in result.stderr

    path.write_bytes(whole[: len(whole) // 2])  # a download cut half way
    error_line(invoke("weights", "--rows", "df_seg_v1", "--verify"), 1, str(path), "unreadable",
               "it may be truncated", "fetch it again")

    torch.save({"model": model_like_state(), "args": argparse.Namespace(lr=0.01)}, path)  # a pickled program
    error_line(invoke("weights", "--rows", "df_seg_v1", "--verify"), 1, str(path),
               "holds pickled Python objects besides tensors (e.g. argparse.Namespace)")

    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, path)  # tensors of another network
    error_line(invoke("weights", "--rows", "df_seg_v1", "--verify"), 1, str(path), "none of its 1 tensor names match")


def model_like_state() -> dict[str, torch.Tensor]:
    return dict(build_model(load_spec("df_seg_v1")).backbone.state_dict())


def test_an_unreadable_weights_file_is_one_line_in_weights_and_a_no_go_in_doctor(weights_dir, monkeypatch):
    path = dfnet1_file(weights_dir)

    def refused(file: Path) -> str:  # root reads any file; the kernel's answer to another user, as it comes
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(provenance, "sha1_of", refused)
    error_line(invoke("weights", "--rows", "df_seg_v1", "--verify"), 1, str(path),
               "cannot read it (Permission denied)", "fix its permissions")
    result = invoke("doctor", "--row", "df_seg_v1", "--data-root", str(weights_dir), "--device", "h100")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    verdict, detail, _ = doctor_line(result.stdout, "starting weights")[1:4]
    assert verdict == "no-go" and "cannot read it (Permission denied)" in detail


def test_a_missing_weights_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBENCH_WEIGHTS", str(tmp_path / "no-such-folder"))
    error_line(invoke("weights", "--rows", "df_seg_v1"), 2, f"$SEGBENCH_WEIGHTS names {tmp_path / 'no-such-folder'}",
               "which is not a folder", "set it to the folder holding the weights files")
    assert not (tmp_path / "no-such-folder").exists()


# --- bench doctor -----------------------------------------------------------------------------------------------


def test_doctor_says_no_go_for_a_read_only_results_folder_as_bench_run_refuses_it(tmp_path, monkeypatch,
                                                                                   synthetic_root):
    with tmpfs(tmp_path / "results", "1m", read_only=True) as results:
        monkeypatch.setenv("SEGBENCH_RESULTS", str(results))
        result = invoke("doctor", "--row", "df_seg_v1", "--synthetic")
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        verdict, detail, fix = doctor_line(result.stdout, "output folders")[1:4]
        assert verdict == "no-go" and f"results folder {results / 'synthetic'} is not writable" in detail
        assert "SEGBENCH_RESULTS" in fix
        assert result.stdout.splitlines()[-1].startswith("1 no-go: output folders")
        assert not (tmp_path / "runs" / "synthetic").exists(), "doctor creates no folder"
        run = invoke("run", "--row", "df_seg_v1", "--synthetic", "--iters", "1")
        error_line(run, 2, f"results folder {results / 'synthetic'} is not writable")


def test_doctor_finds_an_image_cut_to_a_few_bytes(tmp_path):
    tree = official_tree(tmp_path / "cityscapes")
    whole = invoke("doctor", "--row", "df_seg_v1", "--data-root", str(tree), "--device", "h100")
    assert doctor_line(whole.stdout, "dataset")[1] == "go", whole.output
    cut = next((tree / "leftImg8bit" / "val").glob("*/*.png"))
    cut.write_bytes(cut.read_bytes()[:5])
    result = invoke("doctor", "--row", "df_seg_v1", "--data-root", str(tree), "--device", "h100")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    verdict, detail = doctor_line(result.stdout, "dataset")[1:3]
    assert verdict == "no-go" and "1 defect(s): val: cut file" in detail, detail
    assert cut.read_bytes() == cut.read_bytes()[:5]


# --- bench export (outputs/model_export.py) ----------------------------------------------------------------------


@pytest.fixture
def checkpoint_file(tmp_path) -> Path:
    """A segbench checkpoint of df_seg_v1 at its initial weights (no training: export reads only these keys)."""
    from harness.engine.checkpoint import FORMAT

    torch.manual_seed(0)
    state = build_model(load_spec("df_seg_v1")).state_dict()
    path = tmp_path / "ckpt" / "best.pt"
    path.parent.mkdir()
    torch.save({"format": FORMAT, "spec": {"row": "df_seg_v1"}, "model": state,
                "plan": {"test_size": [128, 64], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}, path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_export_into_a_read_only_folder_is_one_line(checkpoint_file, tmp_path, fmt):
    with tmpfs(tmp_path / "out", "1m", read_only=True) as out:
        target = out / "sub" / f"model.{fmt}"
        error_line(invoke("export", "--checkpoint", str(checkpoint_file), "--format", fmt, "--weights", "raw",
                          "--out", str(target)), 2, f"cannot write {target} (Read-only file system)", "pass --out")
        assert snapshot(out) == {}


def test_export_onto_a_full_disk_keeps_the_earlier_file_and_leaves_no_temporary_one(checkpoint_file, tmp_path):
    with tmpfs(tmp_path / "out", "256k") as out:
        target = out / "model.safetensors"
        target.write_bytes(b"an earlier export")
        error_line(invoke("export", "--checkpoint", str(checkpoint_file), "--format", "safetensors", "--weights",
                          "raw", "--out", str(target)), 2, f"cannot write {target} (No space left on device)")
        assert snapshot(out) == {"model.safetensors": b"an earlier export"}


def test_ctrl_c_during_an_onnx_export_leaves_no_temporary_file(checkpoint_file, tmp_path, monkeypatch):
    def interrupted(model, args, path, **kwargs):
        Path(path).write_bytes(b"half an ONNX graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("export", "--checkpoint", str(checkpoint_file), "--format", "onnx", "--weights", "raw",
                    "--out", str(out / "model.onnx"))
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted", result.output
    assert snapshot(out) == {}


# --- bench server (tracking/mlflow_server.py) --------------------------------------------------------------------


@pytest.mark.parametrize("port, fragment", [("70000", "--port 70000: give a port from 1 to 65535"),
                                            ("0", "--port 0: give a port from 1 to 65535"),
                                            ("-1", "--port -1: give a port from 1 to 65535")])
def test_server_on_an_impossible_port_is_one_line(tmp_path, port, fragment):
    error_line(invoke("server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}", "--artifacts",
                      str(tmp_path / "art"), "--port", port), 2, fragment)
    assert not (tmp_path / "art").exists() and not (tmp_path / "s.db").exists()


def test_server_on_a_store_whose_driver_is_not_installed_is_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("pymysql") is not None:
        pytest.skip("pymysql is installed here: no driver is missing")
    error_line(invoke("server", "--backend-store-uri", "mysql+pymysql://user@127.0.0.1/mlflow", "--artifacts",
                      str(tmp_path / "art"), "--port", str(free_port())), 2,
               "--backend-store-uri mysql+pymysql://user@127.0.0.1/mlflow: its database driver is not installed "
               "(pymysql)", "install it")


def test_server_with_a_read_only_artifacts_folder_is_one_line(tmp_path):
    with tmpfs(tmp_path / "art", "1m", read_only=True) as art:
        error_line(invoke("server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}", "--artifacts", str(art),
                          "--port", str(free_port())), 2,
                   f"--artifacts folder {art} is not writable (Read-only file system)", "pass another --artifacts")
    assert not (tmp_path / "s.db").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "stopped (SIGTERM) before the MLflow server "
                                                                      "answered")])
def test_a_signal_while_the_server_starts_ends_it_and_its_port(tmp_path, signum, code, said):
    port = free_port()
    server = bench("server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}", "--artifacts",
                   str(tmp_path / "art"), "--port", str(port), "--workers", "1")
    deadline = time.monotonic() + 120
    while len(process_tree(server.pid)) < 2 and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    started = process_tree(server.pid) - {server.pid}
    assert started, "bench server started no MLflow server"
    server.send_signal(signum)
    try:
        out, err = server.communicate(timeout=120)
    finally:  # what is left fails the test below, and is ended here either way
        left = [pid for pid in started if alive(pid)]
        for pid in process_tree(server.pid) | set(left):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "MLflow tracking server: " not in out, "the signal came while the server waited for MLflow"
    assert server.returncode == code and said in out + err and "Traceback" not in err, (server.returncode, out, err)
    assert not left, "a process of the MLflow server is left"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


# --- bench sweep (launch/sweep.py) -------------------------------------------------------------------------------


@pytest.fixture
def tiny_row(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))


SLURM_DRY_RUN = ("sweep", "--rows", "tiny", "--executor", "slurm", "--dry-run", "--synthetic", "--tracking-uri",
                 "http://tracking.lab:5000")


@pytest.mark.parametrize("option, value", [("--partition", "big\n#SBATCH --wrap=rm"), ("--account", "lab\r"),
                                           ("--qos", "high\nx"), ("--slurm-arg", "constraint=a100\n#SBATCH --x=y"),
                                           ("--slurm-arg", "bad key=1")])
def test_a_slurm_value_that_would_write_another_sbatch_line_is_refused(tiny_row, option, value):
    result = invoke(*SLURM_DRY_RUN, option, value)
    line = error_line(result, 2, option)
    assert "newline" in line or "no sbatch option name" in line, line
    assert "#SBATCH" not in result.stdout, "no script was printed"
    assert not sweeps_dir().exists()


def test_a_slurm_sweep_without_slurm_leaves_no_sweep_folder(tiny_row, tmp_path, monkeypatch):
    (tmp_path / "no-slurm").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))  # no sbatch, no srun
    error_line(invoke(*[a for a in SLURM_DRY_RUN if a != "--dry-run"]), 2, "--executor slurm: no sbatch/srun")
    assert not sweeps_dir().exists() or not any(sweeps_dir().iterdir())


@pytest.mark.parametrize("content, fragment", [
    ({"executor": "local"}, "'jobs' is missing"),
    ({"executor": "local", "jobs": [{"row": "tiny", "seed": 0}]}, "'jobs[0].state_file' is missing"),
    ({"executor": "local", "jobs": [{"row": "tiny", "seed": "0", "state_file": "x", "job_id": None, "log": None}]},
     "'jobs[0].seed' is str, not int"),
    ([1, 2], "the file is a JSON list, not an object"),
])
def test_a_sweep_json_lacking_fields_is_one_line_and_later_sweeps_skip_it(tiny_row, content, fragment):
    folder = sweeps_dir() / "20260101-000000"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps(content))
    before = snapshot(sweeps_dir())
    for command in (("sweep", "status", str(folder)), ("sweep", "cancel", str(folder)), ("sweep", "status")):
        error_line(invoke(*command), 2, f"{folder / 'sweep.json'}: {fragment}", "remove")
    result = invoke("sweep", "--rows", "tiny", "--synthetic", "--executor", "local", "--dry-run")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    (warning,) = [line for line in result.stderr.splitlines() if "skipping" in line]
    assert str(folder) in warning and fragment in warning
    assert "dry run: 1 job(s) would be submitted" in result.stdout
    assert snapshot(sweeps_dir()) == before


# --- the run journal (tracking/journal.py) -----------------------------------------------------------------------


def test_an_entry_appended_after_a_cut_line_starts_its_own_line_with_a_new_number(tmp_path, caplog):
    from harness.tracking.journal import Journal

    journal = Journal(tmp_path / "tracking")
    for step in range(3):
        journal.append({"op": "metrics", "step": step, "metrics": {"train/loss": 1.0}})
    whole = journal.path.read_bytes()
    cut = whole[: whole.rindex(b'"metrics": {"train') + 5]  # the crash cut the last entry (seq 2) short
    journal.path.write_bytes(cut)

    reopened = Journal(tmp_path / "tracking")  # the resumed run
    assert journal.path.read_bytes() == cut, "opening changes nothing"
    written = reopened.append({"op": "metrics", "step": 3, "metrics": {"train/loss": 0.5}})
    assert written["seq"] == 3, "the cut entry's number 2 is not given twice"
    assert journal.path.read_bytes().startswith(cut + b"\n"), "the cut line is kept, ended"
    assert [e["seq"] for e in reopened.entries()] == [0, 1, 3]
    assert reopened.entries()[-1]["metrics"] == {"train/loss": 0.5}
    (damaged,) = reopened.damaged()
    assert damaged.number == 3 and damaged.text == cut.splitlines()[-1].decode()
    (warning,) = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert f"{journal.path}, line 3 was cut short" in warning and "from sequence 3" in warning
    reopened.append({"op": "metrics", "step": 4, "metrics": {"train/loss": 0.4}})
    assert [e["seq"] for e in Journal(tmp_path / "tracking").entries()] == [0, 1, 3, 4]


# --- bench speed --budget-s (launch/speed.py) --------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "-5", "0"])
def test_a_budget_that_is_no_positive_finite_number_is_refused_before_any_measurement(budget):
    error_line(invoke("speed", "--rows", "df_seg_v1", "--budget-s", budget, "--device", "cpu"), 2,
               f"--budget-s {float(budget)}: give a positive, finite number of seconds")
    assert not (Path(os.environ["SEGBENCH_RESULTS"]) / "speed").exists(), "no speed record written"


# --- bench compare (report/compare.py) ---------------------------------------------------------------------------


def test_compare_refuses_runs_of_different_datasets(tmp_path):
    from tests.table_fixtures import full_budget_record

    per_class = {"road": 97.0, "car": 90.0}
    paths = []
    for dataset in ("cityscapes", "synthetic"):
        record = full_budget_record("sf_seg_v1", 72.6, per_class_iou=per_class, dataset=dataset)
        paths.append(tmp_path / f"{dataset}.json")
        paths[-1].write_text(json.dumps(record.to_json()))
    for flags in ((), ("--json",)):
        error_line(invoke("compare", *map(str, paths), *flags), 2,
                   f"{paths[0]} on cityscapes, {paths[1]} on synthetic", "different datasets",
                   "compare runs of one dataset")
    same = invoke("compare", str(paths[0]), str(paths[0]))
    assert same.exit_code == 0, same.output


# --- the Python API (harness/api.py) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter():
    from harness import api

    return api.build_model("df_seg_v1")


def api_refusal(call, *fragments: str) -> str:
    """The BenchError of a bad call: one line naming the argument, never a TypeError from inside."""
    from harness.errors import BenchError

    with pytest.raises(BenchError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("call, fragments", [
    (lambda api: api.load_row(3), ("load_row: name must be a row id", "got int")),
    (lambda api: api.load_row(None), ("load_row: name must be a row id", "got NoneType")),
    (lambda api: api.load_row(" "), ("load_row: name must be a row id", "got ' '")),
    (lambda api: api.build_model(3), ("build_model: row must be a row id", "or a Spec", "got int")),
    (lambda api: api.build_model(["df_seg_v1"]), ("build_model: row must be", "got list")),
    (lambda api: api.load_checkpoint(None), ("load_checkpoint: path must be a checkpoint's path", "got NoneType")),
    (lambda api: api.load_checkpoint(3), ("load_checkpoint: path must be", "got int")),
    (lambda api: api.load_checkpoint("best.pt", weights="best"), ("weights must be 'ema' or 'raw', got 'best'",)),
    (lambda api: api.load_checkpoint("best.pt", row=7), ("load_checkpoint: row must be a row id", "got int")),
])
def test_the_api_refuses_wrong_types_in_one_line(call, fragments):
    from harness import api

    api_refusal(lambda: call(api), *fragments)


@pytest.mark.parametrize("image, fragments", [
    (np.zeros((0, 0, 3), np.uint8), ("predict: the image is empty (0 x 0 pixels)",)),
    (np.zeros((0, 7, 3), np.uint8), ("predict: the image is empty (0 x 7 pixels)",)),
    (np.zeros((4, 4, 3), np.float32), ("expected uint8 RGB values 0-255, got torch.float32",)),
    ([[1, 2, 3]], ("expected an H x W x 3 RGB image, got list",)),
    (None, ("expected an H x W x 3 RGB image, got NoneType",)),
])
def test_predict_refuses_an_empty_or_mistyped_image_in_one_line(segmenter, image, fragments):
    from harness import api

    before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    api_refusal(lambda: api.predict(segmenter, image), *fragments)
    assert all(torch.equal(before[k], v) for k, v in segmenter.state_dict().items())


def test_predict_refuses_an_empty_file_and_a_device_that_is_none(segmenter, tmp_path):
    from harness import api

    empty = tmp_path / "empty.png"
    empty.touch()
    api_refusal(lambda: api.predict(segmenter, empty), f"cannot read image {empty}")
    for device in ("gpu7", 3.5):
        api_refusal(lambda device=device: api.predict(segmenter, np.zeros((4, 4, 3), np.uint8), device=device),
                    f"predict: device {device!r} is no device")


def test_an_acknowledgement_after_a_cut_one_starts_its_own_line(tmp_path, caplog):
    from harness.tracking.journal import Journal

    journal = Journal(tmp_path / "tracking")
    entries = [journal.append({"op": "metrics", "step": step, "metrics": {"train/loss": 1.0}}) for step in range(2)]
    journal.acknowledge(entries[0], "sqlite:///store.db")
    journal.sent_path.write_bytes(journal.sent_path.read_bytes() + b'{"seq": 1, "sto')  # cut while acknowledging 1
    Journal(tmp_path / "tracking").acknowledge(entries[1], "sqlite:///store.db")
    assert Journal(tmp_path / "tracking").pending("sqlite:///store.db") == [], "both acknowledgements read"
    assert any(f"{journal.sent_path}, line 2 was cut short" in r.getMessage() for r in caplog.records)
