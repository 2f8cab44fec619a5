"""source run now: the source_run_requests table, the operators' "poll at once" wishes

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gateway.store.types

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'source_run_requests',
        sa.Column('source_name', sa.String(length=128), nullable=False),
        sa.Column('requested_at', gateway.store.types.UTCDateTime(), nullable=False,
                  comment='Time of the last run-now request'),
        sa.Column('requested_by', sa.String(length=255), nullable=True,
                  comment='Who asked: API key name or cli:<os user>'),
        sa.PrimaryKeyConstraint('source_name', name=op.f('pk_source_run_requests')),
    )


def downgrade() -> None:
    op.drop_table('source_run_requests')
