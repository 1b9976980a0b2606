"""PSPNet, BiSeNet V1, ICNet and UNet are the published networks: their sizes, shapes, training outputs,
and that each one learns."""

from __future__ import annotations

import pytest
import torch

from harness.models import build_model
from harness.models.common import count_parameters
from harness.models.sizes import measure
from harness.spec import load_spec
from tests.helpers import assert_segmentation_outputs, overfit_losses

# One row of each family, and its target parameter count with where the figure comes from
# (../shared/reference/architectures.md, "The families"). All counts are for 19 classes.
TARGETS = {
    # mmsegmentation PSPNet R50-D8 with its FCN auxiliary head: 48.98M.
    "pspnet-r50": 48_980_000,
    # BiSeNet V1 R18 (deep stem) as in lxtGH Fast_Seg: ~12.9M, plus ~0.3M of auxiliary heads.
    "bisenet-r18": 12_900_000 + 300_000,
    # ICNet R50: ~30.6M.
    "icnet-r50": 30_600_000,
    # The plain five-level UNet (64..1024, batch norm, transposed-conv decoder): ~31.04M.
    "unet-769": 31_040_000,
}
FAMILIES = sorted(TARGETS)
# BiSeNet's figure without the training-only heads, from the same line of architectures.md.
BISENET_INFERENCE_TARGET = 12_900_000


def close(count: int, target: int) -> bool:
    return abs(count - target) / target < 0.02


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {row: build_model(load_spec(row)) for row in FAMILIES}


@pytest.mark.parametrize("row", FAMILIES)
def test_parameter_count_matches_the_published_network(row, models):
    assert close(count_parameters(models[row]), TARGETS[row]), count_parameters(models[row])


def test_bisenet_auxiliary_heads_are_the_published_size(models):
    size = measure(models["bisenet-r18"], 64, 64)
    assert close(size.inference_params, BISENET_INFERENCE_TARGET), size
    assert 250_000 < size.params - size.inference_params < 350_000, size


def test_pspnet_is_not_smp_pspnet(models):
    """segmentation-models-pytorch's PSPNet pools stage 2 at stride 8: a far smaller network."""
    import segmentation_models_pytorch as smp

    theirs = count_parameters(smp.PSPNet("resnet50", encoder_weights=None, classes=19))
    assert not close(theirs, TARGETS["pspnet-r50"]) and close(count_parameters(models["pspnet-r50"]), TARGETS["pspnet-r50"])


@pytest.mark.parametrize("row", FAMILIES)
def test_any_input_size_eval_main_only_train_main_and_aux(row, models):
    model = models[row]
    aux_weights = load_spec(row).loss.aux_weights
    assert_segmentation_outputs(model, len(aux_weights))


@pytest.mark.parametrize("row", FAMILIES)
def test_auxiliary_heads_run_only_in_training(row, models):
    """An eval-mode forward never runs the modules holding the auxiliary heads."""
    model = models[row]
    aux_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith("aux"))
    assert (aux_params > 0) == bool(load_spec(row).loss.aux_weights)
    size = measure(model, 64, 64)
    assert size.inference_params == size.params - aux_params


@pytest.mark.slow
@pytest.mark.parametrize("row", FAMILIES)
def test_overfits_one_batch(row):
    """The recipe's optimizer and the row's loss (OHEM and auxiliary weights included) halve the loss."""
    losses = overfit_losses(row)
    assert losses[-1] < 0.5 * losses[0], losses
