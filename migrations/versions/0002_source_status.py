"""source status: runner state, operator wishes and drift baseline per source

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 10:00:00.000000
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa
import gateway.store.types


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('source_status',
    sa.Column('source_name', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False, comment='Runner state (idle, polling, paused, failed...)'),
    sa.Column('owner', sa.String(length=255), nullable=True, comment='hostname:pid:runner-id of the reporting runner'),
    sa.Column('epoch', sa.BigInteger(), nullable=True, comment='Fencing epoch of the reporting runner'),
    sa.Column('last_poll_at', gateway.store.types.UTCDateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('polls', sa.BigInteger(), nullable=False, comment='Since the reporting runner started'),
    sa.Column('events_accepted', sa.BigInteger(), nullable=False),
    sa.Column('duplicates', sa.BigInteger(), nullable=False),
    sa.Column('rejected', sa.BigInteger(), nullable=False),
    sa.Column('breaker', sa.JSON(), nullable=True, comment='Circuit breaker snapshot'),
    sa.Column('fingerprint', sa.String(length=255), nullable=True, comment="Baseline digest of the source's schema"),
    sa.Column('fingerprint_parts', sa.JSON(), nullable=True, comment='Baseline: part name -> digest'),
    sa.Column('fingerprint_at', gateway.store.types.UTCDateTime(), nullable=True),
    sa.Column('drift', sa.JSON(), nullable=True, comment='Current schema drift against the baseline, or null'),
    sa.Column('desired_state', sa.String(length=16), server_default='running', nullable=False),
    sa.Column('desired_generation', sa.BigInteger(), server_default='0', nullable=False, comment='Bumped by every operator command; a failed source resumes on a newer one'),
    sa.Column('desired_at', gateway.store.types.UTCDateTime(), nullable=True, comment='Time of the last operator command'),
    sa.Column('updated_at', gateway.store.types.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('source_name', name=op.f('pk_source_status'))
    )


def downgrade() -> None:
    op.drop_table('source_status')
