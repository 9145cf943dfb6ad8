"""Which strategy suits a dataset: the rules, in plain words. Torch-free and pure (the web tier, the CLI and
the tests use it; `probe.measure_domain_gap` supplies the measurement).

Two things decide it. How much data each class has: with little, only a new final layer can be trained
without the network memorising the pictures; with more, adjusting the pretrained network pays off, first
gently (two_stage), then, with plenty, all of it from the start (full). And how far the images are from the
everyday photos of ImageNet, *measured*: a linear probe on the frozen features is compared with a short
fine-tune of the last block on a sample. When adjusting the last block gains a lot, the pretrained top
layers do not fit the images (a distant domain) and more of the network should be adjusted:

- little data, near domain    -> features
- little data, distant domain -> finetune_last:2 (adjust a few top groups only: there is too little data
                                 for more)
- more data, distant domain   -> two_stage, or full with plenty of data
- more data, near domain      -> two_stage, or full with plenty of data (as by size alone)

Without a measurement the size alone decides, and the advice says how to measure.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

FEATURES_MAX_PER_CLASS = 150  # "little data": at most this many train images per class
TWO_STAGE_MAX_PER_CLASS = 1000  # above: "plenty of data"
DISTANT_GAIN = 0.04  # fine-tuning the last block beats the linear probe by 4 points or more: a distant domain
NOISE_SIGMAS = 2.0  # ... and by more than twice the standard error of the paired difference
LITTLE_DATA_DISTANT_STRATEGY = "finetune_last:2"

MEASURE_HINT = ("Use “Compare backbones” on the dataset page (or `graft probe DATA_DIR --advise`) to measure how "
                "far your images are from everyday photos: the advice then rests on that measurement.")


@dataclass(frozen=True)
class Advice:
    strategy: str
    reason: str
    epochs: int
    per_class: float  # average train images per class
    smallest: int  # train images of the smallest class
    source: str = "size"  # "size": data size alone; "measured": size and the measured domain gap
    domain: str | None = None  # "near" or "distant" when measured
    measured: dict[str, Any] | None = None  # the measurement the advice rests on (see `domain_gap_summary`)
    hint: str | None = None  # how to get a better advice, when there is one

    @property
    def strategy_kind(self) -> str:
        """"finetune_last" for "finetune_last:2" (the key of the strategy's description)."""
        return self.strategy.split(":", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_stderr(n: int, only_probe_right: int, only_finetune_right: int) -> float:
    """Standard error of the difference of two accuracies measured on the same n images, from the discordant
    pairs (the images exactly one of the two classifies right)."""
    if n <= 0:
        return 0.0
    d = only_finetune_right - only_probe_right
    var = (only_probe_right + only_finetune_right - d * d / n) / (n * n)
    return math.sqrt(max(var, 0.0))


def classify_domain(measured: dict[str, Any]) -> tuple[str, str]:
    """("near" | "distant", a plain-words sentence on what was measured)."""
    probe, ft = float(measured["probe_acc"]), float(measured["finetune_acc"])
    gain = ft - probe
    se = float(measured.get("stderr") or 0.0)
    n = int(measured.get("val_images") or 0)
    backbone = measured.get("backbone") or "the pretrained network"
    points = round(100 * gain)
    signed = f"+{points}" if points > 0 else f"−{-points}" if points < 0 else "±0"
    said = (f"On a sample of your images, a new final layer on {backbone}'s frozen features reached "
            f"{_pct(probe)}, and also adjusting its last block reached {_pct(ft)} ({signed} point"
            f"{'' if abs(points) == 1 else 's'}{f' on {n} val images' if n else ''}).")
    if gain >= DISTANT_GAIN and gain >= NOISE_SIGMAS * se:
        return "distant", (said + " That large gain means your images look unlike the everyday photos the "
                           "network learned from: its top layers need adjusting to them.")
    if gain >= DISTANT_GAIN:
        return "near", (said + " That gain is within what chance gives on so few images, so your images are "
                        "taken as close enough to the everyday photos the network learned from.")
    return "near", (said + " Your images look like the everyday photos the network learned from: its "
                    "features already fit them.")


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def recommend_strategy(counts: dict[str, Any], measured: dict[str, Any] | None = None) -> Advice:
    """`counts` is a dataset's {"train": {class: n}, "val": {class: n}} (or just {class: n} of train).
    `measured` (optional) is a domain-gap measurement: {"probe_acc", "finetune_acc", and optionally
    "stderr", "val_images", "backbone"}; without it the size alone decides. Never raises on odd input."""
    train = counts.get("train", counts) if isinstance(counts, dict) else {}
    sizes = [int(v) for v in train.values() if isinstance(v, (int, float))] or [0]
    per_class = sum(sizes) / len(sizes)
    smallest = min(sizes)
    shown = f"{per_class:.0f}"
    try:
        domain, said = classify_domain(measured) if measured else (None, "")
    except (KeyError, TypeError, ValueError):  # a malformed measurement is no measurement
        domain, said, measured = None, "", None
    epochs = 10

    if domain is None:
        if per_class <= FEATURES_MAX_PER_CLASS:
            strategy = "features"
            reason = (f"Your classes have about {shown} training images each. That is too few to adjust the "
                      "pretrained network itself without it memorising the pictures, so training only a new "
                      "final layer is the most reliable choice, and the fastest.")
        elif per_class <= TWO_STAGE_MAX_PER_CLASS:
            strategy = "two_stage"
            reason = (f"Your classes have about {shown} training images each: enough to adjust the network a "
                      "little after the new final layer has learned. Doing it in two stages keeps the pretrained "
                      "knowledge intact at the start.")
        else:
            strategy = "full"
            reason = (f"Your classes have about {shown} training images each: plenty to adjust every layer of "
                      "the network to your images, which gives the best accuracy.")
    elif per_class <= FEATURES_MAX_PER_CLASS:
        if domain == "near":
            strategy = "features"
            reason = (f"{said} With about {shown} training images per class, too few to adjust the network "
                      "itself without it memorising the pictures, training only a new final layer is the most "
                      "reliable choice, and the fastest.")
        else:
            strategy = LITTLE_DATA_DISTANT_STRATEGY
            reason = (f"{said} With only about {shown} training images per class, adjust just the top two layer "
                      "groups and the new final layer: the lower layers (edges, textures) still fit, and adjusting "
                      "more of the network would memorise the pictures.")
    elif per_class <= TWO_STAGE_MAX_PER_CLASS:
        strategy = "two_stage"
        if domain == "near":
            reason = (f"{said} With about {shown} training images per class there is enough data to gain a "
                      "little more by adjusting the whole network gently, after the new final layer has learned.")
        else:
            reason = (f"{said} With about {shown} training images per class there is enough data to adjust the "
                      "whole network: first the new final layer alone, then every layer with small steps.")
    else:
        strategy = "full"
        if domain == "near":
            reason = (f"{said} With about {shown} training images per class, plenty, adjusting every layer "
                      "from the start still gives the best accuracy.")
        else:
            reason = (f"{said} With about {shown} training images per class, plenty, adjust every layer of the "
                      "network to your images from the start.")
    if smallest < 10:
        reason += (f" Note: the smallest class has only {smallest} training image{'s' if smallest != 1 else ''}; "
                   "add more if you can, results on it will be unreliable.")
    return Advice(strategy, reason, epochs, per_class, smallest, source="measured" if domain else "size",
                  domain=domain, measured=dict(measured) if domain and measured is not None else None,
                  hint=None if domain else MEASURE_HINT)


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
