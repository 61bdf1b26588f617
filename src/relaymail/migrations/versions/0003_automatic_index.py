"""Index the automatic messages of each pair by time.

The automatic-message cap counts a pair's automatic messages in a window on
every message of that pair. With only the (pair_id, received_at) index that
count reads every message of the pair in the window; this partial index
holds the automatic ones only.

Revision ID: 0003
Revises: 0002
Created: 2026-12-04
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # SQLite uses a partial index only when the query repeats its condition,
    # so the query compares with 1 (SQLite) or tests the column (PostgreSQL).
    op.create_index(
        "ix_messages_pair_automatic",
        "messages",
        ["pair_id", "received_at"],
        sqlite_where=sa.text("automatic = 1"),
        postgresql_where=sa.text("automatic"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_pair_automatic", table_name="messages")
