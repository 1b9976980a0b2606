"""The fault suite, continued: bad input and faults at the edges of `bench check`, `run --seeds`, `new-row`, `sync`,
`data cache`, `sweep` and `ui`. Each ends in one line naming the input and the fix, the right exit code, no
traceback, and nothing written before it changed.

The other cases of the same list live beside the code they exercise: `bench data check --full` finding a truncated
image (tests/test_data_check.py), `bench ui` ending its whole server on Ctrl-C, on SIGTERM and on a start-up that never
answers (tests/test_mlflow_view.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import harness.data.decoded as decoded
from harness.cli import main
from harness.engine.run_folder import RunFolder
from harness.paths import runs_dir
from harness.report.records import load_records, write_result_record
from harness.tracking.journal import JOURNAL_DIR
from harness.tracking.tracker import Tracker
from tests.helpers import experiments_with
from tests.table_fixtures import full_budget_record
from tests.test_faults import TINY, invoke, nothing_started, one_line, rows, tmpfs  # noqa: F401 (rows: a fixture)

MLFLOW_NOTES = tuple(f"{year}/" for year in range(2020, 2100))  # MLflow's own dated INFO lines (a new store)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: compared before and after a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- records ---------------------------------------------------------------------------------------


def test_bench_check_with_a_record_that_is_not_an_object_names_the_file(isolated_outputs):
    good = write_result_record(full_budget_record("sf_seg_v1", 72.6))
    bad = Path(str(good.path)).parent / "20260101T000000Z-list.json"
    bad.write_text("[1, 2]\n")
    before = snapshot(isolated_outputs / "results")
    line = one_line(invoke("check"), str(bad), "holds a JSON list, not an object", "fix or remove it")
    assert line.startswith("error: result record ")
    assert snapshot(isolated_outputs / "results") == before


# --- bench run --seeds ------------------------------------------------------------------------------


def test_every_seed_is_checked_before_the_first_one_trains(rows, synthetic_root):
    rows({"tiny": TINY})
    one_line(invoke("run", "--row", "tiny", "--synthetic", "--seeds", "0,-1"), "--seeds 0,-1: seed -1",
             "0 to 4294967295")
    nothing_started()  # seed 0 did not train


# --- bench new-row ----------------------------------------------------------------------------------


def test_new_row_into_a_read_only_experiments_folder_is_one_line(tmp_path, monkeypatch):
    from harness.paths import PROJECT_ROOT

    with tmpfs(tmp_path / "experiments", "16m") as root:
        subprocess.run(["cp", "-r", f"{PROJECT_ROOT / 'experiments'}/.", str(root)], check=True)
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True, text=True)
        if remounted.returncode:
            pytest.skip(f"cannot remount the tmpfs read-only ({remounted.stderr.strip()})")
        monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(root))
        before = snapshot(root)
        one_line(invoke("new-row", "unet-r18", "--arch", "Unet", "--encoder", "resnet18"),
                 f"cannot write {root / 'unet-r18.yaml'}", "Read-only file system", "SEGBENCH_EXPERIMENTS")
        assert snapshot(root) == before


def test_new_row_of_another_architecture_drops_the_recipe_rows_keywords_and_says_which(rows):
    root = rows({})
    result = CliRunner().invoke(main, ["new-row", "unet-mnv2", "--arch", "Unet", "--encoder", "mobilenet_v2",
                                       "--from", "fpn-mobilenet"])
    assert result.exit_code == 0, result.output
    (note,) = result.stderr.strip().splitlines()
    assert note.startswith("note: dropped fpn-mobilenet's model.kwargs (decoder_pyramid_channels, "
                           "decoder_segmentation_channels): they are FPN's constructor keywords, not Unet's"), note
    from harness.config.spec import load_spec

    spec = load_spec("unet-mnv2", root)
    assert spec.model.arch == "Unet" and spec.model.kwargs == {}
    assert load_spec("fpn-mobilenet", root).model.kwargs  # the recipe row keeps its own
    assert not list(root.glob(".*.new"))


# --- bench sync -------------------------------------------------------------------------------------


def journalled_run(store: str, metrics: int = 5) -> Path:
    """A finished run folder whose journal (written offline) was never sent: what `bench sync` replays."""
    folder = RunFolder.create(runs_dir() / "synthetic" / "tiny", row="tiny", dataset="synthetic", tracking_uri=store)
    tracker = Tracker(store, "synthetic", offline=True)
    tracker.start(folder.path / JOURNAL_DIR, "tiny", {"iters": metrics}, {"kind": "train", "row": "tiny"})
    for step in range(1, metrics + 1):
        tracker.log_metrics({"train_loss": 3.0 / step}, step)
    tracker.log_metrics({"miou": 12.5}, metrics)
    tracker.finish("FINISHED")
    folder.end("FINISHED")
    return folder.path


def test_sync_completeness_is_per_store(tmp_path):
    first, other = f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'other.db'}"
    run_dir = journalled_run(first)
    once = invoke("sync", str(run_dir))
    assert once.exit_code == 0 and " entries sent to run " in once.output, once.output
    own_id = json.loads((run_dir / "run.json").read_text())["tracking_run_id"]
    elsewhere = invoke("sync", str(run_dir), "--tracking-uri", other)
    assert elsewhere.exit_code == 0, elsewhere.output
    assert "already complete" not in elsewhere.output and "entries sent to run " in elsewhere.output
    (copied,) = MlflowClient(other).search_runs([MlflowClient(other).get_experiment_by_name(
        "segbench-synthetic").experiment_id])
    assert copied.info.status == "FINISHED" and copied.data.metrics["miou"] == 12.5
    assert len(MlflowClient(other).get_metric_history(copied.info.run_id, "train/loss")) == 5
    assert json.loads((run_dir / "run.json").read_text())["tracking_run_id"] == own_id  # its own store's id stays
    again = invoke("sync", str(run_dir), "--tracking-uri", other)
    assert again.exit_code == 0 and f"already complete in run {copied.info.run_id} at {other}" in again.output


def test_sync_names_a_damaged_journal_line_and_exits_non_zero_unless_accepted(tmp_path):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    run_dir = journalled_run(store)
    journal = run_dir / JOURNAL_DIR / "journal.jsonl"
    lines = journal.read_text().splitlines()
    lines.insert(4, '{"seq": 99, "op": "metr')  # cut short by a crash mid-write
    journal.write_text("\n".join(lines) + "\n")
    before = journal.read_bytes()
    result = invoke("sync", str(run_dir))
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [l for l in result.stderr.splitlines() if not l.startswith(MLFLOW_NOTES)]  # one line of ours
    assert line.startswith(f"error: damaged journal line not sent: {journal}, line 5: ") and "--skip-damaged" in line
    run_id = json.loads((run_dir / "run.json").read_text())["tracking_run_id"]
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"  # the rest was sent
    assert journal.read_bytes() == before  # the evidence is left as it was
    accepted = invoke("sync", str(run_dir), "--skip-damaged")
    assert accepted.exit_code == 0 and "already complete" in accepted.output
    (warning,) = [l for l in accepted.stderr.splitlines() if not l.startswith(MLFLOW_NOTES)]
    assert warning.startswith(f"warning: damaged journal line not sent (accepted with --skip-damaged): {journal}")


# --- bench data cache -------------------------------------------------------------------------------


def test_data_cache_into_a_read_only_folder_is_one_line_before_decoding(tmp_path, synthetic_root):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        result = invoke("data", "cache", "--data-root", str(synthetic_root), "--out", str(ro / "decoded"))
        line = one_line(result, f"{ro / 'decoded'}", "not writable", "Read-only file system")
        assert "decoding" not in result.output
    assert line.startswith("error: the decoded cache folder")


def test_data_cache_short_of_space_says_so_in_mib(tmp_path, synthetic_root, monkeypatch):
    monkeypatch.setattr(decoded, "_free_bytes", lambda folder: 300 * 1024)
    out = tmp_path / "decoded"
    line = one_line(invoke("data", "cache", "--data-root", str(synthetic_root), "--out", str(out), "--splits", "val"),
                    f"the decoded val split needs 1.0 MiB in {out}, which has 300 KiB free")
    assert "GiB" not in line
    assert list(out.iterdir()) == []  # no partial cache file


# --- bench sweep ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_sweep_whose_job_fails_exits_non_zero_naming_it(tmp_path, monkeypatch, synthetic_root):
    # Every check before submission passes; the job's `bench run` diverges at its first step and fails.
    exploding = {**TINY, "synthetic": {**TINY["synthetic"], "lr": 1.0e30}}
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": exploding})))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = invoke("sweep", "--rows", "tiny", "--executor", "local", "--synthetic")
    assert result.exit_code == 1, result.output
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert line.startswith("error: 1 of 1 job(s) did not finish: tiny seed 0 (bench run exited with 2; see ") \
        and "run the same `bench sweep` again" in line, result.stderr
    assert "tiny   0       failed" in result.stdout
    assert "Traceback" not in result.output and load_records() == []


# --- bench ui ---------------------------------------------------------------------------------------


def test_ui_on_a_port_another_server_holds_is_one_line_at_once(synthetic_root):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        started = time.monotonic()
        line = one_line(invoke("ui", "--port", str(port)), f"--port {port}: something already listens on "
                                                           f"127.0.0.1:{port}", "pass another port")
        assert time.monotonic() - started < 10, "refused before any server was started"
    assert "http://" not in line


def test_ui_on_an_impossible_port_is_one_line(synthetic_root):
    one_line(invoke("ui", "--port", "70000"), "--port 70000: give a port from 1 to 65535")
