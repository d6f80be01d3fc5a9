"""A labeler's judgment of a task as ``rlhf.v1`` records: a Comparison (chosen response, optional full
ranking) and/or a Rating on the 1-7 scale, keyed by (task, labeler) so a resubmitted form writes nothing new."""

from __future__ import annotations

from rlhf.core.errors import InvalidArgument
from rlhf.feedback import records as rec
from rlhf.feedback import validation as val
from rlhf.labeling.tasks import RATING_SCALE, Judgment, Task, judgment_key
from rlhf.v1 import feedback_pb2


def _check_rating_answer(judgment: Judgment) -> int:
    if judgment.score is None:
        raise InvalidArgument("score", "required: rate the response from 1 to 7")
    if judgment.chosen_index not in (None, 0) or judgment.ranking:
        raise InvalidArgument("chosen_index", "a rating task has one response; nothing to choose")
    return 0


def _check_comparison_answer(judgment: Judgment, n: int) -> tuple[int, list[int]]:
    """(the chosen response, the ranking or []) of a comparison judgment of ``n`` responses."""
    ranking = list(judgment.ranking or [])
    chosen = judgment.chosen_index
    if chosen is None and not ranking:
        raise InvalidArgument("chosen_index", "required: pick the better response (or rank them all)")
    if chosen is not None and not 0 <= chosen < n:
        raise InvalidArgument("chosen_index", f"{chosen} out of range for {n} responses")
    if ranking and sorted(ranking) != list(range(n)):
        raise InvalidArgument("ranking", f"{ranking} does not rank each of the {n} responses once")
    if ranking and chosen is not None and ranking[0] != chosen:
        raise InvalidArgument("ranking", "the response ranked first must be the one chosen")
    return (chosen if chosen is not None else ranking[0]), ranking


def build_records(
    task: Task, judgment: Judgment, limits: val.Limits
) -> tuple[list[feedback_pb2.Comparison], list[feedback_pb2.Rating]]:
    """The Comparison and/or Rating messages of a judgment (validated by the store's checks later)."""
    val.check_labeler_id(judgment.labeler_id, "labeler_id", required=True)
    val.check_string(judgment.reason, "reason", limits.max_text_chars, required=False)
    if judgment.score is not None and not RATING_SCALE[0] <= judgment.score <= RATING_SCALE[1]:
        raise InvalidArgument("score", f"{judgment.score} is not on the 1-7 scale")
    common = dict(
        idempotency_key=judgment_key(task.id, judgment.labeler_id),
        labeler_id=judgment.labeler_id,
        reason=judgment.reason,
        metadata={"labeling_task_id": task.id},
    )
    texts = [r["text"] for r in task.responses]
    versions = [r.get("model_version", "") for r in task.responses]
    comparisons, ratings = [], []
    if task.kind == "rating":
        rated = _check_rating_answer(judgment)
    else:
        rated, ranking = _check_comparison_answer(judgment, len(texts))
        comparisons.append(
            rec.make_comparison(
                task.prompt_value,
                texts,
                chosen_index=rated,
                ranking=ranking or None,
                model_versions=versions,
                **common,
            )
        )
    if judgment.score is not None:
        ratings.append(
            rec.make_rating(
                task.prompt_value,
                texts[rated],
                float(judgment.score),
                scale=RATING_SCALE,
                model_version=versions[rated],
                **common,
            )
        )
    for message in (*comparisons, *ratings):
        if task.prompt_id:
            message.prompt_id = task.prompt_id
    return comparisons, ratings
