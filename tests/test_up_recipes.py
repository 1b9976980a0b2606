"""Every row trains United-Perception's recipe: the resolved plan of each of the 34 rows is checked field by
field against UP's own config files (../shared/reference/united-perception/configs/seg/, parsed here), and
the learning-rate and EMA-decay curves against UP's formulas (up/utils/model/lr_helper.py, ema_helper.py)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from harness.config.benchmark import UP_GPUS
from harness.config.plan import TrainPlan, make_plan
from harness.config.spec import Spec, load_all, load_spec
from harness.config.up_configs import (
    BASE_CONFIG,
    LOSS_AUX,
    NO_STARTING_FILE,
    TABLE_WINS,
    config_name,
    read_config,
    transform,
    up_base_row,
    up_values,
)
from harness.data.labels import IGNORE_INDEX
from harness.engine.distributed import World
from harness.engine.ema import ExpEMA
from harness.engine.train import learning_rate
from tests.conftest import REFERENCE, reference_file

CONFIGS = REFERENCE / "united-perception" / "configs" / "seg"
CITYSCAPES_TRAIN_IMAGES = 2975

def base_row(spec: Spec) -> str:
    return up_base_row(spec.row)


def up_config(spec: Spec) -> dict:
    return yaml.safe_load(reference_file(CONFIGS / f"{config_name(spec)}.yaml").read_text())


def cityscapes_plan(spec: Spec) -> TrainPlan:
    from harness.cores import loader_workers

    return make_plan(spec, "cityscapes", CITYSCAPES_TRAIN_IMAGES, machine_workers=loader_workers(1))


SPECS = {spec.row: spec for spec in load_all()}


def test_every_table_row_has_a_config():
    reference_file(CONFIGS)
    assert {base_row(spec) for spec in SPECS.values()} == set(BASE_CONFIG)


@pytest.mark.parametrize("row", list(SPECS))
def test_row_recipe_is_ups_config_field_by_field(row):
    spec = SPECS[row]
    config = up_config(spec)
    plan = cityscapes_plan(spec)
    trainer, optimizer, schedule = config["trainer"], config["trainer"]["optimizer"], config["trainer"]["lr_scheduler"]
    wins = TABLE_WINS.get(base_row(spec), {})

    # Batch: UP's per-GPU batch on 8 GPUs (SyncBN group_size 8); the lr is per image, times the global batch.
    per_gpu = config["dataset"]["train"]["batch_sampler"]["kwargs"]["batch_size"]
    decoder = config["net"][-1]["kwargs"]
    assert decoder["normalize"]["kwargs"]["group_size"] == UP_GPUS
    assert plan.batch_size == spec.columns.batch_size == UP_GPUS * per_gpu
    assert plan.loss_group_images == per_gpu
    assert optimizer["type"] == "SGD"
    assert spec.train.lr_per_image == optimizer["kwargs"]["lr"]
    assert plan.lr == pytest.approx(optimizer["kwargs"]["lr"] * UP_GPUS * per_gpu)
    assert plan.momentum == optimizer["kwargs"]["momentum"] and plan.weight_decay == optimizer["kwargs"]["weight_decay"]

    # Schedule: warm-up and poly, per iteration, epochs of ceil(images / global batch) iterations.
    assert (plan.warmup_iters, spec.train.warmup_type, plan.warmup_ratio) == (
        schedule["warmup_iter"], schedule["warmup_type"], schedule["warmup_ratio"])
    assert schedule["type"] == "polylr"
    assert plan.poly_power == schedule["kwargs"]["power"] and plan.min_lr == schedule["kwargs"].get("min_lr", 0.0)
    epochs = wins.get("epochs", trainer["max_epoch"])
    assert spec.columns.epochs == epochs
    per_epoch = math.ceil(math.ceil(CITYSCAPES_TRAIN_IMAGES / UP_GPUS) / per_gpu)  # UP's padded DistributedSampler
    assert plan.iters_per_epoch == per_epoch and plan.iters == epochs * per_epoch
    assert plan.eval_every == trainer["test_freq"] * per_epoch
    assert {"type": "auto_save_best"} in config["hooks"]  # the best checkpoint is kept, as the record does

    # Data: scale, flip, crop with padding, normalisation, test size.
    assert plan.scale_range == transform(config, "train", "seg_rand_resize")["scale"]
    assert plan.flip == (transform(config, "train", "seg_random_flip") is not None)
    crop = transform(config, "train", "seg_crop")
    assert crop["crop_type"] == "rand"
    height, width = crop["size"]
    if "crop" in wins:
        height = width = wins["crop"]
    assert plan.crop_size == [width, height]
    assert plan.pad_value == 0  # cv2.copyMakeBorder value=(0, 0, 0) in UP's seg_crop; labels pad with ignore
    assert config["dataset"]["train"]["dataset"]["kwargs"]["ignore_label"] == IGNORE_INDEX
    normalize = transform(config, "train", "normalize")
    assert (plan.mean, plan.std) == (normalize["mean"], normalize["std"])
    assert plan.test_size == transform(config, "test", "seg_resize")["size"]
    assert spec.columns.crop_test is None

    # Loss: OHEM on every supervised output, with UP's thresholds and auxiliary weights.
    loss = decoder["loss"]
    assert plan.loss == "ohem"
    assert (plan.ohem_thresh, plan.ohem_min_kept) == (loss["kwargs"]["thresh"], loss["kwargs"]["min_kept"])
    expected_aux = LOSS_AUX.get(loss["type"])
    if expected_aux is None:
        aux = loss["kwargs"].get("aux_weight", 0)
        expected_aux = [aux] if aux > 0 else []
    assert plan.aux_weights == expected_aux

    # EMA: UP's exponential EMA with its decay; the ramp constant 2000 is in UP's ExpEMA code.
    ema = config.get("ema")
    assert plan.ema == bool(ema and ema["enable"])
    if plan.ema:
        assert ema["ema_type"] == "exp"
        assert (plan.ema_decay, plan.ema_ramp) == (ema["kwargs"]["decay"], 2000)

    # Starting weights: the file UP's config names, under weights/ (MSeg: its own whole-model file).
    pretrain = Path(config["saver"]["pretrain_model"]).name
    if spec.model.family in NO_STARTING_FILE:
        assert spec.model.backbone_checkpoint is None and spec.model.init_checkpoint is None
    elif row.endswith("-mseg"):
        assert spec.model.init_checkpoint and spec.model.backbone_checkpoint is None
    else:
        assert spec.model.backbone_checkpoint == f"weights/{pretrain}"


def test_up_values_are_the_plan_of_every_row_but_where_the_table_wins():
    """The values the reproduction card shows beside a run's plan (harness.config.up_configs.up_values) are the
    Cityscapes plan of each row, field by field, except the table's own columns (TABLE_WINS)."""
    reference_file(CONFIGS)
    for row, spec in SPECS.items():
        plan, theirs = asdict(cityscapes_plan(spec)), up_values(spec, read_config(spec, REFERENCE))
        differing = {k for k, v in theirs.items() if k in plan and plan[k] != v and not (
            isinstance(v, float) and plan[k] == pytest.approx(v))}
        expected = {"iters"} if "epochs" in TABLE_WINS.get(base_row(spec), {}) else set()
        if "crop" in TABLE_WINS.get(base_row(spec), {}):
            expected.add("crop_size")
        if not spec.columns.ema:
            differing -= {"ema_decay", "ema_ramp"}  # UP's value is None; the plan keeps the unused default
        assert differing == expected, row
        starting = spec.model.backbone_checkpoint if not row.endswith("-mseg") else theirs["starting_weights"]
        assert theirs["starting_weights"] == starting, row


def up_learning_rate(iteration: int, target: float, warmup: int, ratio: float, iters: int, power: float) -> float:
    """UP's ChainIterLR written out: LinearWarmUpLR below `warmup`, PolyLR on the global iteration after."""
    if iteration < warmup:
        start = ratio * target
        return start + (target - start) / max(1, warmup - 1) * iteration
    return target * (1 - iteration / iters) ** power


@pytest.mark.parametrize("row", ["sf_seg_v2-ema", "deeplabv3-r101", "pspnet-r50", "bisenet-r18"])
def test_learning_rate_curve_is_ups(row):
    plan = cityscapes_plan(load_spec(row))
    for iteration in (0, 1, 250, plan.warmup_iters - 1, plan.warmup_iters, plan.iters // 2, plan.iters - 1):
        expected = up_learning_rate(iteration, plan.lr, 500, 0.25, plan.iters, 0.9)
        assert learning_rate(iteration, plan) == pytest.approx(expected, rel=1e-12), iteration
    assert learning_rate(0, plan) == pytest.approx(0.25 * plan.lr)
    assert learning_rate(499, plan) == pytest.approx(plan.lr)


def test_scheduler_in_the_training_loop_follows_the_curve():
    """The Trainer's LambdaLR gives iteration t (0-based) the lr of learning_rate(t)."""
    from harness.engine.train import Trainer

    plan = cityscapes_plan(load_spec("df_seg_v1"))
    plan.iters, plan.warmup_iters = 40, 10
    model = torch.nn.Conv2d(3, 19, 1)
    trainer = Trainer(plan, model, torch.device("cpu"), World(), progress=False)
    seen = []
    for _ in range(plan.iters):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert seen == pytest.approx([learning_rate(t, plan) for t in range(plan.iters)], rel=1e-12)


def test_ema_decay_and_update_are_ups():
    """decay(step) = 0.9998 (1 - exp(-step / 2000)); every floating-point tensor, BN statistics included."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ema = ExpEMA(model, decay=0.9998, ramp=2000)
    for step in (0, 1, 1000, 2000, 22313):
        assert ema.get_decay(step) == pytest.approx(0.9998 * (1 - math.exp(-step / 2000)), rel=1e-12)
    # After 22k steps, a constant 0.9999 keeps exp(22313 ln 0.9999) ~ 10.7 % of the initial weights; UP's
    # ramped 0.9998 keeps almost nothing of them.
    kept = math.prod(ema.get_decay(step) for step in range(22313))
    assert kept < 1e-10 and 0.9999 ** 22313 > 0.1

    ema.update(model, step=0)  # decay 0: the EMA becomes the model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model, step=1000)
    decay = 0.9998 * (1 - math.exp(-0.5))
    for key, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            assert torch.allclose(ema.module.state_dict()[key], decay * before[key] + (1 - decay) * value), key


def test_loader_workers_come_from_the_machine_unless_the_spec_sets_them(monkeypatch):
    """The table's specs leave train.workers to the machine: its cores shared by the node's training processes,
    one kept for each training loop; a spec's own number wins; the count is no part of the recipe at resume."""
    import os

    from harness.cores import loader_workers
    from harness.launch.run import refuse_changed_recipe

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for given in ("SEGBENCH_CORES", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(given, raising=False)
    assert (loader_workers(1), loader_workers(8), loader_workers(16)) == (15, 1, 1)
    spec = load_spec("sf_seg_v2")
    assert spec.train.workers is None and cityscapes_plan(spec).workers == 15
    spec.train.workers = 3
    plan = cityscapes_plan(spec)
    assert plan.workers == 3
    saved = {"spec": load_spec("sf_seg_v2").to_dict(), "plan": {**asdict(cityscapes_plan(load_spec("sf_seg_v2"))), "workers": 7}}
    refuse_changed_recipe(saved, load_spec("sf_seg_v2"), cityscapes_plan(load_spec("sf_seg_v2")), Path("ckpt"))
