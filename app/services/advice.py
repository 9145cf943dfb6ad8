"""Plain-words advice for the new-job form: which strategy suits a dataset. Torch-free.

The rules live in worker.engine.advice (the CLI uses them too): they follow how much data each class has and,
once a backbone comparison has measured it, how far the images are from everyday photos. This module adds
what each strategy does, in words for the pages.
"""
from __future__ import annotations

from worker.engine.advice import (FEATURES_MAX_PER_CLASS, MEASURE_HINT, TWO_STAGE_MAX_PER_CLASS,  # noqa: F401
                                  Advice, classify_domain, recommend_strategy)

# What each strategy does, for people who do not train networks for a living.
STRATEGIES: dict[str, dict[str, str]] = {
    "features": {
        "title": "Train only a new final layer",
        "text": "The pretrained network stays as it is and describes each image; only a new last layer learns "
                "your classes. The descriptions are computed once, so this is by far the fastest, and it cannot "
                "overfit much.",
        "when": "Small datasets of everyday photos.",
    },
    "two_stage": {
        "title": "New final layer first, then gently adjust the whole network",
        "text": "First the new last layer learns alone (fast), then the whole network is adjusted with small "
                "steps, smallest in the lowest layers. Usually the most accurate choice once there is enough data.",
        "when": "A few hundred images per class or more.",
    },
    "finetune_last": {
        "title": "Adjust only the top layers",
        "text": "The new last layer and the top few layer groups of the network learn; the lower, more general "
                "layers stay as they are. A middle way between the two above.",
        "when": "Images that look less like everyday photos (microscopy, X-rays, satellite), medium datasets.",
    },
    "full": {
        "title": "Adjust the whole network from the start",
        "text": "Every layer learns from the first epoch. Slowest, and it needs plenty of images, but it adapts "
                "the network the most.",
        "when": "Large datasets (over a thousand images per class).",
    },
}
