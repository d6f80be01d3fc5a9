"""The labeling queue: tasks waiting for human judgments, handed out to labelers, judged into the store.

A *task* is a prompt with 2+ responses to compare (kind ``comparison``) or 1 response to rate on the 1-7 scale
(kind ``rating``). It wants ``redundancy`` judgments, each from a different labeler. Tasks are served first in,
first out.

Assignment. Asking for work (:meth:`LabelingQueue.next_task`) returns the labeler's open assignment if the
lease is still running, else claims the oldest task that (a) this labeler has never been given and (b) has
fewer than ``redundancy`` *active* assignments (done, or assigned with a running lease). A row per
(task, labeler) is kept forever, so a labeler never sees a task twice, and the count is taken under a lock on
the task row: PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED`` (concurrent labelers skip each other's
candidate rows instead of queueing behind them; the count runs as a fresh statement after the lock is held,
so it sees every earlier claim), SQLite ``BEGIN IMMEDIATE`` (one writer at a time). A lease that runs out
frees its slot for another labeler; a late submit is still accepted while the task has room, and refused
(FAILED_PRECONDITION) once someone else took the slot. So a task never collects more than ``redundancy``
judgments.

Judgments. :meth:`LabelingQueue.submit` builds ``rlhf.v1`` Comparison / Rating messages, validates them with the
store's validators and writes them with the store's idempotent record path, in the same transaction that marks
the assignment done. The idempotency key is derived from (task, labeler), so a double click, a resubmitted
form or a reload writes nothing new; a second submit with a *different* answer is ALREADY_EXISTS (the first
answer stands). The call returns only after the transaction committed durably.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from rlhf.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from rlhf.core.prompt_proto import make_prompt
from rlhf.feedback import records as rec
from rlhf.feedback import validation as val
from rlhf.feedback.schema import labeling_assignments as assignments
from rlhf.feedback.schema import labeling_tasks as tasks
from rlhf.feedback.schema import records
from rlhf.feedback.store import FeedbackStore
from rlhf.v1 import feedback_pb2

RATING_SCALE = (1, 7)
MAX_REDUNDANCY = 100
SOURCE = "labeling"


@dataclass
class TaskSpec:
    """A task to enqueue: a prompt (text or chat messages) and 1 (rate) or 2+ (compare) responses."""

    prompt: str | list[dict]
    responses: list[str | dict]  # text, or {"text": ..., "model_version": ...}
    idempotency_key: str = ""  # default: derived from the prompt and responses
    redundancy: int | None = None  # default: the queue's
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    prompt_id: str = ""  # a stored prompt record this task's prompt is (default: stored on enqueue)


@dataclass
class Task:
    id: str
    kind: str  # "comparison" | "rating"
    prompt: dict  # {"text": ...} | {"chat": [...]}
    responses: list[dict]  # [{"text", "model_version"?}, ...]
    prompt_id: str | None
    redundancy: int
    judgments: int
    source: str
    metadata: dict[str, str]
    lease_expires_us: int = 0

    @property
    def prompt_value(self) -> str | list[dict]:
        return self.prompt.get("text", self.prompt.get("chat"))


@dataclass
class Judgment:
    """A labeler's answer. Comparisons: ``chosen_index`` and/or a full ``ranking`` (best first), optional
    ``score`` (1-7) of the chosen response. Ratings: ``score`` (1-7, required)."""

    task_id: str
    labeler_id: str
    chosen_index: int | None = None
    ranking: list[int] | None = None
    score: int | None = None
    reason: str = ""


@dataclass
class SubmitResult:
    record_ids: list[str]
    created: bool  # False: this judgment was already stored (a replay)
    seconds: float | None  # time from assignment to the first submit (None for a replay)
    created_by_kind: dict[str, int] = field(default_factory=dict)  # records newly stored, by kind


@dataclass
class EnqueueResult:
    ids: list[str]
    created: int
    existing: int


@dataclass
class Progress:
    done_today: int
    done_total: int
    left_for_you: int  # tasks this labeler may still be given
    judgments_needed: int  # over the whole queue


@dataclass
class LabelerSummary:
    labeler_id: str
    done: int = 0
    skipped: int = 0
    done_today: int = 0
    pairs: int = 0  # judgments of the same task by this labeler and another one
    agreed: int = 0
    last_us: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None


@dataclass
class Overview:
    labelers: list[LabelerSummary]
    tasks_total: int
    tasks_open: int  # still wanting judgments
    tasks_complete: int
    judgments_total: int
    judgments_needed: int  # the queue depth
    multi_judged_tasks: int
    pairs: int
    agreed: int
    low_agreement: list[LabelerSummary]

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None


def task_id_for(key: str) -> str:
    return "task_" + rec.sha256_hex("task\0" + key)[:24]


def judgment_key(task_id: str, labeler_id: str) -> str:
    """The idempotency key of a labeler's judgment of a task (its comparison and its rating)."""
    return f"labeling:{task_id}:{labeler_id}"


def _now_us() -> int:
    return time.time_ns() // 1000


def _response(value, field_name: str) -> dict:
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        extra = set(value) - {"text", "model_version"}
        if extra:
            raise InvalidArgument(field_name, f"unknown fields {sorted(extra)}")
        out = {"text": value["text"]}
        if value.get("model_version"):
            out["model_version"] = str(value["model_version"])
        return out
    raise InvalidArgument(field_name, "a response is text or {'text': ..., 'model_version': ...}")


def candidate_query(labeler_id: str, now: int, tried: Sequence[str] = ()) -> sa.Select:
    """The oldest task ``labeler_id`` may claim: still open, never theirs, with a free slot (not in ``tried``).

    ``judgments < redundancy`` is written exactly as the predicate of the partial index
    ``ix_labeling_tasks_open_seq``, so the scan in ``seq`` order starts at the first open task.
    """
    mine = sa.select(assignments.c.task_id).where(
        assignments.c.task_id == tasks.c.id, assignments.c.labeler_id == labeler_id
    )
    active = (
        sa.select(sa.func.count())
        .select_from(assignments)
        .where(
            assignments.c.task_id == tasks.c.id,
            sa.or_(
                assignments.c.status == "done",
                sa.and_(assignments.c.status == "assigned", assignments.c.lease_expires_us > now),
            ),
        )
        .scalar_subquery()
    )
    q = sa.select(tasks).where(
        tasks.c.judgments < tasks.c.redundancy, ~sa.exists(mine), active < tasks.c.redundancy
    )
    if tried:
        q = q.where(tasks.c.id.not_in(tried))
    return q.order_by(tasks.c.seq).limit(1)


class LabelingQueue:
    """Tasks, assignments and judgments in a :class:`FeedbackStore`'s database."""

    def __init__(self, store: FeedbackStore, *, redundancy: int = 1, lease_seconds: float = 1800.0):
        if not 1 <= redundancy <= MAX_REDUNDANCY:
            raise ValueError(f"redundancy {redundancy} not in 1..{MAX_REDUNDANCY}")
        self.store = store
        self.redundancy = redundancy
        self.lease_us = int(lease_seconds * 1_000_000)
        self._pg = store.backend == "postgresql"

    # ---- transactions ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _claim_tx(self) -> Iterator[sa.Connection]:
        """PostgreSQL: a plain transaction (row locks do the work); SQLite: the serialized write one."""
        if self._pg:
            with self.store.engine.begin() as conn:
                yield conn
        else:
            with self.store.write_tx() as conn:
                yield conn

    def _lock_task(self, conn, task_id: str):
        q = sa.select(tasks).where(tasks.c.id == task_id)
        if self._pg:
            q = q.with_for_update()
        return conn.execute(q).mappings().first()

    @staticmethod
    def _active_count(conn, task_id: str, now: int, exclude: str | None = None) -> int:
        """Assignments that hold a slot: done, or assigned with a running lease."""
        q = (
            sa.select(sa.func.count())
            .select_from(assignments)
            .where(
                assignments.c.task_id == task_id,
                sa.or_(
                    assignments.c.status == "done",
                    sa.and_(assignments.c.status == "assigned", assignments.c.lease_expires_us > now),
                ),
            )
        )
        if exclude is not None:
            q = q.where(assignments.c.labeler_id != exclude)
        return conn.execute(q).scalar_one()

    # ---- enqueue --------------------------------------------------------------------------------------

    def _check_spec(self, spec: TaskSpec, i: int) -> tuple[str, dict, int]:
        limits = self.store.limits
        path = f"tasks[{i}]"
        prompt = make_prompt(spec.prompt)
        val.check_prompt(prompt, f"{path}.prompt", limits)
        if not isinstance(spec.responses, list | tuple) or not spec.responses:
            raise val.RecordError(f"{path}.responses", "give 1 response to rate or 2+ to compare", "bad_task")
        if len(spec.responses) > limits.max_responses:
            raise val.RecordError(
                f"{path}.responses",
                f"{len(spec.responses)} responses > limit {limits.max_responses}",
                "too_many_responses",
            )
        responses = [_response(r, f"{path}.responses[{j}]") for j, r in enumerate(spec.responses)]
        seen: dict[str, int] = {}
        for j, r in enumerate(responses):
            val.check_response(rec.response_message(r), f"{path}.responses[{j}]", limits)
            if r["text"] in seen:
                raise val.RecordError(
                    f"{path}.responses[{j}].text", f"identical to responses[{seen[r['text']]}]", "bad_task"
                )
            seen[r["text"]] = j
        redundancy = self.redundancy if spec.redundancy is None else spec.redundancy
        if not isinstance(redundancy, int) or not 1 <= redundancy <= MAX_REDUNDANCY:
            raise val.RecordError(
                f"{path}.redundancy", f"{redundancy!r} not in 1..{MAX_REDUNDANCY}", "bad_task"
            )
        val.check_key(spec.idempotency_key, f"{path}.idempotency_key", limits, required=False)
        val.check_string(spec.source, f"{path}.source", limits.max_short_chars, required=False)
        val.check_metadata(spec.metadata, f"{path}.metadata", limits)
        payload = {"prompt": rec.prompt_payload(prompt), "responses": responses}
        if spec.metadata:
            payload["metadata"] = dict(spec.metadata)
        key = spec.idempotency_key or "task:" + rec.sha256_hex(rec.canonical_json(payload))[:40]
        return key, payload, redundancy

    def enqueue(self, specs: Sequence[TaskSpec]) -> EnqueueResult:
        """Validate every task, store their prompts as prompt records, then add the tasks in one transaction.

        Idempotent: a task with a key already queued (an explicit key, or the same prompt and responses)
        creates nothing; an explicit key reused for a different task is ALREADY_EXISTS.
        """
        val.check_batch(specs, "tasks", self.store.limits)
        checked = [self._check_spec(spec, i) for i, spec in enumerate(specs)]
        new_prompts = [i for i, spec in enumerate(specs) if not spec.prompt_id]
        prompt_ids = [spec.prompt_id for spec in specs]
        if new_prompts:
            result = self.store.add_prompts(
                [
                    feedback_pb2.PromptRecord(
                        prompt=rec.prompt_message(checked[i][1]["prompt"]), source=specs[i].source or SOURCE
                    )
                    for i in new_prompts
                ]
            )
            for i, prompt_id in zip(new_prompts, result.ids, strict=True):
                prompt_ids[i] = prompt_id
        now = _now_us()
        values, seen = [], {}
        for i, ((key, payload, redundancy), spec, prompt_id) in enumerate(
            zip(checked, specs, prompt_ids, strict=True)
        ):
            if key in seen:
                if seen[key] != (payload, redundancy) and spec.idempotency_key:
                    raise AlreadyExists(
                        f"tasks[{i}].idempotency_key: {key[:80]!r} repeats with different content"
                    )
                continue
            seen[key] = (payload, redundancy)
            values.append(
                dict(
                    id=task_id_for(key),
                    idempotency_key=key,
                    kind="comparison" if len(payload["responses"]) >= 2 else "rating",
                    prompt_id=prompt_id,
                    payload=payload,
                    redundancy=redundancy,
                    judgments=0,
                    source=spec.source,
                    created_at_us=now,
                )
            )
        with self.store.write_tx() as conn:
            given = sorted({spec.prompt_id for spec in specs if spec.prompt_id})
            if given:
                found = set(
                    conn.execute(
                        sa.select(records.c.id).where(records.c.kind == "prompt", records.c.id.in_(given))
                    ).scalars()
                )
                for i, spec in enumerate(specs):
                    if spec.prompt_id and spec.prompt_id not in found:
                        raise InvalidArgument(f"tasks[{i}].prompt_id", f"no stored prompt {spec.prompt_id!r}")
            stmt = self.store._insert(tasks).on_conflict_do_nothing().returning(tasks.c.idempotency_key)
            inserted = set(conn.execute(stmt, values).scalars())
            replayed = [v for v in values if v["idempotency_key"] not in inserted]
            if replayed:
                stored = dict(
                    conn.execute(
                        sa.select(tasks.c.idempotency_key, tasks.c.payload).where(
                            tasks.c.idempotency_key.in_([v["idempotency_key"] for v in replayed])
                        )
                    ).all()
                )
                for v in replayed:
                    explicit = not v["idempotency_key"].startswith("task:")
                    same = rec.canonical_json(stored[v["idempotency_key"]]) == rec.canonical_json(
                        v["payload"]
                    )
                    if explicit and not same:
                        raise AlreadyExists(
                            f"tasks: idempotency_key {v['idempotency_key'][:80]!r} is already queued with a "
                            "different prompt or responses"
                        )
        ids = [task_id_for(key) for key, _, _ in checked]
        return EnqueueResult(ids=ids, created=len(inserted), existing=len(ids) - len(inserted))

    # ---- labeling -------------------------------------------------------------------------------------

    def get_task(self, task_id: str) -> Task:
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).mappings().first()
        if row is None:
            raise NotFound(f"task_id: no task {task_id[:80]!r}")
        return _task(row)

    def next_task(self, labeler_id: str) -> Task | None:
        """The labeler's open assignment, else a newly claimed task; None when nothing is left for them."""
        val.check_labeler_id(labeler_id, "labeler_id", required=True)
        for _ in range(5):  # a unique-key race with the same labeler in another tab: look again
            try:
                return self._next_task(labeler_id)
            except sa.exc.IntegrityError:
                continue
        raise FailedPrecondition("labeler_id: could not claim a task (concurrent claims); retry")

    def _next_task(self, labeler_id: str) -> Task | None:
        # Every transaction below locks at most one task row, so two claimers can never deadlock.
        now = _now_us()
        with self._claim_tx() as conn:
            current = conn.execute(
                sa.select(assignments.c.task_id, assignments.c.lease_expires_us)
                .where(assignments.c.labeler_id == labeler_id, assignments.c.status == "assigned")
                .order_by(assignments.c.assigned_at_us)
            ).all()
        for task_id, expires in current:
            with self._claim_tx() as conn:
                if expires > now:
                    row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).mappings().first()
                    return _task(row, expires)
                row = self._lock_task(conn, task_id)
                if self._active_count(conn, task_id, now, exclude=labeler_id) < row["redundancy"]:
                    self._set_assignment(conn, task_id, labeler_id, lease_expires_us=now + self.lease_us)
                    return _task(row, now + self.lease_us)
                self._set_assignment(conn, task_id, labeler_id, status="expired")
        tried: list[str] = []
        while True:
            q = candidate_query(labeler_id, now, tried)
            with self._claim_tx() as conn:
                if self._pg:
                    # Skip the rows other claimers hold; only when every candidate is held, wait for one
                    # (near the end of the queue, a held task may still have room once its claim commits).
                    row = conn.execute(q.with_for_update(skip_locked=True, of=tasks)).mappings().first()
                    if row is None:
                        row = conn.execute(q.with_for_update(of=tasks)).mappings().first()
                else:
                    row = conn.execute(q).mappings().first()
                if row is None:
                    return None
                # The row is locked now: count again in a new statement, which sees every claim committed
                # before we got the lock (the candidate query's snapshot may predate them).
                if self._active_count(conn, row["id"], now) >= row["redundancy"]:
                    tried.append(row["id"])
                    continue
                conn.execute(
                    assignments.insert().values(
                        task_id=row["id"],
                        labeler_id=labeler_id,
                        status="assigned",
                        assigned_at_us=now,
                        lease_expires_us=now + self.lease_us,
                    )
                )
                return _task(row, now + self.lease_us)

    @staticmethod
    def _set_assignment(conn, task_id: str, labeler_id: str, **values) -> None:
        conn.execute(
            assignments.update()
            .where(assignments.c.task_id == task_id, assignments.c.labeler_id == labeler_id)
            .values(**values)
        )

    def skip(self, task_id: str, labeler_id: str) -> None:
        """Give the task back: it goes to someone else, never again to this labeler."""
        with self._claim_tx() as conn:
            status = conn.execute(
                sa.select(assignments.c.status).where(
                    assignments.c.task_id == task_id, assignments.c.labeler_id == labeler_id
                )
            ).scalar()
            if status is None:
                raise FailedPrecondition(f"task_id: {task_id[:80]!r} is not assigned to {labeler_id!r}")
            if status == "done":
                raise FailedPrecondition(f"task_id: {task_id[:80]!r} is already judged by {labeler_id!r}")
            self._set_assignment(conn, task_id, labeler_id, status="skipped", completed_at_us=_now_us())

    def build_records(self, task: Task, judgment: Judgment) -> tuple[list, list]:
        """The Comparison and/or Rating messages of a judgment (validated by the store's checks later)."""
        limits = self.store.limits
        val.check_labeler_id(judgment.labeler_id, "labeler_id", required=True)
        val.check_string(judgment.reason, "reason", limits.max_text_chars, required=False)
        if judgment.score is not None and not RATING_SCALE[0] <= judgment.score <= RATING_SCALE[1]:
            raise InvalidArgument("score", f"{judgment.score} is not on the 1-7 scale")
        key = judgment_key(task.id, judgment.labeler_id)
        metadata = {"labeling_task_id": task.id}
        texts = [r["text"] for r in task.responses]
        versions = [r.get("model_version", "") for r in task.responses]
        comparisons, ratings = [], []
        if task.kind == "rating":
            if judgment.score is None:
                raise InvalidArgument("score", "required: rate the response from 1 to 7")
            if judgment.chosen_index not in (None, 0) or judgment.ranking:
                raise InvalidArgument("chosen_index", "a rating task has one response; nothing to choose")
            rated = 0
        else:
            ranking = list(judgment.ranking or [])
            chosen = judgment.chosen_index
            if chosen is None and not ranking:
                raise InvalidArgument("chosen_index", "required: pick the better response (or rank them all)")
            if chosen is not None and not 0 <= chosen < len(texts):
                raise InvalidArgument("chosen_index", f"{chosen} out of range for {len(texts)} responses")
            if ranking and sorted(ranking) != list(range(len(texts))):
                raise InvalidArgument(
                    "ranking", f"{ranking} does not rank each of the {len(texts)} responses once"
                )
            if ranking and chosen is not None and ranking[0] != chosen:
                raise InvalidArgument("ranking", "the response ranked first must be the one chosen")
            rated = chosen if chosen is not None else ranking[0]
            comparisons.append(
                rec.make_comparison(
                    task.prompt_value,
                    texts,
                    idempotency_key=key,
                    chosen_index=rated,
                    ranking=ranking or None,
                    labeler_id=judgment.labeler_id,
                    model_versions=versions,
                    reason=judgment.reason,
                    metadata=metadata,
                )
            )
        if judgment.score is not None:
            ratings.append(
                rec.make_rating(
                    task.prompt_value,
                    texts[rated],
                    float(judgment.score),
                    idempotency_key=key,
                    scale=RATING_SCALE,
                    labeler_id=judgment.labeler_id,
                    model_version=versions[rated],
                    reason=judgment.reason,
                    metadata=metadata,
                )
            )
        for message in (*comparisons, *ratings):
            if task.prompt_id:
                message.prompt_id = task.prompt_id
        return comparisons, ratings

    def submit(self, judgment: Judgment) -> SubmitResult:
        """Store a judgment (idempotent per task and labeler) and mark the assignment done, atomically."""
        task = self.get_task(judgment.task_id)
        comparisons, ratings = self.build_records(task, judgment)
        batches = []
        if comparisons:
            batches.append(("comparison", "comparisons", self.store.prepare("comparison", comparisons)))
        if ratings:
            batches.append(("rating", "ratings", self.store.prepare("rating", ratings)))
        labeler_id = judgment.labeler_id
        now = _now_us()
        new_labelers: list[str] = []
        with self.store.write_tx() as conn:
            row = self._lock_task(conn, task.id)
            assignment = (
                conn.execute(
                    sa.select(assignments).where(
                        assignments.c.task_id == task.id, assignments.c.labeler_id == labeler_id
                    )
                )
                .mappings()
                .first()
            )
            status = assignment["status"] if assignment else None
            if status is None:
                raise FailedPrecondition(f"task_id: {task.id!r} is not assigned to {labeler_id!r}")
            if status == "skipped":
                raise FailedPrecondition(f"task_id: {task.id!r} was skipped by {labeler_id!r}")
            if status != "done" and (status == "expired" or assignment["lease_expires_us"] <= now):
                # A late answer counts while the task still has room.
                if self._active_count(conn, task.id, now, exclude=labeler_id) >= row["redundancy"]:
                    raise FailedPrecondition(
                        f"task_id: the lease on {task.id!r} ran out and the task went to other labelers"
                    )
            ids: list[str] = []
            by_kind: dict[str, int] = {}
            for kind, field_name, rows in batches:
                result, made = self.store.write_rows(conn, kind, field_name, rows)
                ids.extend(result.ids)
                by_kind[kind] = result.created
                new_labelers.extend(made)
            created = sum(by_kind.values())
            if status == "done":
                if created:  # cannot happen unless the store was edited by hand; refuse to double count
                    raise AlreadyExists(f"task_id: {task.id!r} was already judged by {labeler_id!r}")
                seconds = None
            else:
                self._set_assignment(
                    conn,
                    task.id,
                    labeler_id,
                    status="done",
                    completed_at_us=now,
                    record_id=ids[0],
                    choice=None if task.kind == "rating" else comparisons[0].chosen_index,
                    score=judgment.score,
                )
                conn.execute(
                    tasks.update().where(tasks.c.id == task.id).values(judgments=tasks.c.judgments + 1)
                )
                seconds = max(0.0, (now - assignment["assigned_at_us"]) / 1e6)
        self.store.note_labelers(new_labelers)
        return SubmitResult(
            record_ids=ids, created=status != "done", seconds=seconds, created_by_kind=by_kind
        )

    # ---- progress and overview ------------------------------------------------------------------------

    def judgments_needed(self) -> int:
        """Judgments the queue still waits for (the queue depth)."""
        with self.store.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(tasks.c.redundancy - tasks.c.judgments), 0))
                ).scalar_one()
            )

    def progress(self, labeler_id: str, since_us: int) -> Progress:
        now = _now_us()
        with self.store.engine.connect() as conn:
            done = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(
                        sa.func.sum(sa.case((assignments.c.completed_at_us >= since_us, 1), else_=0)), 0
                    ),
                ).where(assignments.c.labeler_id == labeler_id, assignments.c.status == "done")
            ).one()
            mine = sa.select(assignments.c.task_id).where(
                assignments.c.task_id == tasks.c.id, assignments.c.labeler_id == labeler_id
            )
            open_for_me = conn.execute(
                sa.select(sa.func.count())
                .select_from(tasks)
                .where(tasks.c.judgments < tasks.c.redundancy, ~sa.exists(mine))
            ).scalar_one()
            assigned = conn.execute(
                sa.select(sa.func.count())
                .select_from(assignments)
                .where(
                    assignments.c.labeler_id == labeler_id,
                    assignments.c.status == "assigned",
                    assignments.c.lease_expires_us > now,
                )
            ).scalar_one()
        return Progress(
            done_today=int(done[1]),
            done_total=int(done[0]),
            left_for_you=int(open_for_me + assigned),
            judgments_needed=self.judgments_needed(),
        )

    def overview(self, *, since_us: int, low_agreement: float = 0.6, min_pairs: int = 3) -> Overview:
        """Judgments per labeler and pairwise inter-labeler agreement on tasks judged more than once.

        Two judgments of a comparison task agree when they chose the same response; of a rating task, when
        their scores differ by at most 1. A labeler's agreement is over every pair they are part of.
        """
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    assignments.c.task_id,
                    assignments.c.labeler_id,
                    assignments.c.status,
                    assignments.c.completed_at_us,
                    assignments.c.choice,
                    assignments.c.score,
                    tasks.c.kind,
                )
                .join(tasks, tasks.c.id == assignments.c.task_id)
                .where(assignments.c.status.in_(["done", "skipped"]))
            ).all()
            counts = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(
                        sa.func.sum(sa.case((tasks.c.judgments < tasks.c.redundancy, 1), else_=0)), 0
                    ),
                    sa.func.coalesce(sa.func.sum(tasks.c.redundancy - tasks.c.judgments), 0),
                )
            ).one()
        people: dict[str, LabelerSummary] = {}
        by_task: dict[str, list] = defaultdict(list)
        for task_id, labeler_id, status, completed, choice, score, kind in rows:
            person = people.setdefault(labeler_id, LabelerSummary(labeler_id))
            person.last_us = max(person.last_us, completed or 0)
            if status == "skipped":
                person.skipped += 1
                continue
            person.done += 1
            person.done_today += int((completed or 0) >= since_us)
            by_task[task_id].append((labeler_id, kind, choice, score))
        pairs = agreed = multi = 0
        for judged in by_task.values():
            if len(judged) < 2:
                continue
            multi += 1
            for i in range(len(judged)):
                for j in range(i + 1, len(judged)):
                    (a, kind, ca, sa_), (b, _, cb, sb) = judged[i], judged[j]
                    same = ca == cb if kind == "comparison" else abs((sa_ or 0) - (sb or 0)) <= 1
                    pairs += 1
                    agreed += same
                    for who in (a, b):
                        people[who].pairs += 1
                        people[who].agreed += same
        summaries = sorted(people.values(), key=lambda p: (-p.done, p.labeler_id))
        low = [p for p in summaries if p.pairs >= min_pairs and p.agreement < low_agreement]
        judgments_total = sum(p.done for p in summaries)
        return Overview(
            labelers=summaries,
            tasks_total=int(counts[0]),
            tasks_open=int(counts[1]),
            tasks_complete=int(counts[0]) - int(counts[1]),
            judgments_total=judgments_total,
            judgments_needed=int(counts[2]),
            multi_judged_tasks=multi,
            pairs=pairs,
            agreed=agreed,
            low_agreement=low,
        )

    def export_judgments(self) -> Iterator[feedback_pb2.ExportResponse]:
        """Comparisons and ratings written through the labeling queue, in commit order."""
        for response in self.store.export(kinds=["comparison", "rating"]):
            if "labeling_task_id" in rec.exported_record(response).metadata:
                yield response


# ---- task sources ----------------------------------------------------------------------------------------

TASK_FIELDS = ("prompt", "responses", "response", "idempotency_key", "redundancy", "source", "metadata")


def parse_task_line(obj, *, default_source: str = "") -> TaskSpec:
    """One JSONL task: ``{"prompt": P, "responses": [R, ...]}`` (compare) or ``{"prompt": P, "response": R}``
    (rate), optional ``idempotency_key``, ``redundancy``, ``source``, ``metadata``. P is text or a list of
    {"role", "content"}; R is text or {"text", "model_version"}."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(obj) - set(TASK_FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; a task has {', '.join(TASK_FIELDS)}")
    if "prompt" not in obj:
        raise ValueError("'prompt' is required")
    if ("responses" in obj) == ("response" in obj):
        raise ValueError("give 'responses' (a list, to compare) or 'response' (one, to rate)")
    responses = obj["responses"] if "responses" in obj else [obj["response"]]
    if not isinstance(responses, list):
        raise ValueError("'responses' must be a list")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) and not (
        isinstance(prompt, list)
        and all(isinstance(m, dict) and set(m) == {"role", "content"} for m in prompt)
    ):
        raise ValueError("'prompt' must be text or a list of {'role', 'content'} messages")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("'metadata' must map strings to strings")
    redundancy = obj.get("redundancy")
    if redundancy is not None and (not isinstance(redundancy, int) or isinstance(redundancy, bool)):
        raise ValueError("'redundancy' must be a whole number")
    return TaskSpec(
        prompt=prompt,
        responses=responses,
        idempotency_key=str(obj.get("idempotency_key", "")),
        redundancy=redundancy,
        source=str(obj.get("source", default_source)),
        metadata=metadata,
    )


def read_task_jsonl(lines, *, default_source: str = "") -> list[TaskSpec]:
    """Parse a JSONL file of tasks; the first bad line raises InvalidArgument naming it."""
    import json

    out = []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            out.append(parse_task_line(json.loads(text), default_source=default_source))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"line {line_no}", f"not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise InvalidArgument(f"line {line_no}", str(exc)) from None
    return out


def prompts_without_tasks(store: FeedbackStore, limit: int = 0) -> list[tuple[str, str | list[dict]]]:
    """Stored prompt records (id, prompt) that no labeling task uses yet, oldest first."""
    with store.engine.connect() as conn:
        used = set(conn.execute(sa.select(tasks.c.prompt_id).where(tasks.c.prompt_id.is_not(None))).scalars())
    out = []
    for response in store.export(kinds=["prompt"]):
        record = response.prompt
        if record.id in used:
            continue
        out.append((record.id, rec.prompt_value(record.prompt)))
        if limit and len(out) >= limit:
            break
    return out


def sample_tasks(
    client,
    prompts: Sequence[tuple[str, str | list[dict]]],
    *,
    responses: int = 2,
    batch_size: int = 8,
    source: str = "generation",
    **generate_kw,
) -> tuple[list[TaskSpec], int]:
    """Tasks from ``responses`` samples per stored prompt, drawn with a PolicyClient-like ``client``
    (``generate(prompts, n=..., **generate_kw)`` -> samples ordered by prompt then sample).

    Identical samples are merged; a prompt left with fewer distinct responses than asked for (e.g. one when
    two were wanted) is dropped. Returns (tasks, prompts dropped).
    """
    specs, dropped = [], 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        samples = client.generate([p for _, p in chunk], n=responses, **generate_kw)
        by_prompt: dict[int, list] = defaultdict(list)
        for sample in samples:
            by_prompt[sample.prompt_index].append(sample)
        for i, (prompt_id, prompt) in enumerate(chunk):
            texts, versions = [], []
            for sample in sorted(by_prompt[i], key=lambda s: s.sample_index):
                text = sample.text.strip()
                if text and text not in texts:
                    texts.append(text)
                    versions.append(str(sample.policy_version))
            if len(texts) < min(responses, 2) or not texts:
                dropped += 1
                continue
            specs.append(
                TaskSpec(
                    prompt=prompt,
                    responses=[
                        {"text": t, "model_version": f"policy-v{v}"}
                        for t, v in zip(texts, versions, strict=True)
                    ],
                    idempotency_key=f"sampled:{prompt_id}:" + rec.sha256_hex(rec.canonical_json(texts))[:16],
                    source=source,
                    prompt_id=prompt_id,
                )
            )
    return specs, dropped


def _task(row, lease_expires_us: int = 0) -> Task:
    payload = row["payload"]
    return Task(
        id=row["id"],
        kind=row["kind"],
        prompt=payload["prompt"],
        responses=payload["responses"],
        prompt_id=row["prompt_id"],
        redundancy=row["redundancy"],
        judgments=row["judgments"],
        source=row["source"],
        metadata=payload.get("metadata", {}),
        lease_expires_us=lease_expires_us,
    )
