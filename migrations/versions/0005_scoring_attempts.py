"""scoring attempts: started-but-unfinished scoring attempts of redelivered events (crash loops)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 20:00:00.000000
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa
import gateway.store.types


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'scoring_attempts',
        sa.Column('event_id', sa.String(length=64), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False, comment='Started attempts that did not finish'),
        sa.Column('updated_at', gateway.store.types.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('event_id', name=op.f('pk_scoring_attempts')),
    )


def downgrade() -> None:
    op.drop_table('scoring_attempts')
