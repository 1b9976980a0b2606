"""README's everyday block works as written on a fresh checkout: every line of it runs here, against the synthetic
dataset, in README order (a `bench run` line makes the run folder the `<stamp>` of the lines after it); the lines
that cannot run here say why and where they are run instead. A line added to the block and not listed here fails."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

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
}
NEEDS_CITYSCAPES = {  # the full budget on the real data: here only refused in one line for the missing folder
    f"bench run --row deeplabv3-r50 --data-root {CITYSCAPES}",
    f"bench run --row df_seg_v2 --seeds 0,1,2 --data-root {CITYSCAPES}",
}


def everyday_lines() -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("## Everyday use", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_every_everyday_line_of_the_readme_runs_on_a_fresh_checkout(tmp_path, monkeypatch, synthetic_root,
                                                                    one_thread):
    monkeypatch.chdir(tmp_path)  # relative paths (preds, runs/...) land here, as in a fresh clone's folder
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

    # What the lines left behind: the synthetic run and its record, the evaluation, the predictions and their zip.
    assert (tmp_path / "preds.zip").is_file() and any((tmp_path / "preds").rglob("*.png"))
    assert (tmp_path / "synth" / "synthetic.json").is_file() and any((tmp_path / "decoded").iterdir())
