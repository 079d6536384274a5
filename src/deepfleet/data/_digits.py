"""scikit-learn's bundled handwritten digits, resized to 28x28.

Real data that needs no download. At 28x28 the paper's LeNet5 (5x5 convs, 20/50 filters,
fc 500, 431K parameters) applies unchanged, so its numbers compare directly with DeepIoT's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deepfleet.data._dataset import Dataset, split_standardised

SPLIT_SEED = 0  # the splits are fixed: a run's seed changes the model, never the data
N_VAL, N_TEST = 200, 500  # 1797 images: 1097 train / 200 val / 500 test


def load_digits28() -> Dataset:
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = raw.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    with torch.no_grad():
        big = F.interpolate(
            torch.from_numpy(images)[:, None], size=(28, 28), mode="bilinear", align_corners=False
        ).numpy()  # (1797, 1, 28, 28)
    y = raw.target.astype(np.int64)
    return split_standardised(
        "digits", big, y, (N_VAL, N_TEST), SPLIT_SEED, per_channel=False, num_classes=10,
        description="scikit-learn handwritten digits (8x8, real) resized to 28x28")
