"""Test helpers: a private copy of experiments/ with extra rows, and running `bench` as a user would."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from harness.paths import PROJECT_ROOT

# A row two CPU processes train exactly as one does (up to float summation order): UNet (no dropout) with frozen
# batch norm (per-process batch statistics legitimately differ without SyncBN, which needs GPUs) and plain
# cross-entropy (OHEM's hard threshold can flip a pixel on a float-rounding difference). Its crops are larger than
# the scaled images: padded with ignored pixels, a different number per sample, so per-process means would differ
# from the global one.
PAIR = {"inherit": "unet-769", "reference": {"miou": [1.0]}, "train": {"freeze_bn": True}, "loss": {"name": "ce"},
        "synthetic": {"iters": 3, "batch_size": 4, "crop_size": [160, 160], "scale_range": [0.5, 1.0],
                      "test_size": [128, 64], "log_every": 1}}


def experiments_with(tmp_path: Path, rows: dict[str, dict]) -> Path:
    """Copy experiments/ under tmp_path and add `rows` (row id -> spec mapping) to it and its table."""
    root = tmp_path / "experiments"
    if not root.exists():
        shutil.copytree(PROJECT_ROOT / "experiments", root)
    table = yaml.safe_load((root / "_table.yaml").read_text())
    for row, body in rows.items():
        (root / f"{row}.yaml").write_text(yaml.safe_dump(body))
        if row not in table["rows"]:
            table["rows"].append(row)
    (root / "_table.yaml").write_text(yaml.safe_dump(table))
    return root


def bench(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """Start `bench ARGS` in a subprocess with the test's environment (outputs under tmp)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=full_env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


STOP_HOOK = Path(__file__).parent / "stop_hook"  # its sitecustomize.py carries out `stop_at`'s order
STOP_ORDER_ENV = runpy.run_path(str(STOP_HOOK / "sitecustomize.py"))["ORDER_ENV"]


def stop_at(iteration: int, then: str, ready: Path, signals: int = 1, rank: int = 0,
            **run: str | int) -> dict[str, str]:
    """The environment under which a `bench` command's training process of rank `rank` stops right after
    `iteration`, however deep it runs (torchrun's workers, a sweep's jobs; `run`: row= and seed= where a sweep trains
    several): `then` "SIGKILL" kills it there; "wait" holds it there until its signal handler has run `signals` times
    (the test sends them once `ready` exists: see `held`). A kill or signal then lands at a known iteration, never
    after a run that finished first."""
    order = {"iteration": iteration, "then": then, "signals": signals, "rank": rank, "ready": str(ready), **run}
    path = os.pathsep.join([str(STOP_HOOK), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, STOP_ORDER_ENV: json.dumps(order)}


def held(ready: Path, process: subprocess.Popen | None = None, timeout: float = 300.0) -> dict:
    """Wait until `stop_at`'s iteration is reached (its `ready` file written); returns {"pid", "iteration"} of the
    process held there. `process`: the command, which must not end before."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert process is None or process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no training process reached the iteration of {ready} in {timeout:g} s"
        time.sleep(0.05)
    return json.loads(ready.read_text())


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 48x64 images of 16-pixel blocks, each block one of five classes painted in that class's colour."""
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (2, 3, 4), generator=g).repeat_interleave(16, 1).repeat_interleave(16, 2)
    colours = torch.randn(19, 3, generator=g)
    image = colours[label].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 48, 64, generator=g)
    label[:, :8, :8] = 255  # an ignored corner, as Cityscapes has
    return image, label


def overfit_losses(row: str, steps: int = 20, lr: float = 0.01) -> list[float]:
    """The row's model trained on `fixed_batch` with its own loss (OHEM and auxiliary weights included)."""
    from harness.config.spec import load_spec
    from harness.engine.losses import SegmentationLoss
    from harness.models import build_model

    torch.manual_seed(0)
    spec = load_spec(row)
    model = build_model(spec).train()
    criterion = SegmentationLoss(spec.loss, min_kept=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    image, label = fixed_batch()
    losses = []
    for _ in range(steps):
        loss = criterion(model(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_segmentation_outputs(model: torch.nn.Module, num_aux: int) -> None:
    """Eval: main logits only, at the input size (97x193 divides by neither 16 nor 32). Train: main + `num_aux`."""
    x = torch.randn(2, 3, 97, 193)
    model.eval()
    with torch.no_grad():
        out = model(x[:1])
    assert isinstance(out, torch.Tensor) and out.shape == (1, 19, 97, 193)
    # Train mode needs two images: batch norm after global pooling sees one value per channel otherwise.
    model.train()
    outputs = model(x)
    assert isinstance(outputs, tuple) and len(outputs) == 1 + num_aux
    assert outputs[0].shape == (2, 19, 97, 193)
    assert all(aux.dim() == 4 and aux.shape[:2] == (2, 19) for aux in outputs[1:])
    model.eval()


def traced_forward(model: torch.nn.Module, x: torch.Tensor, taps: dict[str, torch.nn.Module]) -> tuple[dict, object]:
    """A training-mode forward of `x` recording the output shape (per-image, batch dimension kept) of each tapped
    module; a module returning a list records the list of shapes. Returns (shapes by tap name, model outputs)."""
    seen: dict[str, object] = {}

    def record(name: str):
        def hook(module, args, out):
            seen[name] = [tuple(t.shape) for t in out] if isinstance(out, (list, tuple)) else tuple(out.shape)
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in taps.items()]
    try:
        model.train()
        with torch.no_grad():
            outputs = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, outputs


def add_batchnorm(shapes: dict[str, tuple[int, ...]], name: str, channels: int) -> None:
    """The five state-dict entries of a BatchNorm2d called `name`, as a checkpoint file holds them."""
    for field in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.{field}"] = (channels,)
    shapes[f"{name}.num_batches_tracked"] = ()


def per_image_shapes(model: torch.nn.Module, x: torch.Tensor, names) -> tuple[dict, object]:
    """`traced_forward` on the named submodules, shapes without the batch dimension."""
    seen, outputs = traced_forward(model, x, {name: model.get_submodule(name) for name in names})
    return {k: [s[1:] for s in v] if isinstance(v, list) else v[1:] for k, v in seen.items()}, outputs


def plan_at(spec, test_size=None, dataset: str = "cityscapes", **changes):
    """The row's plan (on the official train split), at another test size (its crop test scaled to it) and with
    `changes` to any field: what an evaluation at that size runs with."""
    from dataclasses import replace

    from harness.config.plan import make_plan, scaled_test_crop

    plan = make_plan(spec, dataset, 2975)
    if test_size is not None:
        crop, stride = scaled_test_crop(spec, list(test_size))
        plan = replace(plan, test_size=list(test_size), crop_test=crop, crop_stride=stride)
    return replace(plan, **changes)


def official_tree(root: Path, skip_city: str | None = None) -> Path:
    """A Cityscapes tree of 1x1 PNGs with the official names: every split's official count and cities, a label
    beside each train/val image (the file names and each file's two ends are all `bench doctor`'s dataset check
    reads)."""
    import io

    from PIL import Image

    from harness.config.benchmark import OFFICIAL_CITIES, OFFICIAL_SPLIT_IMAGES

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    pixel = buffer.getvalue()

    for split, cities in OFFICIAL_CITIES.items():
        total = OFFICIAL_SPLIT_IMAGES[split]
        for index, city in enumerate(cities):
            count = total // len(cities) + (1 if index < total % len(cities) else 0)
            if city == skip_city:
                continue
            images, labels = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            images.mkdir(parents=True)
            labels.mkdir(parents=True)
            for i in range(count):
                (images / f"{city}_{i:06d}_000019_leftImg8bit.png").write_bytes(pixel)
                if split != "test":
                    (labels / f"{city}_{i:06d}_000019_gtFine_labelIds.png").write_bytes(pixel)
    return root


def process_tree(pid: int) -> set[int]:
    found = {pid}
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    found |= process_tree(int(child))
    except OSError:
        pass
    return found


def listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state that these processes hold (by socket inode)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:["):-1])
        except OSError:
            continue
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.add(fields[1].split(":")[0])
    return addresses


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them


GLOO_TIMEOUT_S = 120


def two_gloo_processes(target, folder: Path) -> list[dict]:
    """Run `target(rank, world_size, store_path, folder)` in two forked processes (they start with this one's modules
    loaded; a spawned one spends seconds importing them) and return what each saved as folder/rank<N>.pt."""
    import pytest

    processes = torch.multiprocessing.start_processes(target, args=(2, str(folder / "store"), str(folder)), nprocs=2,
                                                      join=False, start_method="fork")
    deadline = time.monotonic() + GLOO_TIMEOUT_S
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
                process.join()
            pytest.fail(f"the two gloo processes did not finish within {GLOO_TIMEOUT_S} s")
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(2)]

