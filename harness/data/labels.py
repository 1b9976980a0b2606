"""Cityscapes' labelId -> trainId mapping (cityscapesscripts' labels.py), on the CPU and on the training device.

Label PNGs store labelIds. The loader hands them over as stored; the training device maps them to trainIds where
the labels are used (augment.TrainTransform after the crop, engine.evaluate before scoring): on a GPU that is one
gather over pixels already there, where a loader worker spent 1-1.5 ms of CPU per 2048x1024 label. Reading a
label file for scoring or drawing maps it on the CPU (`label_ids_to_train_ids`)."""

from __future__ import annotations

import functools

import numpy as np
import torch

IGNORE_INDEX = 255  # the trainId of every labelId that is not one of the 19 classes

# labelId of each trainId.
TRAIN_ID_TO_LABEL_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _train_id, _label_id in enumerate(TRAIN_ID_TO_LABEL_ID):
    LABEL_TO_TRAIN[_label_id] = _train_id

# LABEL_TO_TRAIN for two labelIds at once: entry (second << 8 | first) holds both trainIds, little-endian as a
# uint16 view of the label's bytes reads them.
_FIRST, _SECOND = np.arange(1 << 16) & 0xFF, np.arange(1 << 16) >> 8
LABEL_PAIR_TO_TRAIN = (LABEL_TO_TRAIN[_SECOND].astype("<u2") << 8 | LABEL_TO_TRAIN[_FIRST]).astype("<u2")


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """The same values as LABEL_TO_TRAIN[label_ids]; two labels per lookup where the pixels allow it (half the
    time of `take` on a 2048x1024 label, which costs 0.8 ns a pixel)."""
    if label_ids.dtype != np.uint8 or label_ids.size % 2 or not label_ids.flags.c_contiguous:
        return LABEL_TO_TRAIN.take(label_ids)
    train_ids = np.empty_like(label_ids)
    np.take(LABEL_PAIR_TO_TRAIN, label_ids.reshape(-1).view("<u2"), out=train_ids.reshape(-1).view("<u2"))
    return train_ids


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    lut[: len(TRAIN_ID_TO_LABEL_ID)] = TRAIN_ID_TO_LABEL_ID
    return lut[train_ids]


@functools.cache
def _table_on(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(LABEL_TO_TRAIN).to(device)


def train_ids_of(label_ids: torch.Tensor) -> torch.Tensor:
    """uint8 labelIds -> uint8 trainIds (IGNORE_INDEX for the rest), on the tensor's own device."""
    return _table_on(label_ids.device)[label_ids.long()]
