"""Plain records shared by every dataset reader: one :class:`Sample` per image, two splits.

The readers of MVTec AD (and its near relatives), VisA and plain folders all return the same
records, so training, scoring and metrics never need to know which layout an image came from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

GOOD = "good"  # defect_type of every normal image, whatever the dataset calls it
SPLITS = ("train", "test")
UNKNOWN_LABEL = -1  # label of an image given by path alone (nothing to predict against)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and what is known about it.

    Attributes:
        image: the image file.
        label: 0 for a normal ("good") image, 1 for a defective one, -1 when unknown (an image
            given by path alone, for prediction).
        defect_type: ``"good"`` for normal images; otherwise the dataset's name for the defect
            (the test subfolder in MVTec AD, ``"anomaly"`` in VisA, ``"abnormal"`` for folders).
        masks: ground-truth mask files whose union is the defect mask; empty when there is none
            (normal images, or a dataset without masks). MVTec LOCO gives several per image.
        category: the object or texture class (``"bottle"``, ``"candle"``).
        split: ``"train"`` or ``"test"``.
    """

    image: Path
    label: int
    defect_type: str
    masks: tuple[Path, ...] = ()
    category: str = ""
    split: str = "test"

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so str paths and mask lists are accepted.
        object.__setattr__(self, "image", Path(self.image))
        object.__setattr__(self, "masks", tuple(Path(m) for m in self.masks))
        if self.label not in (UNKNOWN_LABEL, 0, 1):
            raise ValueError(f"{self.image}: label must be 0, 1 or -1, got {self.label!r}")
        if (self.label == 0) != (self.defect_type == GOOD):
            raise ValueError(
                f"{self.image}: label {self.label} does not fit defect_type {self.defect_type!r} "
                f"(label 0 goes with '{GOOD}' and only with it)"
            )
        if self.split not in SPLITS:
            raise ValueError(f"{self.image}: split must be one of {SPLITS}, got {self.split!r}")


@dataclass
class DatasetSplits:
    """The training and test samples of one category, each list in a fixed, sorted order."""

    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, int]]:
        """Image counts per split and per defect type, ``"good"`` first, the rest sorted.

        Returns:
            ``{"train": {"good": 209}, "test": {"good": 20, "broken_large": 20, ...}}``; a split
            with no images maps to an empty dict.
        """
        return {"train": _count_types(self.train), "test": _count_types(self.test)}

    def describe(self) -> str:
        """The summary as one line for a log: ``train 209 (good 209); test 40 (good 20, ...)``."""
        parts = []
        for split, counts in self.summary().items():
            detail = ", ".join(f"{name} {n}" for name, n in counts.items())
            parts.append(f"{split} {sum(counts.values())}" + (f" ({detail})" if detail else ""))
        return "; ".join(parts)


def _count_types(samples: list[Sample]) -> dict[str, int]:
    counts = Counter(s.defect_type for s in samples)
    names = sorted(counts, key=lambda name: (name != GOOD, name))
    return {name: counts[name] for name in names}
