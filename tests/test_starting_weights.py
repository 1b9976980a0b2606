"""Starting weights: a backbone checkpoint named in a spec is loaded (and said so), relative paths resolve
against the project root, unusable files are refused with one line naming them, nothing in a file is
executed, and the MSeg-style row starts from an earlier run. Each family's loading of the file in UP's key
layout is tested beside its network (tests/test_models_up_*.py, tests/test_models_dfnet.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from harness.launch.run import RunOptions, run
from harness.config.spec import load_spec
from harness.errors import BenchError
from harness.models import build_model, weights
from harness.models.dfnet import dfnet
from harness.models.weights import (
    apply_starting_weights,
    load_backbone_checkpoint,
    load_init_checkpoint,
    resolve_checkpoint_path,
)
from harness.paths import PROJECT_ROOT
from tests.helpers import bench, experiments_with

pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with every tensor moved away from any initial value (BN statistics included),
    so equality after loading proves each tensor came from the file."""
    g = torch.Generator().manual_seed(123)
    return {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 7)
            for k, v in module.state_dict().items()}


def started(row: str) -> torch.nn.Module:
    """The row's model with the starting weights its spec names, as `bench run` builds it."""
    spec = load_spec(row)
    model = build_model(spec)
    assert not apply_starting_weights(model, spec).startswith("missing")
    return model


def use_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: dict[str, dict]) -> None:
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, rows)))


def assert_loaded(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    assert own.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(own[name], tensor), name


def one_line_error(error: pytest.ExceptionInfo, path: Path, *fragments: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- a backbone checkpoint named in the spec ---------------------------------------------------------

WRAPPINGS = {
    "raw": lambda sd: sd,
    "model": lambda sd: {"model": sd, "epoch": torch.tensor(3)},
    "state_dict": lambda sd: {"state_dict": sd, "epoch": torch.tensor(3)},
    "ddp": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "ddp-in-state_dict": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
def test_backbone_checkpoint_in_the_spec_is_loaded_and_reported(wrapping, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    state = perturbed_state(dfnet("dfnet1"))
    path = tmp_path / "dfnet1-imagenet.pth"
    torch.save(WRAPPINGS[wrapping](state), path)
    use_rows(tmp_path, monkeypatch, {
        "sf-bb": {"inherit": "sf_seg_v1", "model": {"backbone_checkpoint": str(path)}, "reference": {"miou": [1.0]}},
    })
    capsys.readouterr()
    model = started("sf-bb")
    assert_loaded(model.backbone, state)
    err = capsys.readouterr().err
    assert f"backbone_checkpoint {path}: loaded {len(state)}/{len(state)} tensors" in err, err


def test_without_a_checkpoint_the_backbone_is_not_the_saved_one(tmp_path):
    """The equality above is not a coincidence of initialisation."""
    torch.manual_seed(0)
    state = perturbed_state(dfnet("dfnet1"))
    own = build_model(load_spec("sf_seg_v1")).backbone.state_dict()
    assert not any(torch.equal(own[k], state[k]) for k in state)


def test_init_checkpoint_loads_every_tensor_of_a_training_checkpoint(tmp_path, capsys):
    """A segbench training checkpoint ({"format", "model", "ema", "optimizer", ...}) starts the whole model."""
    torch.manual_seed(0)
    state = perturbed_state(build_model(load_spec("df_seg_v1")))
    path = tmp_path / "ckpt-00000100.pt"
    torch.save({"format": "segbench-checkpoint/1", "iteration": 100, "model": state, "ema": None,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}}, path)
    model = build_model(load_spec("df_seg_v1"))
    capsys.readouterr()
    assert load_init_checkpoint(model, path) == len(state)
    assert_loaded(model, state)
    assert f"init_checkpoint {path}: loaded {len(state)}/{len(state)} tensors" in capsys.readouterr().err


def test_init_checkpoint_wins_over_the_backbone_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    backbone_state = perturbed_state(dfnet("dfnet1"))
    whole = build_model(load_spec("df_seg_v1"))
    whole_state = {k: v + 1 if v.is_floating_point() else v for k, v in whole.state_dict().items()}
    torch.save(backbone_state, tmp_path / "bb.pt")
    torch.save(whole_state, tmp_path / "whole.pt")
    use_rows(tmp_path, monkeypatch, {
        "df-both": {"inherit": "df_seg_v1", "reference": {"miou": [1.0]},
                    "model": {"backbone_checkpoint": str(tmp_path / "bb.pt"), "init_checkpoint": str(tmp_path / "whole.pt")}},
    })
    assert_loaded(started("df-both"), whole_state)


# --- paths -------------------------------------------------------------------------------------------


def test_relative_checkpoint_paths_resolve_against_the_project_root(tmp_path):
    assert resolve_checkpoint_path("weights/dfnet1.pth") == PROJECT_ROOT / "weights" / "dfnet1.pth"
    assert resolve_checkpoint_path(Path("weights/x.pt")) == PROJECT_ROOT / "weights" / "x.pt"
    assert resolve_checkpoint_path(tmp_path / "a.pt") == tmp_path / "a.pt"
    assert resolve_checkpoint_path("~/a.pt") == Path.home() / "a.pt"


def test_a_relative_path_in_the_spec_is_read_from_the_project_root(tmp_path, monkeypatch, capsys):
    root = tmp_path / "project"
    (root / "weights").mkdir(parents=True)
    torch.manual_seed(0)
    state = perturbed_state(dfnet("dfnet1"))
    torch.save(state, root / "weights" / "dfnet1.pth")
    monkeypatch.setattr(weights, "PROJECT_ROOT", root)
    monkeypatch.chdir(tmp_path)  # not the working directory: a relative path there would not exist
    use_rows(tmp_path, monkeypatch, {
        "sf-rel": {"inherit": "sf_seg_v1", "model": {"backbone_checkpoint": "weights/dfnet1.pth"}, "reference": {"miou": [1.0]}},
    })
    assert_loaded(started("sf-rel").backbone, state)
    assert f"{root / 'weights' / 'dfnet1.pth'}: loaded" in capsys.readouterr().err


def test_the_mseg_rows_missing_default_checkpoint_is_named_at_the_project_root(capsys):
    expected = PROJECT_ROOT / "weights" / "df_seg_v1_mseg.pth"
    if expected.exists():
        pytest.skip(f"{expected} exists on this machine")
    spec = load_spec("df_seg_v1-mseg")
    assert apply_starting_weights(build_model(spec), spec) == f"missing {expected}"
    assert str(expected) in capsys.readouterr().err


# --- refusals ----------------------------------------------------------------------------------------


def test_missing_backbone_checkpoint_leaves_random_weights_and_says_so(tmp_path, monkeypatch, capsys):
    """Users bring the files: a missing one does not stop the run, but the status says it (the runner records
    it, tags the MLflow run and the table marks it; tests/test_best_and_starting_weights.py)."""
    path = tmp_path / "nowhere" / "dfnet1.pth"
    use_rows(tmp_path, monkeypatch, {
        "sf-missing": {"inherit": "sf_seg_v1", "model": {"backbone_checkpoint": str(path)}, "reference": {"miou": [1.0]}},
    })
    spec = load_spec("sf-missing")
    model = build_model(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_starting_weights(model, spec, loud=True) == f"missing {path}"
    assert_loaded(model, before)
    err = capsys.readouterr().err
    assert "WARNING" in err and str(path) in err and "bench weights" in err


def test_a_checkpoint_of_another_network_is_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(BenchError) as error:
        load_backbone_checkpoint(build_model(load_spec("sf_seg_v1")), path, "sf_seg_v1")
    one_line_error(error, path, "none of its", "names match", "another network")


def test_dfnet2_weights_into_dfnet1_are_refused(tmp_path):
    """Only the stems share names and shapes: that must not pass for a loaded backbone."""
    path = tmp_path / "dfnet2.pth"
    torch.save(dfnet("dfnet2").state_dict(), path)
    model = build_model(load_spec("df_seg_v1"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BenchError) as error:
        load_backbone_checkpoint(model, path, "df_seg_v1")
    one_line_error(error, path, "backbone_checkpoint", "another network", "'stage2.0.conv1.weight' is missing")
    assert_loaded(model, before)  # nothing was half-loaded


def test_df_seg_v2_checkpoint_into_df_seg_v1_is_refused(tmp_path):
    path = tmp_path / "df_seg_v2.pth"
    torch.save({"model": build_model(load_spec("df_seg_v2")).state_dict()}, path)
    with pytest.raises(BenchError) as error:
        load_init_checkpoint(build_model(load_spec("df_seg_v1")), path)
    one_line_error(error, path, "init_checkpoint", "another network")


def test_a_shape_mismatch_outside_the_classifier_is_refused(tmp_path, monkeypatch):
    """Only a classifier for another number of classes is re-initialised (the MSeg start); any other tensor of
    another shape means another network."""
    state = build_model(load_spec("df_seg_v1")).state_dict()
    name = next(k for k, v in state.items() if v.dim() == 4 and v.shape[0] not in (19,) and k.startswith("head"))
    state[name] = torch.zeros(state[name].shape[0] + 3, *state[name].shape[1:])
    path = tmp_path / "wider.pth"
    torch.save({"model": state}, path)
    use_rows(tmp_path, monkeypatch, {
        "df-init": {"inherit": "df_seg_v1", "model": {"init_checkpoint": str(path)}, "reference": {"miou": [1.0]}},
    })
    with pytest.raises(BenchError) as error:
        started("df-init")
    one_line_error(error, path, f"shape mismatch at '{name}'", "another network")


def test_a_truncated_checkpoint_is_refused(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save(dfnet("dfnet1").state_dict(), whole)
    path = tmp_path / "truncated.pth"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(BenchError) as error:
        load_backbone_checkpoint(build_model(load_spec("sf_seg_v1")), path, "sf_seg_v1")
    one_line_error(error, path, "unreadable", "truncated")


@pytest.mark.parametrize("content", ["list", "metadata-only", "empty", "text"])
def test_a_file_that_is_not_a_state_dict_is_refused(content, tmp_path):
    path = tmp_path / f"{content}.pth"
    if content == "list":
        torch.save([torch.zeros(3), torch.ones(2)], path)
    elif content == "metadata-only":
        torch.save({"epoch": 3, "model": "dfnet1", "best_miou": 71.2}, path)
    elif content == "empty":
        torch.save({}, path)
    else:
        path.write_text("not a checkpoint\n")
    with pytest.raises(BenchError) as error:
        load_init_checkpoint(build_model(load_spec("df_seg_v1")), path)
    expected = "unreadable" if content == "text" else "holds no state dict"
    one_line_error(error, path, "init_checkpoint", expected)


# --- nothing in a file is executed --------------------------------------------------------------------


def _leave_a_mark(path: str) -> None:
    Path(path).write_text("code from a checkpoint ran\n")


class Payload:
    """Unpickling this calls `_leave_a_mark`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _leave_a_mark, (self.marker,)


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "payload.pth"
    state = dfnet("dfnet1").state_dict()
    torch.save({"state_dict": state, "args": Payload(marker)}, path)
    with pytest.raises(BenchError) as error:
        load_backbone_checkpoint(build_model(load_spec("sf_seg_v1")), path, "sf_seg_v1")
    one_line_error(error, path, "pickled Python objects", "weights_only")
    assert not marker.exists()
    # The file does run code when loaded without weights_only: the refusal above is what prevented it.
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_torch_load_is_called_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "dfnet1.pth"
    torch.save(dfnet("dfnet1").state_dict(), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_backbone_checkpoint(build_model(load_spec("sf_seg_v1")), path, "sf_seg_v1")
    assert calls and all(call.get("weights_only") is True for call in calls), calls


# --- the MSeg-style start, end to end -------------------------------------------------------------------


def small_budget(iters: int) -> dict:
    return {"iters": iters, "batch_size": 4, "crop_size": [64, 64], "test_size": [128, 64],
            "checkpoint_every": 0, "log_every": 50}


@pytest.mark.slow
def test_mseg_row_starts_from_an_earlier_run_and_beats_scratch(tmp_path, monkeypatch, capsys, synthetic_root):
    """`df_seg_v1-mseg` starts from a checkpoint of an earlier synthetic run and its first
    evaluation already beats training from scratch for the same steps; a mismatched checkpoint is refused."""
    few = 3
    use_rows(tmp_path, monkeypatch, {
        "df-pretrain": {"inherit": "df_seg_v1", "reference": {"miou": [1.0]}, "synthetic": small_budget(80)},
        "df-scratch": {"inherit": "df_seg_v1", "reference": {"miou": [1.0]}, "synthetic": small_budget(few)},
        # The real MSeg row's chain: its model.init_checkpoint (weights/df_seg_v1_mseg.pth) is what --init-checkpoint replaces.
        "df-mseg": {"inherit": "df_seg_v1-mseg", "reference": {"miou": [1.0]}, "synthetic": small_budget(few)},
    })
    assert load_spec("df-mseg").model.init_checkpoint  # the row names a whole-model checkpoint of its own

    pretrained = run(RunOptions(row="df-pretrain", synthetic=True, progress=False))
    scratch = run(RunOptions(row="df-scratch", synthetic=True, progress=False))
    capsys.readouterr()
    started = run(RunOptions(row="df-mseg", synthetic=True, progress=False, init_checkpoint=pretrained.checkpoint))
    total = len(build_model(load_spec("df_seg_v1")).state_dict())
    assert f"init_checkpoint {pretrained.checkpoint}: loaded {total}/{total} tensors" in capsys.readouterr().err
    assert started.iterations == scratch.iterations == few
    assert started.miou > scratch.miou + 5.0, (started.miou, scratch.miou, pretrained.miou)

    # A mismatched whole-model checkpoint (a DF-Seg v2's, another backbone) is refused by `bench run`, in one line.
    wrong = tmp_path / "df_seg_v2.pt"
    torch.save({"model": build_model(load_spec("df_seg_v2")).state_dict()}, wrong)
    process = bench("run", "--row", "df-mseg", "--synthetic", "--init-checkpoint", str(wrong),
                    env={"OMP_NUM_THREADS": "1", "SEGBENCH_CACHE": os.environ["SEGBENCH_CACHE"]})
    out, err = process.communicate(timeout=300)
    assert process.returncode != 0, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert str(wrong) in errors[0] and "another network" in errors[0], err
