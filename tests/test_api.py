"""The Python API: README's example runs as written (on a finished synthetic run's checkpoint and one of its images),
and `predict` gives the train ids `bench predict` writes for the same image."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from harness import api
from harness.data.cityscapes import find_samples
from harness.errors import BenchError
from harness.outputs.predictions import predict_split, read_prediction_train_ids
from harness.paths import PROJECT_ROOT


def readme_example() -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text.split("### From Python", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    return block


def test_readme_python_example_runs(finished_run, synthetic_root):
    code = readme_example()
    checkpoint = finished_run.folder / "checkpoints" / "best.pt"
    image = find_samples(synthetic_root, "val")[0].image
    # The example's two paths, a user's checkpoint and image, are this session's.
    code, found = re.subn(r'"runs/[^"]+\.pt"', repr(str(checkpoint)), code)
    code, found_image = re.subn(r'"[^"]+_leftImg8bit\.png"', repr(str(image)), code)
    assert found == 1 and found_image == 1, code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["train_ids"].shape == Image.open(image).size[::-1] and namespace["train_ids"].dtype == np.uint8


def test_predict_is_what_bench_predict_writes(finished_run, synthetic_root, tmp_path):
    model = api.load_checkpoint(finished_run.folder / "checkpoints" / "best.pt")
    assert (model.row, model.weights, model.plan.test_size) == ("sf_seg_v1-ema", "ema", [256, 128])
    sample = find_samples(synthetic_root, "val")[1]
    (written,) = predict_split(model.network, [sample], model.plan, next(model.parameters()).device, tmp_path,
                               workers=0, progress=False)
    expected = read_prediction_train_ids(written)
    assert np.array_equal(api.predict(model, sample.image), expected)
    assert np.array_equal(api.predict(model, Image.open(sample.image)), expected)
    with pytest.raises(BenchError, match="H x W x 3"):
        api.predict(model, np.zeros((4, 4), dtype=np.uint8))
    assert api.build_model("bisenet-r18").plan.test_size == [2048, 1024]  # a row's own test size before training
