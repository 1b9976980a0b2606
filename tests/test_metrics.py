import math

import torch

from harness.engine.metrics import ConfusionMatrix


def test_confusion_matrix_matches_hand_worked_example():
    # 4 classes. Ground truth has an ignored pixel (255); class 3 appears in neither gt nor prediction.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3 - 1, 0]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    # class 0: tp 2 (0,0),(1,3); fn 1 (0,1)->1; fp 1 (1,1) gt 2 -> 0.  IoU 2/4
    # class 1: tp 2; fp 1; fn 0 -> 2/3.  class 2: tp 1, fn 1, fp 0 -> 1/2 (the ignored pixel predicted 2 is not a FP)
    m = cm.compute()
    assert cm.matrix.sum() == 7
    assert math.isclose(m.iou[0], 50.0) and math.isclose(m.iou[1], 200 / 3) and math.isclose(m.iou[2], 50.0)
    assert math.isnan(m.iou[3])
    assert math.isclose(m.miou, (50 + 200 / 3 + 50) / 3)
    assert math.isclose(m.pixel_accuracy, 5 / 7 * 100)


def test_predicted_class_absent_from_ground_truth_scores_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    m = cm.compute()
    assert m.iou[2] == 0.0 and math.isnan(m.iou[1]) and math.isclose(m.miou, 25.0)
