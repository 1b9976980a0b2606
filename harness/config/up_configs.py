"""United-Perception's config of each table row, and the value UP's config gives each field of our resolved plan.

The configs themselves are reference material (`configs/seg/` of UP at c477a744, under harness.paths.reference_dir);
a user's clone has none, so every reader copes with their absence. `tests/test_up_recipes.py` checks every row's
Cityscapes plan against these values field by field; the reproduction card shows them beside a run's plan.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import yaml

from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES, UP_GPUS
from harness.config.spec import Spec
from harness.paths import reference_dir

CONFIGS = Path("united-perception") / "configs" / "seg"

# Each table row's UP config; "-ema" rows use the "_ema" file. light-seg rows train their base row's recipe,
# and the MSeg row the recipe of df_seg_v1 (UP has no config of its own for it).
BASE_CONFIG = {
    "deeplabv3-r50": "deeplabv3/deeplabv3_r50", "deeplabv3-r101": "deeplabv3/deeplabv3_r101",
    "pspnet-r50": "pspnet/pspnet", "bisenet-r18": "BiSeNet/BiSeNet", "icnet-r50": "icnet/icnet",
    "unet-769": "unet/unet", "unet-1024": "unet/unet",
    "df_seg_v1": "DF_seg/DF_seg_v1", "df_seg_v2": "DF_seg/DF_seg_v2",
    "sf_seg_v1": "SF_seg/SF_seg_v1", "sf_seg_v2": "SF_seg/SF_seg_v2",
}
# Where the table's columns differ from UP's config, the table wins (each spec says why in a comment):
# ICNet's config trains 240 epochs, the table 120; UNet (1024) is the 769 config with the row's own crop and
# the table's 240 epochs.
TABLE_WINS: dict[str, dict[str, int]] = {"icnet-r50": {"epochs": 120}, "unet-1024": {"epochs": 240, "crop": 1024}}
# Auxiliary weights of UP's loss classes (up/tasks/seg/models/losses/seg_loss.py): seg_ohem has one aux output
# at `aux_weight` when it is above 0; seg_bisegnet sums main + 2 aux at 1.0; seg_icnet main + 3 at 0.4.
LOSS_AUX = {"seg_bisegnet": [1.0, 1.0], "seg_icnet": [0.4, 0.4, 0.4]}
# UP's loader fills no UNet tensor from the ResNet-50 file its unet config names (harness/models/unet.py).
NO_STARTING_FILE = {"unet"}
EMA_RAMP = 2000  # the ramp constant of UP's ExpEMA, in its code (up/utils/model/ema_helper.py), not in a config


def up_base_row(row: str) -> str:
    """The row whose UP config a row trains: its name without the -ema, -lightseg and -mseg suffixes."""
    return row.removesuffix("-ema").removesuffix("-lightseg").removesuffix("-mseg")


def config_name(spec: Spec) -> Optional[str]:
    """configs/seg/<name>.yaml of the row (None for a row UP has no config for: one of our rows)."""
    base = BASE_CONFIG.get(up_base_row(spec.row))
    return None if base is None else base + ("_ema" if spec.columns.ema else "")


def config_path(spec: Spec, root: Optional[Path] = None) -> Optional[Path]:
    name = config_name(spec)
    return None if name is None else (root or reference_dir()) / CONFIGS / f"{name}.yaml"


def read_config(spec: Spec, root: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """UP's config of the row, or None where the reference material is not beside this checkout."""
    path = config_path(spec, root)
    if path is None or not path.is_file():
        return None
    return yaml.safe_load(path.read_text())


def transform(config: dict[str, Any], split: str, kind: str) -> Optional[dict[str, Any]]:
    """The kwargs of the `kind` step of UP's `split` transformer (None when the config has no such step)."""
    for step in config["dataset"][split]["dataset"]["kwargs"]["transformer"]:
        if step["type"] == kind:
            return step.get("kwargs", {})
    return None


def up_values(spec: Spec, config: dict[str, Any], train_images: int = OFFICIAL_SPLIT_IMAGES["train"]
              ) -> dict[str, Any]:
    """What UP's `config` gives each field of our TrainPlan (and the starting-weights file) on `train_images`
    images, as UP's code reads it: the config's own figures (where the table's columns win, TABLE_WINS, our plan
    differs from them on purpose)."""
    trainer, optimizer = config["trainer"], config["trainer"]["optimizer"]["kwargs"]
    schedule = config["trainer"]["lr_scheduler"]
    per_gpu = config["dataset"]["train"]["batch_sampler"]["kwargs"]["batch_size"]
    epochs = trainer["max_epoch"]
    per_epoch = math.ceil(math.ceil(train_images / UP_GPUS) / per_gpu)  # UP's padded DistributedSampler
    crop = transform(config, "train", "seg_crop") or {}
    height, width = crop.get("size", [None, None])
    normalize = transform(config, "train", "normalize") or {}
    loss = config["net"][-1]["kwargs"]["loss"]
    aux = LOSS_AUX.get(loss["type"])
    if aux is None:
        weight = loss["kwargs"].get("aux_weight", 0)
        aux = [weight] if weight > 0 else []
    ema = config.get("ema") or {}
    pretrain = Path(config["saver"]["pretrain_model"]).name if config.get("saver", {}).get("pretrain_model") else None
    starting = None if spec.model.family in NO_STARTING_FILE or not pretrain else f"weights/{pretrain}"
    return {
        "iters": epochs * per_epoch, "iters_per_epoch": per_epoch, "batch_size": UP_GPUS * per_gpu,
        "crop_size": [width, height], "test_size": (transform(config, "test", "seg_resize") or {}).get("size"),
        "scale_range": (transform(config, "train", "seg_rand_resize") or {}).get("scale"),
        "flip": transform(config, "train", "seg_random_flip") is not None,
        "pad_value": 0,  # cv2.copyMakeBorder value=(0, 0, 0) in UP's seg_crop
        "mean": normalize.get("mean"), "std": normalize.get("std"),
        "lr": optimizer["lr"] * UP_GPUS * per_gpu, "momentum": optimizer["momentum"],
        "weight_decay": optimizer["weight_decay"], "warmup_iters": schedule["warmup_iter"],
        "warmup_ratio": schedule["warmup_ratio"], "poly_power": schedule["kwargs"]["power"],
        "min_lr": schedule["kwargs"].get("min_lr", 0.0),
        "ema": bool(ema.get("enable")), "ema_decay": ema.get("kwargs", {}).get("decay") if ema.get("enable") else None,
        "ema_ramp": EMA_RAMP if ema.get("enable") else None,
        # seg_ohem, seg_bisegnet and seg_icnet all select pixels by OHEM (thresh, min_kept) on every output.
        "loss": "ohem" if "thresh" in loss["kwargs"] else loss["type"],
        "ohem_thresh": loss["kwargs"].get("thresh"), "ohem_min_kept": loss["kwargs"].get("min_kept"),
        "aux_weights": aux, "loss_group_images": per_gpu,
        "eval_every": trainer["test_freq"] * per_epoch,
        "starting_weights": starting,
    }
