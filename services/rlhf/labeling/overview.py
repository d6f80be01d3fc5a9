"""How the labeling goes: a labeler's progress, and the overview for admins — judgments per labeler and
pairwise inter-labeler agreement on tasks judged more than once."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import sqlalchemy as sa

from rlhf.feedback.schema import labeling_assignments as assignments
from rlhf.feedback.schema import labeling_tasks as tasks


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


def judgments_needed(conn: sa.Connection) -> int:
    """Judgments the queue still waits for (the queue depth)."""
    q = sa.select(sa.func.coalesce(sa.func.sum(tasks.c.redundancy - tasks.c.judgments), 0))
    return int(conn.execute(q).scalar_one())


def progress(conn: sa.Connection, labeler_id: str, since_us: int, now: int) -> Progress:
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
        judgments_needed=judgments_needed(conn),
    )


def _task_counts(conn) -> tuple[int, int, int]:
    """(tasks, tasks still open, judgments still wanted)."""
    row = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.case((tasks.c.judgments < tasks.c.redundancy, 1), else_=0)), 0),
            sa.func.coalesce(sa.func.sum(tasks.c.redundancy - tasks.c.judgments), 0),
        )
    ).one()
    return int(row[0]), int(row[1]), int(row[2])


def _finished_assignments(conn) -> list:
    return conn.execute(
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


def agree(kind: str, a: tuple, b: tuple) -> bool:
    """Two judgments (choice, score) of a task agree: the same response chosen (comparison), or scores at
    most 1 apart (rating)."""
    (choice_a, score_a), (choice_b, score_b) = a, b
    return choice_a == choice_b if kind == "comparison" else abs((score_a or 0) - (score_b or 0)) <= 1


def _count_agreement(people: dict[str, LabelerSummary], by_task: dict[str, list]) -> tuple[int, int, int]:
    """(pairs, agreed pairs, tasks judged more than once); adds each labeler's pairs to ``people``."""
    pairs = agreed = multi = 0
    for judged in by_task.values():
        if len(judged) < 2:
            continue
        multi += 1
        for i in range(len(judged)):
            for j in range(i + 1, len(judged)):
                (a, kind, *answer_a), (b, _, *answer_b) = judged[i], judged[j]
                same = agree(kind, tuple(answer_a), tuple(answer_b))
                pairs += 1
                agreed += same
                for who in (a, b):
                    people[who].pairs += 1
                    people[who].agreed += same
    return pairs, agreed, multi


def overview(
    conn: sa.Connection, *, since_us: int, low_agreement: float = 0.6, min_pairs: int = 3
) -> Overview:
    """Judgments per labeler and pairwise agreement; a labeler's agreement is over every pair they are in."""
    rows = _finished_assignments(conn)
    tasks_total, tasks_open, needed = _task_counts(conn)
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
    pairs, agreed, multi = _count_agreement(people, by_task)
    summaries = sorted(people.values(), key=lambda p: (-p.done, p.labeler_id))
    return Overview(
        labelers=summaries,
        tasks_total=tasks_total,
        tasks_open=tasks_open,
        tasks_complete=tasks_total - tasks_open,
        judgments_total=sum(p.done for p in summaries),
        judgments_needed=needed,
        multi_judged_tasks=multi,
        pairs=pairs,
        agreed=agreed,
        low_agreement=[p for p in summaries if p.pairs >= min_pairs and p.agreement < low_agreement],
    )
