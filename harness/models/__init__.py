"""Model families, one module each; importing a module registers its builder."""

from harness.models import bisenet, deeplabv3, icnet, pspnet, unet  # noqa: F401  (registers)
from harness.models import df_seg, sf_seg  # noqa: F401  (registers)
from harness.models import smp_family  # noqa: F401  (registers family `smp`, for rows beside the table)
from harness.models.registry import build_model, check_implemented, implemented_families

__all__ = ["build_model", "check_implemented", "implemented_families"]
