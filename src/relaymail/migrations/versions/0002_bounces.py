"""Add bounce_reports and undeliverable_addresses.

bounce_reports holds one row per report that arrived at a bounce address (a
DSN, another bounce, a feedback report or an automatic reply), linked to the
archived report and to the delivery its bounce token names.
undeliverable_addresses counts hard bounces per lower-cased recipient address.
Like 0001, timestamps are plain DateTime columns with naive UTC values and
defaults are Python-side.

Revision ID: 0002
Revises: 0001
Created: 2026-12-04
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "bounce_reports",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("message_id", BIG_ID, nullable=False),
        sa.Column("delivery_id", BIG_ID, nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("recipient", sa.String(length=320), nullable=False),
        sa.Column("diagnostic", sa.Text(), nullable=False),
        sa.Column("reporting_mta", sa.String(length=255), nullable=False),
        sa.Column("feedback_type", sa.String(length=32), nullable=False),
        sa.Column("effect", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["delivery_id"], ["deliveries.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_bounce_reports_message_id"), "bounce_reports", ["message_id"])
    op.create_index(op.f("ix_bounce_reports_delivery_id"), "bounce_reports", ["delivery_id"])
    op.create_index(op.f("ix_bounce_reports_created_at"), "bounce_reports", ["created_at"])

    op.create_table(
        "undeliverable_addresses",
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("hard_bounces", sa.Integer(), nullable=False),
        sa.Column("window_started_at", sa.DateTime(), nullable=False),
        sa.Column("last_bounce_at", sa.DateTime(), nullable=False),
        sa.Column("last_status", sa.String(length=16), nullable=False),
        sa.Column("last_diagnostic", sa.Text(), nullable=False),
        sa.Column("undeliverable_since", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("address"),
    )


def downgrade() -> None:
    op.drop_table("undeliverable_addresses")
    op.drop_table("bounce_reports")
