"""`bench export`: every family of the table as ONNX with a dynamic batch axis, onnxruntime agreeing with PyTorch;
safetensors holding exactly the network's state dict; `bench speed --onnx`; the missing extra in one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.config.spec import load_spec
from harness.engine.trained import load_trained
from harness.models import build_model
from harness.outputs.model_export import (
    OPSET,
    TOLERANCE,
    MatrixAveragePool,
    export_onnx,
    onnx_metadata,
    read_safetensors,
)

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install -e '.[export]'")
pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")

SIZE = (128, 64)  # [width, height]: the pyramid's 3- and 6-bin pools do not divide its maps here
# One row per family; the ResNet-50 families take longer than a few seconds on 2 cores.
FAMILIES = {"bisenet": "bisenet-r18", "unet": "unet-769", "df_seg": "df_seg_v2", "sf_seg": "sf_seg_v2",
            "deeplabv3": pytest.param("deeplabv3-r50", marks=pytest.mark.slow),
            "pspnet": pytest.param("pspnet-r50", marks=pytest.mark.slow),
            "icnet": pytest.param("icnet-r50", marks=pytest.mark.slow)}
# What the exported graph must hold for the family: the pyramid's pools as MatMul, SFNet's warp as GridSample.
NEEDS = {"pspnet-r50": {"MatMul"}, "icnet-r50": {"MatMul"}, "df_seg_v2": {"MatMul"},
         "sf_seg_v2": {"MatMul", "GridSample"}, "bisenet-r18": {"DepthToSpace"}}


def test_matrix_pool_is_pytorchs_adaptive_average_pool():
    x = torch.randn(2, 3, 13, 22)
    for bins in (1, 2, 3, 6, (3, 5), (13, 22)):
        assert torch.allclose(MatrixAveragePool(bins)(x), torch.nn.functional.adaptive_avg_pool2d(x, bins), atol=1e-6)


@pytest.mark.parametrize("row", FAMILIES.values(), ids=FAMILIES.keys())
def test_every_family_exports_and_onnxruntime_agrees(row, tmp_path, one_thread):
    torch.manual_seed(0)
    model = build_model(load_spec(row)).eval()
    done = export_onnx(model, tmp_path / f"{row}.onnx", SIZE, {"segbench.row": row}, check=2)
    assert done.opset == OPSET and done.checked_batch == 2
    assert done.max_abs_diff <= TOLERANCE * max(1.0, done.max_abs_logit), done.summary()
    proto = onnx.load(str(done.path))
    (image,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, SIZE[1], SIZE[0]]
    assert NEEDS.get(row, set()) <= set(done.operators)
    assert "AdaptiveAvgPool" not in " ".join(done.operators)
    assert onnx_metadata(done.path)["segbench.row"] == row
    print(f"{row}: opset {done.opset}, max abs diff {done.max_abs_diff:.2e}, {done.export_s:.1f} s")


def test_checkpoint_exports_to_safetensors_and_to_onnx(finished_run, tmp_path, monkeypatch):
    for key, value in finished_run.env.items():
        monkeypatch.setenv(key, value)
    checkpoint = finished_run.folder / "checkpoints" / "best.pt"
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(checkpoint), "--format", "safetensors",
                                       "--weights", "raw", "--out", str(out)])
    assert result.exit_code == 0, result.output
    tensors, metadata = read_safetensors(out)
    _, model, _ = load_trained(checkpoint, weights="raw")
    state = model.state_dict()
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)
    assert metadata["segbench.row"] == "sf_seg_v1-ema" and metadata["segbench.weights"] == "raw"
    assert json.loads(metadata["segbench.plan"])["iters"] == 2
    _, ema, _ = load_trained(checkpoint, weights="ema")
    assert not all(torch.equal(ema.state_dict()[k], state[k]) for k in state)  # raw, not EMA, was written

    result = CliRunner().invoke(main, ["export", "--checkpoint", str(checkpoint), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    exported = checkpoint.with_name("best-ema.onnx")  # at the test size the run was evaluated at
    assert "256x128, dynamic batch" in result.output and "max abs difference" in result.output
    assert onnx_metadata(exported)["segbench.weights"] == "ema"


@pytest.mark.slow
def test_speed_times_onnxruntime_beside_pytorch(tmp_path):
    torch.manual_seed(0)
    exported = export_onnx(build_model(load_spec("sf_seg_v1-ema")).eval(), tmp_path / "sf.onnx", SIZE,
                           {"segbench.row": "sf_seg_v1-ema"}).path
    result = CliRunner().invoke(main, ["speed", "--row", "sf_seg_v1-ema", "--onnx", str(exported), "--warmup", "0",
                                       "--repeats", "1", "--steps", "1"])
    assert result.exit_code == 0, result.output
    lines = {line.split("  ")[1].strip(): line for line in result.output.splitlines()[2:] if "  " in line}
    assert {"infer", "infer onnxruntime"} <= set(lines) and "x PyTorch's infer" in lines["infer onnxruntime"]
    assert "128x64" in lines["infer"] and "128x64" in lines["infer onnxruntime"]  # at the file's size


def test_missing_export_extra_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "onnx",
                                       "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert result.output.strip() == ("error: ONNX needs the optional export extra (onnxruntime is not installed): "
                                     "pip install 'segbench[export]' (onnx and onnxruntime)")
