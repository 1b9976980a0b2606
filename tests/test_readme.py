"""README's everyday block works as written on a fresh checkout: every line of it runs here, against the synthetic
dataset, in README order (a `bench run` line makes the run folder the `<stamp>` of the lines after it); the lines
that cannot run here say why and where they are run instead. A line added to the block and not listed here fails."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import paths
from harness.cli import main
from harness.paths import PROJECT_ROOT, runs_dir

pytestmark = pytest.mark.slow

CITYSCAPES = "/data/cityscapes"
# How each line runs here: "as written" (paths outside the checkout moved under the test's folder), "short" (the
# same command with the extra options given, and why), or "elsewhere" (why not here, and which test runs it).
SHORT = {
    "bench speed --row sf_seg_v2": (["--mode", "infer", "--size", "128,64", "--warmup", "0", "--repeats", "1",
                                     "--steps", "1"], "every mode at full size takes minutes on a CPU"),
}
ELSEWHERE = {
    "bench list --sizes": "builds all 36 networks (20 s); tests/test_family_runs.py and tests/test_our_rows.py run it",
    "bench speed --rows all --budget-s 780": "times all 36 networks at full size, a GPU's job; "
                                             "tests/test_speed.py runs --rows and --budget-s on a few rows",
    "bench server": "serves until stopped; tests/test_cluster.py starts it on SQLite and on PostgreSQL",
    "bench ui": "serves until stopped; tests/test_mlflow_view.py starts it, opens it in Chromium and stops it",
}
# Lines whose honest answer on a fresh clone is "no-go" (exit 1): the reason they must name.
NO_GO = {
    f"bench doctor --row sf_seg_v2 --gpus 8 --device h100 --data-root {CITYSCAPES}": "no-go: starting weights",
    "bench weights --verify": "error: --verify verified nothing: all",  # a fresh clone has no weight file to hash
}
NEEDS_CITYSCAPES = {  # the full budget on the real data: here only refused in one line for the missing folder
    f"bench run --row deeplabv3-r50 --data-root {CITYSCAPES}",
    f"bench run --row df_seg_v2 --seeds 0,1,2 --data-root {CITYSCAPES}",
}


def everyday_lines() -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("## Everyday use", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def fresh_clone(target: Path) -> Path:
    """A clone of this checkout as it stands (tracked and untracked files that git does not ignore, committed in
    the clone): what a user has after `git clone`, with this working tree's changes."""
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(PROJECT_ROOT), str(target)], check=True)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, copy = PROJECT_ROOT / name, target / name
        if source.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
        elif copy.exists():  # deleted in the working tree
            copy.unlink()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "--quiet", "--allow-empty", "-m", "working tree"], cwd=target, check=True)
    return target


def test_every_everyday_line_of_the_readme_runs_on_a_fresh_checkout(tmp_path, monkeypatch, synthetic_root,
                                                                    one_thread):
    # A fresh clone, its own outputs where a user's go (runs/, results/, mlflow.db, benchmark.md of the clone):
    # only the generated synthetic dataset is shared (its cache folder is ignored by git either way).
    clone = fresh_clone(tmp_path / "clone")
    monkeypatch.setattr(paths, "PROJECT_ROOT", clone)
    for variable in ("SEGBENCH_RESULTS", "SEGBENCH_BENCHMARK", "SEGBENCH_RUNS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "no-weights").mkdir()
    monkeypatch.setenv("SEGBENCH_WEIGHTS", str(tmp_path / "no-weights"))  # a fresh clone has none
    monkeypatch.chdir(clone)  # the README's lines run in the checkout's root
    lines = everyday_lines()
    assert len(lines) >= 20 and all(line.startswith("bench ") for line in lines), lines
    known = {*SHORT, *ELSEWHERE, *NO_GO, *NEEDS_CITYSCAPES}
    stamp = None
    for line in lines:
        command = line
        if line in ELSEWHERE:
            continue
        if line in NEEDS_CITYSCAPES:
            if Path(CITYSCAPES).exists():
                continue  # a machine with the data: the line would start the real training
            result = CliRunner().invoke(main, shlex.split(line)[1:])
            assert result.exit_code == 2 and CITYSCAPES in result.stderr, (line, result.output)
            assert len(result.stderr.strip().splitlines()) == 1, (line, result.stderr)
            continue
        if "<stamp>" in line:
            assert stamp is not None, f"{line}: no `bench run` line above it made a run folder"
            command = line.replace("<stamp>", stamp)
        command = (command.replace(CITYSCAPES, str(synthetic_root)).replace("/tmp/synthetic", str(tmp_path / "synth"))
                   .replace("/scratch/decoded", str(tmp_path / "decoded")))
        args = shlex.split(command)[1:]
        if line in SHORT:
            args += SHORT[line][0]
        else:
            assert not any(word in line for word in ("/data/", "/scratch/")) or CITYSCAPES in line, line
        before = set(runs_dir().glob("*/*/*")) if runs_dir().exists() else set()
        result = CliRunner().invoke(main, args)
        if line in NO_GO:
            assert result.exit_code == 1 and NO_GO[line] in result.output, (line, result.output)
            continue
        assert result.exit_code == 0, (line, result.output)
        assert "Traceback" not in result.output and "error:" not in result.stderr, (line, result.stderr)
        if args[0] == "run":
            (made,) = set(runs_dir().glob("*/*/*")) - before
            stamp = made.name
        known.add(line)
    assert set(lines) <= known

    # What the lines left behind: the synthetic run and its record, the evaluation, the predictions and their zip
    # (beside the run), the speed record of this CPU (under runs/) ...
    (predictions,) = (clone / "runs" / "synthetic" / "df_seg_v1").glob("*/predictions/val-raw")
    assert predictions.with_suffix(".zip").is_file() and any(predictions.rglob("*.png"))
    assert list((clone / "runs" / "speed").glob("*/sf_seg_v2/*.json")) and not (clone / "results" / "speed").exists()
    assert (tmp_path / "synth" / "synthetic.json").is_file() and any((tmp_path / "decoded").iterdir())
    assert any((clone / "results" / "synthetic").rglob("*.json")) and (clone / "mlflow.db").is_file()
    # ... and a checkout as clean as it was: nothing new that git would show, nothing committed changed
    # (benchmark.md and benchmark.png regenerated byte for byte).
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", status
