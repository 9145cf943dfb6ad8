"""Plain-words advice for the new-job form: which strategy suits a dataset of this size. Torch-free.

The rule follows how much data each class has: with little, only a new final layer can be trained
without overfitting; with more, adjusting the pretrained network pays off, first gently (two_stage),
then, with plenty, all of it from the start (full).
"""
from __future__ import annotations

from dataclasses import dataclass

FEATURES_MAX_PER_CLASS = 150
TWO_STAGE_MAX_PER_CLASS = 1000

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


@dataclass(frozen=True)
class Advice:
    strategy: str
    reason: str
    epochs: int
    per_class: float  # average train images per class
    smallest: int  # train images of the smallest class


def recommend_strategy(counts: dict) -> Advice:
    """`counts` is a dataset's {"train": {class: n}, "val": {class: n}} (or just {class: n} of train)."""
    train = counts.get("train", counts) if isinstance(counts, dict) else {}
    sizes = [int(v) for v in train.values() if isinstance(v, (int, float))] or [0]
    per_class = sum(sizes) / len(sizes)
    smallest = min(sizes)
    shown = f"{per_class:.0f}"
    if per_class <= FEATURES_MAX_PER_CLASS:
        strategy, epochs = "features", 10
        reason = (f"Your classes have about {shown} training images each. That is too few to adjust the "
                  "pretrained network itself without it memorising the pictures, so training only a new final "
                  "layer is the most reliable choice, and the fastest.")
    elif per_class <= TWO_STAGE_MAX_PER_CLASS:
        strategy, epochs = "two_stage", 10
        reason = (f"Your classes have about {shown} training images each: enough to adjust the network a "
                  "little after the new final layer has learned. Doing it in two stages keeps the pretrained "
                  "knowledge intact at the start.")
    else:
        strategy, epochs = "full", 10
        reason = (f"Your classes have about {shown} training images each: plenty to adjust every layer of the "
                  "network to your images, which gives the best accuracy.")
    if smallest < 10:
        reason += (f" Note: the smallest class has only {smallest} training image{'s' if smallest != 1 else ''}; "
                   "add more if you can, results on it will be unreliable.")
    return Advice(strategy, reason, epochs, per_class, smallest)
