"""Facts of the benchmark that no spec changes: Cityscapes' official splits and frame size, and how
United-Perception trained every row."""

from __future__ import annotations

# Cityscapes gtFine: the val split is the one every reference figure was measured on; the test split's labels
# are withheld.
OFFICIAL_SPLIT_IMAGES = {"train": 2975, "val": 500, "test": 1525}
FRAME_SIZE = (2048, 1024)  # a Cityscapes frame, [width, height]
REFERENCE_DATASET = "cityscapes"  # the data the table's reference mIoU was measured on
UP_GPUS = 8  # every United-Perception row trained on 8 GPUs (pt_sync_bn group_size 8)
