"""One way into a run: `bench run` and the Python API (harness.api.run) pass through the same checks
(harness.launch.run.checked_run), so the API refuses what the command line refuses and trains what it trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import api
from harness.cli import main
from harness.errors import BenchError
from tests.test_doctor import complete_tree, small_disk, weights_ok  # noqa: F401  (fixtures)


@pytest.fixture
def started(monkeypatch) -> list:
    """The options each training would have started with (nothing trains)."""
    seen: list = []
    monkeypatch.setattr("harness.launch.run.train", lambda checked, seed: seen.append(checked.options) or None)
    return seen


def test_a_lightseg_row_trains_its_base_row_from_the_cli_and_from_the_api(started):
    result = CliRunner().invoke(main, ["run", "--row", "sf_seg_v1-lightseg", "--synthetic"])
    assert result.exit_code == 0, result.output
    api.run(api.RunOptions(row="sf_seg_v1-lightseg", synthetic=True))
    assert [o.row for o in started] == ["sf_seg_v1", "sf_seg_v1"]


def test_the_api_refuses_a_no_go_from_readiness_as_the_cli_does(complete_tree, weights_ok, small_disk,  # noqa: F811
                                                                  monkeypatch, started):
    monkeypatch.setenv("SEGBENCH_RUNS", str(small_disk))
    cli = CliRunner().invoke(main, ["run", "--row", "df_seg_v1", "--data-root", str(complete_tree)])
    assert cli.exit_code == 2, cli.output
    (cli_error,) = cli.stderr.strip().splitlines()
    assert cli_error.startswith("error: disk: ")
    with pytest.raises(BenchError) as refused:
        api.run(api.RunOptions(row="df_seg_v1", data_root=str(complete_tree)))
    assert f"error: {refused.value}" == cli_error
    assert started == [] and not any(Path(small_disk, "cityscapes").glob("*/*")), "a run started"
