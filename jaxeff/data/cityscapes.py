"""Cityscapes for semantic segmentation through tensorflow-datasets (`cityscapes/semantic_segmentation`).

tfds serves `image_left` uint8 [1024, 2048, 3] (RGB) and `segmentation_label` uint8 [1024, 2048, 1] holding the
*labelIds* (`*_gtFine_labelIds.png`, 0..33); the 19-class benchmarks (and SparseRefine's loader, which reads
`*_gtFine_labelTrainIds.png`) use trainIds, so labels are mapped with `LABEL_TO_TRAIN_ID` (cityscapesScripts
`labels.py`; unlisted ids -> 255, the ignore index). tfds needs the manually downloaded zips
(`leftImg8bit_trainvaltest.zip`, `gtFine_trainvaltest.zip`) under `<data_dir>/downloads/manual` and a one-time
`tfds build cityscapes/semantic_segmentation`.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
LABEL_TO_TRAIN_ID = np.full(256, 255, np.uint8)
LABEL_TO_TRAIN_ID[list(_TRAIN_LABEL_IDS)] = np.arange(len(_TRAIN_LABEL_IDS), dtype=np.uint8)
SPLITS = ("train", "validation", "test")


def to_train_ids(label) -> np.ndarray:
    """labelIds uint8 [..., H, W] (or [..., H, W, 1]) -> trainIds uint8 [..., H, W] (255 = ignore)."""
    label = np.asarray(label)
    if label.ndim >= 3 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.dtype != np.uint8:
        raise ValueError(f"Cityscapes labelIds must be uint8, got {label.dtype}")
    return LABEL_TO_TRAIN_ID[label]


class CityscapesSource:
    """Random-access Cityscapes split: `len(src)`, `src[i] -> {"image": uint8 [H, W, 3] RGB, "label": uint8 [H, W]
    trainIds, "image_id": str}`. Raises ValueError for an unknown split, IndexError past the end."""

    def __init__(self, split: str = "validation", data_dir: str | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        import tensorflow_datasets as tfds  # optional dependency (jaxeff[data])

        self.split = split
        self._source = tfds.data_source("cityscapes/semantic_segmentation", split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        ex = self._source[i]
        image_id = ex["image_id"]
        return {"image": np.asarray(ex["image_left"], np.uint8), "label": to_train_ids(ex["segmentation_label"]),
                "image_id": image_id.decode() if isinstance(image_id, bytes) else str(image_id)}
