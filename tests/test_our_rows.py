"""Our rows: spec files beside the table, any segmentation-models-pytorch architecture on any smp/timm encoder,
trained through `bench run`, tabled under "Our rows" and never in the seed table; `bench new-row` writes them."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
import yaml
from click.testing import CliRunner

from harness.cli import main
from harness.config.spec import load_all, load_ours, load_spec, our_row_ids, row_ids
from harness.errors import BenchError
from harness.models import build_model
from harness.models.weights import load_backbone_checkpoint
from harness.report.records import load_records
from harness.report.table import OURS_HEADING, render
from tests.helpers import assert_segmentation_outputs, experiments_with
from tests.table_fixtures import full_budget_record, line_of

# Small enough for a CPU test: a few iterations of two 64x64 crops, evaluated at 128x64.
TINY_BUDGET = {"batch_size": 2, "crop_size": [64, 64], "test_size": [128, 64], "ohem_min_kept": 200}
FIVE = {"Unet": "resnet18", "FPN": "mobilenet_v2", "DeepLabV3Plus": "resnet18", "PSPNet": "resnet18",
        "Linknet": "tu-mobilenetv3_small_100"}


def our_row(arch: str, encoder: str, recipe: str = "deeplabv3-r50", **model) -> dict:
    return {"inherit": recipe, "columns": {"model": arch, "backbone": encoder},
            "model": {"family": "smp", "arch": arch, "encoder": encoder, "backbone": encoder,
                      "backbone_checkpoint": None, **model},
            "loss": {"aux_weights": []}, "synthetic": TINY_BUDGET}


@pytest.fixture
def ours(tmp_path, monkeypatch):
    """A private experiments/ whose extra rows are written beside the table, not listed in `_table.yaml`."""
    root = experiments_with(tmp_path, {})
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(root))

    def add(rows: dict[str, dict]):
        for row, body in rows.items():
            (root / f"{row}.yaml").write_text(yaml.safe_dump(body))
        return root

    return add


def test_rows_outside_the_table_are_ours_and_the_table_keeps_its_rows(ours):
    table = row_ids()
    ours({"mine": our_row("Unet", "resnet18")})
    assert row_ids() == table and [s.row for s in load_all()] == table  # the table's rows only, as before
    assert "mine" in our_row_ids() and "mine" not in table
    spec = load_spec("mine")
    assert spec.reference.miou == [] and spec.model.arch == "Unet" and spec.model.kwargs == {}
    assert spec.train.lr_per_image == load_spec("deeplabv3-r50").train.lr_per_image  # the recipe is inherited


def test_table_rows_still_need_a_reference(ours):
    root = ours({})
    path = root / "pspnet-r50.yaml"
    path.write_text("inherit: _base/pspnet\n")
    assert "reference" not in path.read_text()
    with pytest.raises(BenchError, match="missing required key 'reference'"):
        load_spec("pspnet-r50")


def test_committed_example_rows_load_and_keep_the_contract():
    assert {"deeplabv3plus-r50", "fpn-mobilenet"} <= set(our_row_ids())
    for spec in load_ours():
        if spec.row in ("deeplabv3plus-r50", "fpn-mobilenet"):
            assert spec.model.family == "smp" and spec.reference.miou == [] and spec.loss.aux_weights == []
            assert_segmentation_outputs(build_model(spec), 0)


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3",
                                  "DeepLabV3Plus", "PAN", "UPerNet", "Segformer"])
def test_every_architecture_returns_logits_at_any_input_size(ours, arch, one_thread):
    # 97x193 divides by no encoder's stride: padded up and cropped back.
    ours({"any": our_row(arch, "resnet18")})
    assert_segmentation_outputs(build_model(load_spec("any")), 0)


@pytest.mark.slow
def test_five_architectures_train_through_bench_run_and_are_tabled_under_our_rows(ours, synthetic_root, one_thread):
    ours({f"ours-{arch.lower()}": our_row(arch, encoder) for arch, encoder in FIVE.items()})
    seed_table = render("synthetic", records=[])
    for arch in FIVE:
        result = CliRunner().invoke(main, ["run", "--row", f"ours-{arch.lower()}", "--synthetic", "--iters", "2"])
        assert result.exit_code == 0, result.output
    records = load_records(dataset="synthetic")
    assert sorted(r.row for r in records) == sorted(f"ours-{a.lower()}" for a in FIVE)
    text = render("synthetic")
    before, heading, after = text.partition(f"\n## {OURS_HEADING}\n")
    assert heading and before == seed_table  # the seed table is untouched; our rows follow it
    for record in records:
        line = line_of(after, record.row)
        assert line["iterations"] == "2" and line["crop"] == "[64, 64]"
        assert line["mean"] == f"{record.miou_best:.2f}"
        assert f"| {record.row} " not in before


def test_our_rows_follow_the_cityscapes_table_with_their_own_reference_or_none(ours, monkeypatch):
    ours({"mine": our_row("FPN", "mobilenet_v2"),
          "mine-ref": {**our_row("FPN", "mobilenet_v2"), "reference": {"miou": [70.0]}}})
    seed = render("cityscapes", records=[full_budget_record("deeplabv3-r50", 79.4)], ours=[])
    records = [full_budget_record("deeplabv3-r50", 79.4), full_budget_record("mine", 71.0),
               full_budget_record("mine", 73.0), full_budget_record("mine-ref", 70.2)]
    text = render("cityscapes", records=records, ours=load_ours())
    before, heading, after = text.partition(f"\n## {OURS_HEADING}\n")
    assert heading and before == seed  # byte-identical seed table, our runs never averaged into it
    mine, referenced = line_of(after, "mine"), line_of(after, "mine-ref")
    assert mine["reference mIoU"] == "-" and mine["mean"] == "72.00" and mine["Δ"] == ""
    assert mine["verdict"] == "no reference" and mine["runs"] == "2"
    assert referenced["Δ"] == "+0.20" and referenced["verdict"] == "reproduced"
    # Without any record of our rows, benchmark.md is exactly the seed table.
    assert render("cityscapes", records=records[:1], ours=load_ours()) == seed


@pytest.mark.parametrize("change, named, accepted", [
    ({"arch": "DeepLabV4"}, "model.arch 'DeepLabV4'", "DeepLabV3Plus"),
    ({"encoder": "resnet19"}, "model.encoder 'resnet19'", "mobilenet_v2"),
    ({"encoder": "tu-mobilenetv9"}, "'mobilenetv9' is not a timm model", "timm.list_models()"),
    ({"kwargs": {"decoder_chanels": [64, 32, 16, 8, 4]}}, "model.kwargs.decoder_chanels", "decoder_channels"),
    ({"kwargs": {"classes": 3}}, "model.kwargs.classes", "encoder_depth"),
])
def test_bad_arch_encoder_or_keyword_is_refused_in_one_line(ours, change, named, accepted):
    body = our_row("Unet", "resnet18")
    body["model"].update(change)
    ours({"bad": body})
    with pytest.raises(BenchError) as err:
        build_model(load_spec("bad"))
    message = str(err.value)
    assert "\n" not in message and named in message and "accepted: " in message and accepted in message


def test_aux_weights_are_refused_for_smp_rows(ours):
    # smp's aux_params head classifies whole images: no pixel loss can supervise it.
    body = our_row("FPN", "resnet18")
    body["loss"] = {"aux_weights": [0.4]}
    ours({"aux": body})
    with pytest.raises(BenchError, match=r"loss\.aux_weights is \[0\.4\].*aux_weights: \[\] for family smp"):
        build_model(load_spec("aux"))


def test_kwargs_reach_the_architecture(ours):
    ours({"narrow": our_row("FPN", "resnet18", kwargs={"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 64}),
          "wide": our_row("FPN", "resnet18")})
    narrow, wide = build_model(load_spec("narrow")), build_model(load_spec("wide"))
    assert narrow.net.segmentation_head[0].in_channels == 64 and wide.net.segmentation_head[0].in_channels == 128
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())


@pytest.mark.parametrize("encoder, classifier", [
    ("resnet18", lambda: torchvision.models.resnet18()),
    ("tu-mobilenetv3_small_100", lambda: timm.create_model("mobilenetv3_small_100")),
])
def test_backbone_checkpoint_fills_the_encoder_through_the_shared_loader(ours, tmp_path, encoder, classifier, capsys):
    """A plain torchvision / timm classifier file (classifier head included) fills the smp encoder."""
    torch.manual_seed(1)
    state = classifier().state_dict()
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    ours({"weighted": our_row("Unet", encoder, backbone_checkpoint=str(path))})
    model = build_model(load_spec("weighted"))
    loaded = load_backbone_checkpoint(model, path, "weighted")
    encoder_state = model.backbone.state_dict()
    assert loaded == len(encoder_state)
    for name, tensor in encoder_state.items():
        source = name.removeprefix("model.")
        assert torch.equal(tensor, state[source]), name
    assert "checkpoint tensors unused" in capsys.readouterr().err  # the classifier head, reported


@pytest.mark.slow
def test_new_row_writes_a_file_that_loads_inherits_its_recipe_and_runs(ours, synthetic_root, one_thread):
    root = ours({})
    result = CliRunner().invoke(main, ["new-row", "unet-r18", "--arch", "unet", "--encoder", "resnet18",
                                       "--from", "pspnet-r50"])
    assert result.exit_code == 0, result.output
    body = yaml.safe_load((root / "unet-r18.yaml").read_text())
    assert body["inherit"] == "pspnet-r50" and set(body) == {"inherit", "columns", "model", "loss"}  # only what differs
    assert "reference" not in body
    spec, recipe = load_spec("unet-r18"), load_spec("pspnet-r50")
    assert spec.model.arch == "Unet" and spec.model.encoder == "resnet18" and spec.model.backbone_checkpoint is None
    assert (spec.train, spec.columns.epochs, spec.loss.name) == (recipe.train, recipe.columns.epochs, recipe.loss.name)
    assert spec.loss.aux_weights == [] and recipe.loss.aux_weights == [0.4]
    assert "unet-r18" in our_row_ids() and "unet-r18" not in row_ids()
    listed = CliRunner().invoke(main, ["list"]).output.splitlines()
    assert listed[-1].startswith("unet-r18 ") and listed.index(next(l for l in listed if l.startswith("unet-769-ema")))\
        < len(listed) - 1  # after the table's rows
    # The recipe's 128x128 synthetic crops: kept small here only by --iters.
    run = CliRunner().invoke(main, ["run", "--row", "unet-r18", "--synthetic", "--iters", "1"])
    assert run.exit_code == 0, run.output
    (record,) = load_records(dataset="synthetic")
    assert record.row == "unet-r18" and record.iterations == 1


def test_new_row_refuses_a_bad_encoder_without_leaving_a_file(ours):
    root = ours({})
    result = CliRunner().invoke(main, ["new-row", "oops", "--arch", "FPN", "--encoder", "resnet19"])
    assert result.exit_code == 2 and "model.encoder 'resnet19'" in result.output and "resnet18" in result.output
    assert not (root / "oops.yaml").exists()
    taken = CliRunner().invoke(main, ["new-row", "pspnet-r50", "--arch", "FPN", "--encoder", "resnet18"])
    assert taken.exit_code == 2 and "already exists" in taken.output


@pytest.mark.slow
def test_an_our_row_has_the_rest_of_the_pipeline(ours, synthetic_root, one_thread):
    """Beyond `bench run`: a seeded pair of runs, a bare resume refused once finished, `bench eval` of its checkpoint
    (row read from the checkpoint), `bench list --sizes`, `bench speed` and `bench check` all take our row."""
    ours({"ours-fpn": our_row("FPN", "resnet18")})
    runner = CliRunner()
    trained = runner.invoke(main, ["run", "--row", "ours-fpn", "--synthetic", "--iters", "2", "--seeds", "0,1"])
    assert trained.exit_code == 0, trained.output
    records = load_records(dataset="synthetic")
    assert sorted(r.seed for r in records) == [0, 1]
    again = runner.invoke(main, ["run", "--row", "ours-fpn", "--synthetic", "--resume"])
    assert again.exit_code == 2 and "already finished" in again.output
    evaluated = runner.invoke(main, ["eval", "--checkpoint", records[0].checkpoint, "--synthetic", "--panels", "0"])
    assert evaluated.exit_code == 0 and evaluated.output.startswith("ours-fpn "), evaluated.output
    sizes = runner.invoke(main, ["list", "--sizes"])
    assert sizes.exit_code == 0 and any(l.startswith("ours-fpn") for l in sizes.output.splitlines())
    speed = runner.invoke(main, ["speed", "--row", "ours-fpn", "--device", "cpu", "--mode", "infer", "--size", "64,64",
                                 "--repeats", "1", "--warmup", "0"])
    assert speed.exit_code == 0 and "ours-fpn" in speed.output, speed.output
    check = runner.invoke(main, ["check", "--rows", "ours-fpn"])
    assert check.exit_code == 0, check.output
