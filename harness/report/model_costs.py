"""What a row's network costs, counted once and kept: FLOPs of a training step and of inference at a size, the
activations a training step keeps, the bytes of its state (harness.models.sizes counts them on the meta device, a
second or so each). `bench plan` and `bench doctor` ask for dozens of them; the counts are kept in the cache folder
($SEGBENCH_CACHE, ignored by git) under a key of the network, the size, the model code and the library versions
that build it, so a change to any of them counts again. Nothing here imports torch unless it must count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from harness.config.spec import Spec
from harness.files import atomic_write_text
from harness.paths import PROJECT_ROOT, cache_dir

log = logging.getLogger(__name__)

CACHE_FILE = "model-costs.json"
BUILDING_PACKAGES = ("torch", "timm", "segmentation-models-pytorch")


@dataclasses.dataclass(frozen=True)
class TrainingCost:
    flops: int  # per image
    saved_bytes: int  # fp32 activations kept for the backward, per image


def code_digest() -> str:
    """The model code (harness/models/*.py) and the versions of the libraries that build the networks."""
    digest = hashlib.sha1()
    for path in sorted((PROJECT_ROOT / "harness" / "models").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    for package in BUILDING_PACKAGES:
        try:
            digest.update(f"{package}={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{package}=none".encode())
    return digest.hexdigest()[:16]


class ModelCosts:
    """The counts of one process, read from and written back to the cache file."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path or cache_dir() / CACHE_FILE
        self._code: Optional[str] = None
        self._values: Optional[dict[str, Any]] = None

    def _load(self) -> dict[str, Any]:
        if self._values is None:
            try:
                loaded = json.loads(self.path.read_text())
                self._values = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._values = {}  # none yet, or unreadable: count again and rewrite it
        return self._values

    def _key(self, spec: Spec, what: str, size: tuple[int, ...]) -> str:
        if self._code is None:
            self._code = code_digest()
        return hashlib.sha1(f"{self._code}|{spec.network_key}|{what}|{size}".encode()).hexdigest()

    def _get(self, spec: Spec, what: str, size: tuple[int, ...], count: Any) -> Any:
        values = self._load()
        key = self._key(spec, what, size)
        if key not in values:
            values[key] = count()
            self._save(values)
        return values[key]

    def _save(self, values: dict[str, Any]) -> None:
        """Replace the file atomically; a cache that cannot be written only costs the next process the count."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(values))
        except OSError as exc:
            log.debug("model costs not cached at %s: %s", self.path, exc)

    def training(self, spec: Spec, width: int, height: int) -> TrainingCost:
        def count() -> list[int]:
            from harness.models.sizes import training_step

            step = training_step(spec, width, height)
            return [step.flops, step.saved_bytes]

        flops, saved = self._get(spec, "train", (width, height), count)
        return TrainingCost(int(flops), int(saved))

    def inference_flops(self, spec: Spec, width: int, height: int) -> int:
        def count() -> int:
            from harness.models.sizes import inference_flops

            return inference_flops(spec, width, height)

        return int(self._get(spec, "infer", (width, height), count))

    def state_sizes(self, spec: Spec) -> tuple[int, int]:
        """(bytes of the state dict, bytes of the parameters)."""
        def count() -> list[int]:
            from harness.models.sizes import meta_model, state_bytes

            return list(state_bytes(meta_model(spec)))

        state, params = self._get(spec, "state", (), count)
        return int(state), int(params)


_COSTS: dict[Path, ModelCosts] = {}


def model_costs() -> ModelCosts:
    """This process's counts for the cache folder in effect."""
    path = cache_dir() / CACHE_FILE
    if path not in _COSTS:
        _COSTS[path] = ModelCosts(path)
    return _COSTS[path]
