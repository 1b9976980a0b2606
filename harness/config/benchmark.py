"""Facts of the benchmark that no spec changes: Cityscapes' official splits and frame size, and how
United-Perception trained every row."""

from __future__ import annotations

# Cityscapes gtFine: the val split is the one every reference figure was measured on; the test split's labels
# are withheld.
OFFICIAL_SPLIT_IMAGES = {"train": 2975, "val": 500, "test": 1525}
FRAME_SIZE = (2048, 1024)  # a Cityscapes frame, [width, height]
REFERENCE_DATASET = "cityscapes"  # the data the table's reference mIoU was measured on
SYNTHETIC_DATASET = "synthetic"  # the generated stand-in in Cityscapes' layout (proves the pipeline, never a figure)
DATASETS = (REFERENCE_DATASET, SYNTHETIC_DATASET)
# Early warning (harness.report.behind): mIoU points below the lowest earlier run of the same row, dataset and budget
# that an evaluation may fall before it is flagged (or 3 x their spread, when wider); `--stop-if-behind` takes it.
BEHIND_MARGIN = 2.0
UP_GPUS = 8  # every United-Perception row trained on 8 GPUs (pt_sync_bn group_size 8)
# The cities of each split of Cityscapes' gtFine_trainvaltest / leftImg8bit_trainvaltest packages (the folder names
# under <split>/): 18 train, 3 val, 6 test.
OFFICIAL_CITIES = {
    "train": ("aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg", "hanover",
              "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen", "ulm", "weimar", "zurich"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich"),
}


def dataset_name(synthetic: bool) -> str:
    """The dataset a run reads, as records, run folders and tracking name it."""
    return SYNTHETIC_DATASET if synthetic else REFERENCE_DATASET
