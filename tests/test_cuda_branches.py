"""Every CUDA-only branch in harness/ has a CPU test of the same code path or a reason it cannot have one.

The branches are found in the source (ast): comparisons with "cuda" (`device.type == "cuda"`, `device_type != "cuda"`,
`name.startswith("cuda")`) and `torch.cuda.is_available()` / `torch.cuda.device_count()`. Each is known by its file,
its function and the condition's text, so a new branch, or an old one rewritten, must be entered here: with the CPU
test that runs its code path (the GPU-shaped CPU lane, tests/test_cpu_lane.py, and others), or with one of REASONS.
"""

from __future__ import annotations

import ast
from pathlib import Path

from harness.paths import PROJECT_ROOT

HARNESS = PROJECT_ROOT / "harness"
TESTS = PROJECT_ROOT / "tests"

# Why a branch has no CPU twin: what it does exists only with a GPU.
NCCL = "NCCL itself (the CPU's gloo runs the same process group: tests/test_cpu_lane.py, test_up_norms.py)"
CUDA_MEMORY = "CUDA memory statistics and the caching allocator (the CPU reports the process's peak RSS)"
CUDA_RUNTIME = "a CUDA runtime query (devices present, their count, name, memory, events, synchronisation, RNG)"
CUDNN = "cuDNN's autotuner (torch.backends.cudnn), which the CPU does not have"
SYNC_BN = ("SyncBatchNorm's training forward: torch raises ValueError('SyncBatchNorm expected input tensor to be on "
           "GPU ...') on CPU tensors; the conversion and an eval forward run on CPU in tests/test_cpu_lane.py")
PINNED = "page-locked host memory is for copies to a GPU; torch refuses to pin without one"
DDP_IDS = "DDP's device_ids name CUDA devices only (None for CPU modules); DDP itself runs on gloo in the CPU lane"
DEFAULT = "a default by device (timing counts, sizes, worker counts); the CPU lane passes the GPU's value explicitly"
RECORD = "reads a saved record's device type to label or rank it: no GPU code runs"
ORT_CUDA = "onnxruntime's CUDA execution provider"
REASONS = {NCCL, CUDA_MEMORY, CUDA_RUNTIME, CUDNN, SYNC_BN, PINNED, DDP_IDS, DEFAULT, RECORD, ORT_CUDA}

LANE = "tests/test_cpu_lane.py"
# (file under harness/, function, condition) -> a CPU test "path::name" that runs the same code path, or a reason.
INVENTORY: dict[tuple[str, str, str], str] = {
    ("report/estimates.py", "this_gpu", "torch.cuda.is_available()"): CUDA_RUNTIME,
    ("report/estimates.py", "resolve_device", 'r.device_type == "cuda"'): RECORD,
    ("report/estimates.py", "record_peak", 'record.device_type == "cuda"'): RECORD,
    ("config/precision.py", "on_gpu", 'device_type == "cuda"'):
        "tests/test_training_resilience.py::test_compute_is_what_was_asked_for_on_either_device_with_the_device_defaults_kept",
    ("data/loaders.py", "train_loader", 'torch.device(device).type == "cuda"'): PINNED,
    ("data/loaders.py", "eval_loader", 'torch.device(device).type == "cuda"'): PINNED,
    ("engine/benchmark.py", "with_batch_retry", 'device.type == "cuda"'): CUDA_MEMORY,
    ("engine/benchmark.py", "measure_data", 'device.type == "cuda"'): CUDA_MEMORY,
    ("engine/benchmark.py", "defaults", 'device.type == "cuda"'): DEFAULT,
    ("engine/benchmark.py", "resolve_sizes", 'device.type == "cuda"'): DEFAULT,
    ("engine/benchmark.py", "measure_step", 'device.type == "cuda"'): CUDNN,
    ("engine/device.py", "default_device_type", "torch.cuda.is_available()"): CUDA_RUNTIME,
    ("engine/device.py", "pick_device", "torch.cuda.is_available()"): CUDA_RUNTIME,
    ("engine/device.py", "pick_device", 'name.startswith("cuda")'): CUDA_RUNTIME,
    ("engine/device.py", "pick_device", 'name == "cuda"'): CUDA_RUNTIME,
    ("engine/device.py", "synchronize", 'device.type == "cuda"'): CUDA_RUNTIME,
    ("engine/device.py", "reset_peak_memory", 'device.type == "cuda"'): CUDA_MEMORY,
    ("engine/device.py", "peak_memory_gib", 'device.type == "cuda"'): CUDA_MEMORY,
    ("engine/device.py", "device_name", 'device.type == "cuda"'): CUDA_RUNTIME,
    ("engine/device.py", "device_memory_gib", 'device.type != "cuda"'): CUDA_MEMORY,
    ("engine/device.py", "time_steps", 'device.type == "cuda"'): CUDA_RUNTIME,
    ("engine/device.py", "matmul_peak_tflops", 'device.type == "cuda"'): DEFAULT,
    ("engine/distributed.py", "init", 'device_type == "cuda"'): NCCL,
    ("engine/train.py", "rng_state", "torch.cuda.is_available()"): CUDA_RUNTIME,
    ("engine/train.py", "set_rng_state", "torch.cuda.is_available()"): CUDA_RUNTIME,
    ("engine/train.py", "convert_norm", 'device_type == "cuda"'):
        f"{LANE}::test_two_gloo_processes_convert_to_syncbn_keep_sfnets_grouped_head_norms_and_train_in_bf16",
    ("engine/train.py", "Trainer.__init__", 'device.type == "cuda"'): DDP_IDS,
    ("launch/options.py", "check_batch_norm", 'device_type == "cuda"'):
        "tests/test_up_norms.py::test_one_image_per_group_is_refused_even_where_the_encoder_would_be_syncbn",
    ("launch/run.py", "train", 'device.type == "cuda"'): CUDNN,
    ("launch/run.py", "check_readiness", 'checked.device_type != "cuda"'): CUDA_MEMORY,
    ("launch/run.py", "main", "torch.cuda.device_count() < launch.gpus"): CUDA_RUNTIME,
    ("launch/speed.py", "render", 'record.device_type == "cuda"'): RECORD,
    ("launch/sweep.py", "make_executor", "torch.cuda.is_available()"): CUDA_RUNTIME,
    ("launch/sweep.py", "default_max_parallel", "torch.cuda.is_available()"): CUDA_RUNTIME,
    ("outputs/model_export.py", "onnx_session", 'device == "cuda"'): ORT_CUDA,
    ("outputs/predictions.py", "default_workers", 'torch.device(device).type == "cuda"'): DEFAULT,
    ("report/card.py", "time_section",
     'record.environment.get("device_type", record.device) == "cuda"'): RECORD,
    ("report/records.py", "environment", 'device_type == "cuda"'): CUDA_RUNTIME,
    ("report/records.py", "environment", "torch.cuda.is_available()"): CUDA_RUNTIME,
    ("report/table.py", "infer_speeds", 'record.device_type == "cuda"'): RECORD,
}


def _is_cuda_text(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == "cuda"


def _is_cuda_condition(node: ast.AST) -> bool:
    if isinstance(node, ast.Compare):
        return any(_is_cuda_text(n) for n in [node.left, *node.comparators]) or any(
            _is_cuda_call(n) for n in [node.left, *node.comparators])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr == "startswith" and node.args and _is_cuda_text(node.args[0]):
            return True
        return _is_cuda_call(node) and node.func.attr == "is_available"
    return False


def _is_cuda_call(node: ast.AST) -> bool:
    """torch.cuda.is_available() or torch.cuda.device_count()."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("is_available", "device_count")
            and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "cuda")


def _conditions_in(node: ast.AST, scope: str, source: str, file: str, found: list[tuple[str, str, str]]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            _conditions_in(child, f"{scope}.{child.name}" if scope else child.name, source, file, found)
        elif _is_cuda_condition(child):
            found.append((file, scope or "<module>", " ".join((ast.get_source_segment(source, child) or "").split())))
        else:
            _conditions_in(child, scope, source, file, found)


def cuda_conditions(root: Path) -> list[tuple[str, str, str]]:
    """(file relative to harness/, enclosing function's qualified name, the condition's source) of every CUDA-only
    condition under `root`, in file order; the same condition twice in one function is listed twice."""
    found: list[tuple[str, str, str]] = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        _conditions_in(ast.parse(source), "", source, path.relative_to(root).as_posix(), found)
    return found


def _test_exists(reference: str) -> bool:
    path, _, name = reference.partition("::")
    file = PROJECT_ROOT / path
    if not file.is_file():
        return False
    tree = ast.parse(file.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(tree))


def unaccounted(conditions: list[tuple[str, str, str]]) -> list[str]:
    """Why the inventory fails: each branch without an entry, each entry whose test is missing or whose reason is
    not one of REASONS, and each entry whose branch is gone."""
    problems = [f"{file}: {function}: `{text}` is CUDA-only and has neither a CPU test nor a reason; add its CPU "
                "twin (tests/test_cpu_lane.py) and enter it in tests/test_cuda_branches.py INVENTORY"
                for file, function, text in conditions if (file, function, text) not in INVENTORY]
    for key, why in INVENTORY.items():
        if key not in conditions:
            problems.append(f"{key}: in the inventory but no longer in harness/; remove the entry")
        elif "::" in why:
            if not _test_exists(why):
                problems.append(f"{key}: its CPU test {why} does not exist")
        elif why not in REASONS:
            problems.append(f"{key}: {why!r} is not one of the listed reasons")
    return problems


def test_every_cuda_only_branch_has_a_cpu_test_or_a_listed_reason():
    conditions = cuda_conditions(HARNESS)
    assert len(conditions) > 20  # the scan finds the branches (about 40 when this was written)
    assert unaccounted(conditions) == []


def test_a_new_unlisted_cuda_branch_fails_the_inventory(tmp_path: Path):
    module = tmp_path / "engine" / "new.py"
    module.parent.mkdir()
    module.write_text("import torch\n\n\ndef step(device):\n    if device.type == 'cuda':\n        return 1\n"
                      "    return torch.cuda.is_available() or str(device).startswith('cuda')\n")
    conditions = cuda_conditions(tmp_path)
    assert [text for _, _, text in conditions] == ["device.type == 'cuda'", "torch.cuda.is_available()",
                                                   "str(device).startswith('cuda')"]
    problems = unaccounted(cuda_conditions(HARNESS) + conditions)
    assert len(problems) == 3 and all("engine/new.py: step:" in p and "neither a CPU test" in p for p in problems)
