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

Judgments. :meth:`LabelingQueue.submit` builds ``rlhf.v1`` Comparison / Rating messages (:mod:`.judgments`),
validates them with the store's validators and writes them with the store's idempotent record path, in the same
transaction that marks the assignment done. The idempotency key is derived from (task, labeler), so a double
click, a resubmitted form or a reload writes nothing new; a second submit with a *different* answer is
ALREADY_EXISTS (the first answer stands). The call returns only after the transaction committed durably.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import sqlalchemy as sa

from rlhf.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from rlhf.feedback import records as rec
from rlhf.feedback import validation as val
from rlhf.feedback.schema import labeling_assignments as assignments
from rlhf.feedback.schema import labeling_tasks as tasks
from rlhf.feedback.schema import records
from rlhf.feedback.store import FeedbackStore, WriteTransaction
from rlhf.labeling import overview as overview_
from rlhf.labeling.judgments import build_records
from rlhf.labeling.tasks import (
    MAX_REDUNDANCY,
    SOURCE,
    CheckedTask,
    EnqueueResult,
    Judgment,
    SubmitResult,
    Task,
    TaskSpec,
    check_task,
    task_from_row,
    task_id_for,
)
from rlhf.v1 import feedback_pb2


def _now_us() -> int:
    return time.time_ns() // 1000


def _holds_slot(now: int):
    """An assignment holds one of its task's slots: done, or assigned with a running lease."""
    return sa.or_(
        assignments.c.status == "done",
        sa.and_(assignments.c.status == "assigned", assignments.c.lease_expires_us > now),
    )


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
        .where(assignments.c.task_id == tasks.c.id, _holds_slot(now))
        .scalar_subquery()
    )
    q = sa.select(tasks).where(
        tasks.c.judgments < tasks.c.redundancy, ~sa.exists(mine), active < tasks.c.redundancy
    )
    if tried:
        q = q.where(tasks.c.id.not_in(tried))
    return q.order_by(tasks.c.seq).limit(1)


def active_count(tx: WriteTransaction, task_id: str, now: int, exclude: str | None = None) -> int:
    """Assignments that hold a slot of the task (of labelers other than ``exclude``)."""
    q = (
        sa.select(sa.func.count())
        .select_from(assignments)
        .where(assignments.c.task_id == task_id, _holds_slot(now))
    )
    if exclude is not None:
        q = q.where(assignments.c.labeler_id != exclude)
    return tx.execute(q).scalar_one()


def _set_assignment(tx: WriteTransaction, task_id: str, labeler_id: str, **values) -> None:
    tx.execute(
        assignments.update()
        .where(assignments.c.task_id == task_id, assignments.c.labeler_id == labeler_id)
        .values(**values)
    )


def _assignment(tx: WriteTransaction, task_id: str, labeler_id: str):
    q = sa.select(assignments).where(assignments.c.task_id == task_id, assignments.c.labeler_id == labeler_id)
    return tx.execute(q).mappings().first()


class LabelingQueue:
    """Tasks, assignments and judgments in a :class:`FeedbackStore`'s database."""

    def __init__(self, store: FeedbackStore, *, redundancy: int = 1, lease_seconds: float = 1800.0):
        if not 1 <= redundancy <= MAX_REDUNDANCY:
            raise ValueError(f"redundancy {redundancy} not in 1..{MAX_REDUNDANCY}")
        self.store = store
        self.redundancy = redundancy
        self.lease_us = int(lease_seconds * 1_000_000)
        self._pg = store.backend == "postgresql"

    def _claim_tx(self):
        """PostgreSQL: a plain transaction (row locks do the work); SQLite: the serialized write one."""
        return self.store.write_transaction(serialize=False)

    def _lock_task(self, tx: WriteTransaction, task_id: str):
        q = sa.select(tasks).where(tasks.c.id == task_id)
        if self._pg:
            q = q.with_for_update()
        return tx.execute(q).mappings().first()

    # ---- enqueue --------------------------------------------------------------------------------------

    def enqueue(self, specs: Sequence[TaskSpec]) -> EnqueueResult:
        """Validate every task, store their prompts as prompt records, then add the tasks in one transaction.

        Idempotent: a task with a key already queued (an explicit key, or the same prompt and responses)
        creates nothing; an explicit key reused for a different task is ALREADY_EXISTS.
        """
        val.check_batch(specs, "tasks", self.store.limits)
        checked = [check_task(spec, i, self.store.limits, self.redundancy) for i, spec in enumerate(specs)]
        prompt_ids = self._store_prompts(specs, checked)
        values = _task_rows(specs, checked, prompt_ids, _now_us())
        with self.store.write_transaction() as tx:
            _check_given_prompts(tx, specs)
            stmt = tx.insert(tasks).on_conflict_do_nothing().returning(tasks.c.idempotency_key)
            inserted = set(tx.execute(stmt, values).scalars())
            _check_replayed_tasks(tx, [v for v in values if v["idempotency_key"] not in inserted])
        ids = [task_id_for(c.key) for c in checked]
        return EnqueueResult(ids=ids, created=len(inserted), existing=len(ids) - len(inserted))

    def _store_prompts(self, specs: Sequence[TaskSpec], checked: list[CheckedTask]) -> list[str]:
        """Each task's prompt id: the one it names, else the id of its prompt stored as a prompt record."""
        new_prompts = [i for i, spec in enumerate(specs) if not spec.prompt_id]
        prompt_ids = [spec.prompt_id for spec in specs]
        if new_prompts:
            result = self.store.add_prompts(
                [
                    feedback_pb2.PromptRecord(
                        prompt=rec.prompt_message(checked[i].payload["prompt"]),
                        source=specs[i].source or SOURCE,
                    )
                    for i in new_prompts
                ]
            )
            for i, prompt_id in zip(new_prompts, result.ids, strict=True):
                prompt_ids[i] = prompt_id
        return prompt_ids

    # ---- labeling -------------------------------------------------------------------------------------

    def get_task(self, task_id: str) -> Task:
        with self.store.read_connection() as conn:
            row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).mappings().first()
        if row is None:
            raise NotFound(f"task_id: no task {task_id[:80]!r}")
        return task_from_row(row)

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
        return self._resume_assignment(labeler_id, now) or self._claim_new_task(labeler_id, now)

    def _resume_assignment(self, labeler_id: str, now: int) -> Task | None:
        """The labeler's assigned task: its lease still runs, or it ran out and the task still has room
        (the lease is renewed); an assignment whose slot went to someone else expires."""
        with self._claim_tx() as tx:
            current = tx.execute(
                sa.select(assignments.c.task_id, assignments.c.lease_expires_us)
                .where(assignments.c.labeler_id == labeler_id, assignments.c.status == "assigned")
                .order_by(assignments.c.assigned_at_us)
            ).all()
        for task_id, expires in current:
            with self._claim_tx() as tx:
                if expires > now:
                    row = tx.execute(sa.select(tasks).where(tasks.c.id == task_id)).mappings().first()
                    return task_from_row(row, expires)
                row = self._lock_task(tx, task_id)
                if active_count(tx, task_id, now, exclude=labeler_id) < row["redundancy"]:
                    _set_assignment(tx, task_id, labeler_id, lease_expires_us=now + self.lease_us)
                    return task_from_row(row, now + self.lease_us)
                _set_assignment(tx, task_id, labeler_id, status="expired")
        return None

    def _claim_new_task(self, labeler_id: str, now: int) -> Task | None:
        tried: list[str] = []
        while True:
            q = candidate_query(labeler_id, now, tried)
            with self._claim_tx() as tx:
                if self._pg:
                    # Skip the rows other claimers hold; only when every candidate is held, wait for one
                    # (near the end of the queue, a held task may still have room once its claim commits).
                    row = tx.execute(q.with_for_update(skip_locked=True, of=tasks)).mappings().first()
                    if row is None:
                        row = tx.execute(q.with_for_update(of=tasks)).mappings().first()
                else:
                    row = tx.execute(q).mappings().first()
                if row is None:
                    return None
                # The row is locked now: count again in a new statement, which sees every claim committed
                # before we got the lock (the candidate query's snapshot may predate them).
                if active_count(tx, row["id"], now) >= row["redundancy"]:
                    tried.append(row["id"])
                    continue
                tx.execute(
                    assignments.insert().values(
                        task_id=row["id"],
                        labeler_id=labeler_id,
                        status="assigned",
                        assigned_at_us=now,
                        lease_expires_us=now + self.lease_us,
                    )
                )
                return task_from_row(row, now + self.lease_us)

    def skip(self, task_id: str, labeler_id: str) -> None:
        """Give the task back: it goes to someone else, never again to this labeler."""
        with self._claim_tx() as tx:
            status = tx.execute(
                sa.select(assignments.c.status).where(
                    assignments.c.task_id == task_id, assignments.c.labeler_id == labeler_id
                )
            ).scalar()
            if status is None:
                raise FailedPrecondition(f"task_id: {task_id[:80]!r} is not assigned to {labeler_id!r}")
            if status == "done":
                raise FailedPrecondition(f"task_id: {task_id[:80]!r} is already judged by {labeler_id!r}")
            _set_assignment(tx, task_id, labeler_id, status="skipped", completed_at_us=_now_us())

    def build_records(self, task: Task, judgment: Judgment) -> tuple[list, list]:
        """The Comparison and/or Rating messages of a judgment (validated by the store's checks later)."""
        return build_records(task, judgment, self.store.limits)

    def submit(self, judgment: Judgment) -> SubmitResult:
        """Store a judgment (idempotent per task and labeler) and mark the assignment done, atomically."""
        task = self.get_task(judgment.task_id)
        comparisons, ratings = self.build_records(task, judgment)
        batches = []
        if comparisons:
            batches.append(("comparison", self.store.prepare("comparison", comparisons)))
        if ratings:
            batches.append(("rating", self.store.prepare("rating", ratings)))
        labeler_id = judgment.labeler_id
        now = _now_us()
        with self.store.write_transaction() as tx:
            assignment = self._open_assignment(tx, task.id, labeler_id, now)
            ids: list[str] = []
            by_kind: dict[str, int] = {}
            for kind, rows in batches:
                result = tx.write_records(kind, rows)
                ids.extend(result.ids)
                by_kind[kind] = result.created
            if assignment["status"] == "done":
                if sum(
                    by_kind.values()
                ):  # cannot happen unless the store was edited by hand; refuse to double count
                    raise AlreadyExists(f"task_id: {task.id!r} was already judged by {labeler_id!r}")
                return SubmitResult(record_ids=ids, created=False, seconds=None, created_by_kind=by_kind)
            chosen = None if task.kind == "rating" else comparisons[0].chosen_index
            _mark_done(tx, task.id, labeler_id, now, ids[0], chosen, judgment.score)
        seconds = max(0.0, (now - assignment["assigned_at_us"]) / 1e6)
        return SubmitResult(record_ids=ids, created=True, seconds=seconds, created_by_kind=by_kind)

    def _open_assignment(self, tx: WriteTransaction, task_id: str, labeler_id: str, now: int):
        """The labeler's assignment of the (now locked) task, if a judgment of it may be stored."""
        row = self._lock_task(tx, task_id)
        assignment = _assignment(tx, task_id, labeler_id)
        status = assignment["status"] if assignment else None
        if status is None:
            raise FailedPrecondition(f"task_id: {task_id!r} is not assigned to {labeler_id!r}")
        if status == "skipped":
            raise FailedPrecondition(f"task_id: {task_id!r} was skipped by {labeler_id!r}")
        if status != "done" and (status == "expired" or assignment["lease_expires_us"] <= now):
            # A late answer counts while the task still has room.
            if active_count(tx, task_id, now, exclude=labeler_id) >= row["redundancy"]:
                raise FailedPrecondition(
                    f"task_id: the lease on {task_id!r} ran out and the task went to other labelers"
                )
        return assignment

    # ---- progress and overview ------------------------------------------------------------------------

    def judgments_needed(self) -> int:
        """Judgments the queue still waits for (the queue depth)."""
        with self.store.read_connection() as conn:
            return overview_.judgments_needed(conn)

    def progress(self, labeler_id: str, since_us: int) -> overview_.Progress:
        with self.store.read_connection() as conn:
            return overview_.progress(conn, labeler_id, since_us, _now_us())

    def overview(
        self, *, since_us: int, low_agreement: float = 0.6, min_pairs: int = 3
    ) -> overview_.Overview:
        """Judgments per labeler and pairwise inter-labeler agreement on tasks judged more than once.

        Two judgments of a comparison task agree when they chose the same response; of a rating task, when
        their scores differ by at most 1. A labeler's agreement is over every pair they are part of.
        """
        with self.store.read_connection() as conn:
            return overview_.overview(
                conn, since_us=since_us, low_agreement=low_agreement, min_pairs=min_pairs
            )

    def export_judgments(self) -> Iterator[feedback_pb2.ExportResponse]:
        """Comparisons and ratings written through the labeling queue, in commit order."""
        for response in self.store.export(kinds=["comparison", "rating"]):
            if "labeling_task_id" in rec.exported_record(response).metadata:
                yield response


def _task_rows(
    specs: Sequence[TaskSpec], checked: list[CheckedTask], prompt_ids: list[str], now: int
) -> list[dict]:
    """The rows of the batch's tasks, one per key; a repeated explicit key with other content is refused."""
    values, seen = [], {}
    for i, (task, spec, prompt_id) in enumerate(zip(checked, specs, prompt_ids, strict=True)):
        if task.key in seen:
            if seen[task.key] != (task.payload, task.redundancy) and spec.idempotency_key:
                raise AlreadyExists(
                    f"tasks[{i}].idempotency_key: {task.key[:80]!r} repeats with different content"
                )
            continue
        seen[task.key] = (task.payload, task.redundancy)
        values.append(
            dict(
                id=task_id_for(task.key),
                idempotency_key=task.key,
                kind="comparison" if len(task.payload["responses"]) >= 2 else "rating",
                prompt_id=prompt_id,
                payload=task.payload,
                redundancy=task.redundancy,
                judgments=0,
                source=spec.source,
                created_at_us=now,
            )
        )
    return values


def _check_given_prompts(tx: WriteTransaction, specs: Sequence[TaskSpec]) -> None:
    """Every prompt id a task names is a stored prompt record."""
    given = sorted({spec.prompt_id for spec in specs if spec.prompt_id})
    if not given:
        return
    found = set(
        tx.execute(
            sa.select(records.c.id).where(records.c.kind == "prompt", records.c.id.in_(given))
        ).scalars()
    )
    for i, spec in enumerate(specs):
        if spec.prompt_id and spec.prompt_id not in found:
            raise InvalidArgument(f"tasks[{i}].prompt_id", f"no stored prompt {spec.prompt_id!r}")


def _check_replayed_tasks(tx: WriteTransaction, replayed: list[dict]) -> None:
    """A task whose key was queued before: fine with the same content (or a derived key), else refused."""
    if not replayed:
        return
    stored = dict(
        tx.execute(
            sa.select(tasks.c.idempotency_key, tasks.c.payload).where(
                tasks.c.idempotency_key.in_([v["idempotency_key"] for v in replayed])
            )
        ).all()
    )
    for v in replayed:
        explicit = not v["idempotency_key"].startswith("task:")
        same = rec.canonical_json(stored[v["idempotency_key"]]) == rec.canonical_json(v["payload"])
        if explicit and not same:
            raise AlreadyExists(
                f"tasks: idempotency_key {v['idempotency_key'][:80]!r} is already queued with a "
                "different prompt or responses"
            )


def _mark_done(tx: WriteTransaction, task_id, labeler_id, now, record_id, choice, score) -> None:
    _set_assignment(
        tx,
        task_id,
        labeler_id,
        status="done",
        completed_at_us=now,
        record_id=record_id,
        choice=choice,
        score=score,
    )
    tx.execute(tasks.update().where(tasks.c.id == task_id).values(judgments=tasks.c.judgments + 1))
