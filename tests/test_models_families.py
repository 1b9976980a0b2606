"""The contract every family keeps, on one row of each (sizes and structure against United-Perception are
pinned per family in tests/test_models_up_*.py and tests/test_models_dfnet.py): eval returns the main logits
at any input size, training adds exactly the auxiliary outputs the row's loss weighs, auxiliary heads never run
in eval, and each network learns with its row's own loss."""

from __future__ import annotations

import pytest
import torch

from harness.config.spec import load_all, load_spec
from harness.models import build_model, implemented_families
from harness.models.registry import TABLE_FAMILIES
from harness.models.sizes import measure
from tests.helpers import assert_segmentation_outputs, overfit_losses

ROWS = {family: next(s.row for s in load_all() if s.model.family == family) for family in TABLE_FAMILIES}


def test_every_table_family_is_built():
    assert set(implemented_families()) >= set(TABLE_FAMILIES)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {row: build_model(load_spec(row)) for row in ROWS.values()}


@pytest.mark.parametrize("row", sorted(ROWS.values()))
def test_any_input_size_eval_main_only_train_main_and_aux(row, models, one_thread):
    assert_segmentation_outputs(models[row], len(load_spec(row).loss.aux_weights))


@pytest.mark.parametrize("row", sorted(ROWS.values()))
def test_auxiliary_heads_run_only_in_training(row, models, one_thread):
    """An eval-mode forward never runs the modules holding the auxiliary heads."""
    model = models[row]
    aux_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith("aux"))
    if load_spec(row).loss.aux_weights and row.startswith(("deeplabv3", "pspnet", "bisenet")):
        assert aux_params > 0  # heads of their own; ICNet's guidance outputs share most of the network
    size = measure(model, 64, 64)
    assert size.inference_params == size.params - aux_params


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(ROWS.values()))
def test_overfits_one_batch(row, one_thread):
    """The row's loss (OHEM and auxiliary weights included) falls by a third on one fixed batch."""
    losses = overfit_losses(row, steps=30, lr=0.05)
    assert losses[-1] < 0.67 * losses[0], losses
