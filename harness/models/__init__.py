"""Model families, one module each; importing a module registers its builder."""

from harness.models import (  # noqa: F401  (registers)  # noqa: F401  (registers)
    bisenet,
    deeplabv3,
    df_seg,
    icnet,
    pspnet,
    sf_seg,
    smp_family,  # noqa: F401  (registers family `smp`, for rows beside the table)
    unet,
)
from harness.models.registry import build_model, check_implemented, implemented_families

__all__ = ["build_model", "check_implemented", "implemented_families"]
