"""Configuration of the feedback store service (section ``feedback``, env prefix ``RLHF_FEEDBACK_``).

The database URL comes, in increasing precedence, from the default (an SQLite file in the working directory),
the YAML file, ``RLHF_DATABASE_URL`` / ``RLHF_FEEDBACK_DATABASE_URL`` and ``--database-url``; or from a file
(``database_url_file``, e.g. a mounted Kubernetes secret), which wins when set.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from rlhf.core.config import ServerConfig, metrics_port_field, port_field


class FeedbackConfig(ServerConfig):
    """The feedback store server: database, limits and pool sizes."""

    section: ClassVar[str] = "feedback"

    port: int = port_field(50053)
    metrics_port: int = metrics_port_field(9093)
    database_url: str = Field(
        "sqlite:///./feedback.db",
        description="SQLAlchemy URL: sqlite:///path/to/file.db (default, embedded) or postgresql://user:pass@host:5432/db.",
        json_schema_extra={"secret": True},  # may carry the password: never dumped or logged
    )
    database_url_file: str | None = Field(
        None,
        description="File holding the database URL (e.g. a mounted secret with the password); overrides database_url.",
    )
    max_text_chars: int = Field(
        16384, ge=1, description="Longest accepted prompt, response, chat message or reason, in characters."
    )
    max_batch_size: int = Field(4096, ge=1, description="Most records accepted in one write request.")
    require_known_labelers: bool = Field(
        False,
        description="Reject records whose labeler_id was not added with AddLabelers (otherwise labelers are created on first use).",
    )
    db_threads: int = Field(
        4, ge=1, le=64, description="Threads running blocking database work (the event loop stays free)."
    )
    pool_size: int = Field(5, ge=1, description="Database connections kept open (PostgreSQL).")
    pool_max_overflow: int = Field(
        5, ge=0, description="Extra database connections opened under load (PostgreSQL)."
    )
    busy_timeout_seconds: float = Field(
        30.0, gt=0, description="How long a write waits for a locked SQLite database before failing."
    )
    export_page_size: int = Field(
        1000, ge=1, le=100000, description="Records read per database query while streaming an export."
    )
    stats_refresh_seconds: float = Field(
        15.0, gt=0, description="How often the store-size and record-count gauges are refreshed."
    )

    labeling_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="HTTP port of the labeling web page served next to the gRPC API (0 = pick a free port, -1 = off).",
    )
    labeling_host: str = Field("0.0.0.0", description="Address the labeling web page binds to.")
    labeling_tokens_file: str | None = Field(
        None,
        description="Labeler sign-in tokens, one 'LABELER_ID TOKEN' pair per line (# comments); re-read when it changes.",
    )
    labeling_admins: list[str] = Field(
        default_factory=list,
        description="Labeler ids that may open the overview page and export (so may anyone signing in with a service auth token).",
    )
    labeling_secret_key_file: str | None = Field(
        None,
        description="File with the key that signs session cookies (default: a random key, sign-ins end on restart).",
    )
    labeling_lease_seconds: float = Field(
        1800.0, gt=0, description="How long a labeler holds a task before it may go to someone else."
    )
    labeling_low_agreement: float = Field(
        0.6, ge=0, le=1, description="Overview: flag labelers whose pairwise agreement is below this."
    )
    labeling_min_pairs: int = Field(
        5, ge=1, description="Overview: judgment pairs a labeler needs before their agreement is judged."
    )

    def resolved_database_url(self) -> str:
        """The URL to connect to: the contents of database_url_file when set, else database_url."""
        if self.database_url_file:
            return Path(self.database_url_file).read_text().strip()
        return self.database_url
