"""The GPUs people train on, as their vendor's datasheets give them: dense peak TFLOP/s per precision, memory and
memory bandwidth, and the names `torch.cuda.get_device_name()` reports for them. `bench plan`, `bench doctor` and
`bench sweep` price and check a row on one of them by name (`--device h100`, `--device "NVIDIA A100-SXM4-80GB"`, or
the folder name `bench speed` files its records under, e.g. nvidia-h100-80gb-hbm3).

Figures are the datasheets' dense ones: where a sheet prints only the 2:4-sparsity figure (marked "*" there), half of
it. bf16/fp16 are the tensor-core figures with FP32 accumulation (what autocast training uses; GeForce cards run
that at half their FP16-accumulate rate). Memory is the vendor's "GB", binary in fact: torch reports 1-2% less
(what the driver reserves), which the memory check's headroom covers.

Each entry names its source; the figures marked "checked" were compared with a copy of that source (or a listing
quoting it) while this table was written; the others are transcribed from the named source and not re-checked.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Optional

from harness.errors import BenchError


def folder_name(name: str) -> str:
    """A device's name as segbench files records under it: lower case, runs of other characters as one dash (e.g.
    'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3')."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class GpuModel:
    key: str  # the short name, e.g. h100
    name: str  # the product, as the datasheet names it
    bf16: Optional[float]  # dense TFLOP/s, tensor cores, FP32 accumulate; None: no bf16 tensor cores
    fp16: float
    tf32: Optional[float]  # None: no TF32 tensor cores (fp32 matmuls run at the fp32 rate)
    fp32: float  # non-tensor
    memory_gib: float
    bandwidth_gbs: float  # GB/s
    source: str
    torch_names: tuple[str, ...]  # torch.cuda.get_device_name() of this product
    aliases: tuple[str, ...] = field(default=())
    checked: str = ""  # which figures were compared with a copy of the source, and where

    def names(self) -> set[str]:
        """Every name that finds this entry, in folder form."""
        found = {self.key, *self.aliases}
        for torch_name in self.torch_names:
            folded = folder_name(torch_name)
            found |= {folded, re.sub(r"^(nvidia-)?(tesla-|geforce-)?", "", folded)}
        return found

    def peak(self, precision: str) -> tuple[float, str]:
        """(dense TFLOP/s, what it is) of a run in `precision` (fp32 matmuls use TF32 tensor cores where the GPU
        has them, as PyTorch's cuDNN convolutions do by default)."""
        if precision == "bf16" and self.bf16 is not None:
            return self.bf16, "bf16"
        if precision in ("bf16", "fp16"):
            return self.fp16, "fp16" + (" (no bf16 tensor cores: train it with --precision fp16)"
                                        if precision == "bf16" else "")
        if self.tf32 is not None:
            return self.tf32, "tf32"
        return self.fp32, "fp32"

    def describe(self, precision: str) -> str:
        tflops, what = self.peak(precision)
        return (f"{self.name}: {tflops:,.1f} TFLOP/s dense {what}, {self.memory_gib:g} GB at "
                f"{self.bandwidth_gbs:,.0f} GB/s (source: {self.source})")


A100_SHEET = "NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4)"
A100_CHECKED = "TF32/BF16/FP32 and bandwidth against a copy of the datasheet (glennklockwood.com, upb-pc2 wiki)"
H100_SHEET = "NVIDIA H100 Tensor Core GPU datasheet (dense: half the sparsity figures) and Hopper whitepaper"
V100_SHEET = "NVIDIA Tesla V100 GPU datasheet (volta-v100-datasheet-update-us-1165301-r5)"
GA102_SHEET = "NVIDIA Ampere GA102 GPU Architecture whitepaper v2.0"

CATALOGUE: tuple[GpuModel, ...] = (
    GpuModel("v100-16gb", "Tesla V100 SXM2 16GB", None, 125.0, None, 15.7, 16, 900, V100_SHEET,
             ("Tesla V100-SXM2-16GB",), checked="FP16 tensor 125 and FP32 15.7 (grokipedia's V100 page)"),
    GpuModel("v100-32gb", "Tesla V100 SXM2 32GB", None, 125.0, None, 15.7, 32, 900, V100_SHEET,
             ("Tesla V100-SXM2-32GB", "Tesla V100-SXM3-32GB"), ("v100",),
             checked="FP16 tensor 125 and FP32 15.7 (grokipedia's V100 page)"),
    GpuModel("v100-pcie-16gb", "Tesla V100 PCIe 16GB", None, 112.0, None, 14.0, 16, 900, V100_SHEET,
             ("Tesla V100-PCIE-16GB",)),
    GpuModel("v100-pcie-32gb", "Tesla V100 PCIe 32GB", None, 112.0, None, 14.0, 32, 900, V100_SHEET,
             ("Tesla V100-PCIE-32GB",)),
    GpuModel("a100-40gb", "A100 40GB (SXM4 or PCIe)", 312.0, 312.0, 156.0, 19.5, 40, 1555, A100_SHEET,
             ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"), ("a100-sxm4-40gb", "a100-pcie-40gb"),
             checked=A100_CHECKED),
    GpuModel("a100-80gb", "A100 80GB SXM4", 312.0, 312.0, 156.0, 19.5, 80, 2039, A100_SHEET,
             ("NVIDIA A100-SXM4-80GB",), ("a100-sxm4-80gb", "a100-sxm-80gb"), checked=A100_CHECKED),
    GpuModel("a100-80gb-pcie", "A100 80GB PCIe", 312.0, 312.0, 156.0, 19.5, 80, 1935, A100_SHEET,
             ("NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-80GB"), ("a100-pcie-80gb",)),
    GpuModel("a10", "A10", 125.0, 125.0, 62.5, 31.2, 24, 600, "NVIDIA A10 Tensor Core GPU datasheet",
             ("NVIDIA A10",), checked="FP32 31.2 and 600 GB/s (sysrqmts listing)"),
    GpuModel("l4", "L4", 121.0, 121.0, 60.0, 30.3, 24, 300, "NVIDIA L4 Tensor Core GPU datasheet (dense: half the "
             "sparsity figures)", ("NVIDIA L4",),
             checked="TF32 120* (sparse), FP32 30.3, 300 GB/s (sourcecode.com and fpsbench listings)"),
    GpuModel("l40s", "L40S", 362.05, 362.05, 183.0, 91.6, 48, 864, "NVIDIA L40S datasheet",
             ("NVIDIA L40S",), checked="all figures (the datasheet's table as mullet.se quotes it)"),
    GpuModel("rtx-a6000", "RTX A6000", 154.8, 154.8, 77.4, 38.7, 48, 768,
             GA102_SHEET + ", appendix C (RTX A6000)", ("NVIDIA RTX A6000",), ("a6000",)),
    GpuModel("rtx-3090", "GeForce RTX 3090", 71.0, 71.0, 35.6, 35.6, 24, 936,
             GA102_SHEET + ", appendix A (GeForce RTX 3090)", ("NVIDIA GeForce RTX 3090",), ("3090",)),
    GpuModel("rtx-4090", "GeForce RTX 4090", 165.2, 165.2, 82.6, 82.6, 24, 1008,
             "NVIDIA Ada Lovelace GPU Architecture whitepaper v1.0, appendix A (GeForce RTX 4090)",
             ("NVIDIA GeForce RTX 4090",), ("4090",),
             checked="all figures (waredb listing: 165.15 FP16/BF16, 82.58 TF32/FP32, 1008 GB/s)"),
    GpuModel("h100", "H100 SXM5 80GB", 989.4, 989.4, 494.7, 66.9, 80, 3350, H100_SHEET,
             ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"), ("h100-sxm", "h100-sxm5"),
             checked="all figures (the datasheet as hpctech.co.jp quotes it; glennklockwood.com's dense table)"),
    GpuModel("h100-pcie", "H100 PCIe 80GB", 756.5, 756.5, 378.0, 51.0, 80, 2000, H100_SHEET,
             ("NVIDIA H100 PCIe",), checked="all figures (the datasheet as hpctech.co.jp quotes it)"),
    GpuModel("h100-nvl", "H100 NVL 94GB", 835.5, 835.5, 417.5, 60.0, 94, 3900, H100_SHEET, ("NVIDIA H100 NVL",)),
    GpuModel("h200", "H200 SXM 141GB", 989.4, 989.4, 494.7, 66.9, 141, 4800,
             "NVIDIA H200 Tensor Core GPU datasheet (dense: half the sparsity figures)", ("NVIDIA H200",),
             ("h200-sxm",), checked="memory and bandwidth; compute as H100 SXM (aiwiki, ai-hpc roadmap pages)"),
    GpuModel("h200-nvl", "H200 NVL 141GB", 835.5, 835.5, 417.5, 60.0, 141, 4800,
             "NVIDIA H200 Tensor Core GPU datasheet (dense: half the sparsity figures)", ("NVIDIA H200 NVL",)),
    GpuModel("b200", "B200 (HGX B200, per GPU)", 2250.0, 2250.0, 1100.0, 75.0, 180, 8000,
             "NVIDIA HGX B200 datasheet, per GPU (dense: half the sparsity figures)", ("NVIDIA B200",),
             checked="BF16 2.25 PF, TF32 1.1 PF, 8 TB/s, 180 GB (glennklockwood.com, vultr docs: 179 GB visible); "
                     "FP32 75 is hmc-tech's, glennklockwood.com gives 80"),
)

CPU = "cpu"


def is_cpu(name: str) -> bool:
    """A CPU device name: `cpu`, or a CPU as `bench speed` files it (cpu-MODEL)."""
    return name == CPU or name.startswith(CPU + "-")


def _index() -> dict[str, GpuModel]:
    index: dict[str, GpuModel] = {}
    for model in CATALOGUE:
        for name in model.names():
            index.setdefault(name, model)
    return index


_INDEX = _index()


def find_gpu(name: str) -> Optional[GpuModel]:
    """The catalogue's entry of a short name, a product name or a torch device name; None when it has none."""
    return _INDEX.get(folder_name(name))


def gpu_model(name: str, also: tuple[str, ...] = ()) -> GpuModel:
    """The catalogue's entry of `name`, or a one-line error with the nearest names (`also`: other accepted names,
    e.g. devices with speed records, offered alongside)."""
    found = find_gpu(name)
    if found is not None:
        return found
    raise BenchError(unknown_device(name, also))


def unknown_device(name: str, also: tuple[str, ...] = ()) -> str:
    shown = (*[m.key for m in CATALOGUE], *also)
    asked = folder_name(name)
    candidates = [*_INDEX, *also]
    close = [c for c in candidates if asked and c.startswith(asked)] + \
        difflib.get_close_matches(asked, candidates, n=3, cutoff=0.5)
    near = list(dict.fromkeys(_INDEX[c].key if c in _INDEX else c for c in close))[:4]
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    return (f"--device {name}: not a GPU of the catalogue (harness/config/devices.py) nor a device with speed "
            f"records; {hint}known: {', '.join(shown)}, or cpu for this machine's CPU")
