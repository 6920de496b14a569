"""What the evaluator measures for one sample, in a form that pickles (for the gather across
ranks) and turns into JSON / CSV rows without conversion code at every consumer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["PATHS", "TEACHER_FORCED", "PATH_TITLES", "METRIC_NAMES", "PathScores", "SampleRecord"]

# The three ways a [SEG] state is obtained, in report order.
PATHS = ("forward", "prompt", "generate")
# The teacher-forced paths, each compared against "generate" in the discrepancy section.
TEACHER_FORCED = ("forward", "prompt")
PATH_TITLES = {
    "forward": "forward (teacher-forced training response)",
    "prompt": "prompt ([SEG] appended to the instruction)",
    "generate": "generate (greedy, KV cache)",
}
METRIC_NAMES = ("dice", "iou", "sensitivity", "specificity", "precision")


@dataclass
class PathScores:
    """Metrics of one path's mask against the ground truth, at the image's original resolution
    (inside the field of view when the sample has one), with the confusion counts they came from."""

    dice: float
    iou: float
    sensitivity: float
    specificity: float
    precision: float
    tp: int
    fp: int
    fn: int
    tn: int

    def metric(self, name: str) -> float:
        return float(getattr(self, name))


@dataclass
class SampleRecord:
    """Everything measured on one sample.

    index: position in the evaluated list (restores the order after the gather across ranks);
    text / seg_emitted / num_seg: the generate path's answer;
    cosine_hidden[p]: cosine between path p's and the generate path's [SEG] hidden state (None when
        generate emitted no [SEG]); cosine_embedding[p]: the same for the projected decoder prompt;
    agreement_dice[p]: Dice between path p's mask and the generate path's mask.
    """

    index: int
    id: str
    source: str
    height: int
    width: int
    has_fov: bool
    scores: dict[str, PathScores]
    text: str
    seg_emitted: bool
    num_seg: int
    cosine_hidden: dict[str, float | None] = field(default_factory=dict)
    cosine_embedding: dict[str, float | None] = field(default_factory=dict)
    agreement_dice: dict[str, float] = field(default_factory=dict)

    def dice(self, path: str) -> float:
        return self.scores[path].dice

    def to_json(self) -> dict:
        return asdict(self)
