"""Bad input: one line on stderr naming the problem, a non-zero exit, no traceback."""

import shutil

from click.testing import CliRunner

from harness.cli import main
from harness.paths import PROJECT_ROOT


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def assert_one_line_error(result, *fragments: str):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_list_shows_all_rows_in_table_order():
    result = invoke("list")
    assert result.exit_code == 0
    lines = result.output.splitlines()[2:]
    table_rows = [line for line in lines if "(our row)" not in line]
    assert len(table_rows) == 34 and lines[:34] == table_rows  # the table's rows first, in its order, then ours
    assert table_rows[0].startswith("deeplabv3-r50-lightseg") and table_rows[-1].startswith("unet-1024-ema")
    assert "80.5 | 80.2" in result.output


def test_show_prints_resolved_spec():
    result = invoke("show", "sf_seg_v2-ema")
    assert result.exit_code == 0 and "ohem" in result.output and "ema: true" in result.output


def test_unknown_row():
    assert_one_line_error(invoke("run", "--row", "deeplabv3-r5", "--synthetic"), "unknown row", "deeplabv3-r50")


def test_bad_spec_key(tmp_path):
    root = tmp_path / "experiments"
    shutil.copytree(PROJECT_ROOT / "experiments", root)
    (root / "deeplabv3-r50.yaml").write_text((root / "deeplabv3-r50.yaml").read_text() + "optimiser: adam\n")
    result = invoke("show", "deeplabv3-r50", env={"SEGBENCH_EXPERIMENTS": str(root)})
    assert_one_line_error(result, "deeplabv3-r50.yaml", "optimiser", "unknown key")


def test_missing_dataset(tmp_path):
    assert_one_line_error(invoke("run", "--row", "deeplabv3-r50"), "--data-root", "CITYSCAPES_DATASET")
    result = invoke("run", "--row", "deeplabv3-r50", "--data-root", str(tmp_path / "nope"))
    assert_one_line_error(result, str(tmp_path / "nope"), "does not exist")


def test_unimplemented_family_fails_before_reading_data(tmp_path, monkeypatch):
    from harness.models import registry

    monkeypatch.setattr(registry, "_BUILDERS", {k: v for k, v in registry._BUILDERS.items() if k != "pspnet"})
    # An empty dataset root: the family check must come before anything reads it. (A root that does not exist is
    # answered first, before PyTorch and the model families load: tests/test_first_hour.py.)
    result = invoke("run", "--row", "pspnet-r50", "--data-root", str(tmp_path))
    assert_one_line_error(result, "pspnet", "not implemented yet")


def test_torchrun_workers_run_the_parsed_options_not_the_raw_command_line():
    """Each worker's `bench run` command line is rebuilt from the options this process parsed and validated:
    parsing it again gives the same options (launcher options and the spelling typed play no part)."""
    from harness.cli import run as run_command
    from harness.launch.options import RunOptions, worker_argv

    options = RunOptions(row="df_seg_v1", synthetic=True, iters=7, device="cpu", deterministic=True,
                         eval_every=3, offline_tracking=True, resume="latest", stop_if_behind=3.5,
                         no_system_metrics=True)
    argv = worker_argv(options, [0, 2])
    assert argv[0] == "run" and not {"--gpus", "--nnodes", "--master-port"} & set(argv)
    parsed = run_command.make_context("run", argv[1:]).params
    for name in ("row", "synthetic", "iters", "device", "deterministic", "eval_every", "offline_tracking", "resume",
                 "stop_if_behind", "no_system_metrics"):
        assert parsed[name] == getattr(options, name), name
    assert parsed["seeds_text"] == "0,2"
    assert worker_argv(options, [5])[-2:] == ["--seed", "5"]
    # --stop-if-behind alone takes the default floor; a value outside 0-100 is refused in one line.
    assert run_command.make_context("run", ["--row", "x", "--stop-if-behind"]).params["stop_if_behind"] == 2.0


def test_stop_if_behind_outside_0_to_100_is_refused_in_one_line(synthetic_root):
    for value in ("nan", "150"):
        result = invoke("run", "--row", "df_seg_v1", "--synthetic", "--stop-if-behind", value)
        assert_one_line_error(result, f"--stop-if-behind {float(value)}", "mIoU points from 0 to 100")
