"""dead letter replay: replay state per dead letter, broker DLQ message identity, event id index

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 19:40:00.000000
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa
import gateway.store.types


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite cannot add constraints or drop columns in place, and it is a no-op elsewhere.
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.alter_column('stage', existing_type=sa.String(length=32), existing_nullable=False,
                              comment='source | scoring | bridge | broker | relay | ingest',
                              existing_comment='source | relay | scoring | ingest')
        batch_op.add_column(sa.Column('replayed_at', gateway.store.types.UTCDateTime(), nullable=True, comment='Last successful replay; null while open'))
        batch_op.add_column(sa.Column('replay_count', sa.Integer(), server_default='0', nullable=False, comment='Replay attempts'))
        batch_op.add_column(sa.Column('last_replay_at', gateway.store.types.UTCDateTime(), nullable=True, comment='Time of the last replay attempt'))
        batch_op.add_column(sa.Column('last_replay_outcome', sa.String(length=16), nullable=True, comment='requeued | accepted | failed'))
        batch_op.add_column(sa.Column('last_replay_detail', sa.Text(), nullable=True, comment='Event ids replayed, or why the replay failed'))
        batch_op.add_column(sa.Column('dedupe_key', sa.String(length=64), nullable=True, comment='Identity of a broker DLQ message (SHA-256)'))
        batch_op.create_unique_constraint(batch_op.f('uq_dead_letters_dedupe_key'), ['dedupe_key'])
        batch_op.create_index(batch_op.f('ix_dead_letters_event_id'), ['event_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dead_letters_event_id'))
        batch_op.drop_constraint(batch_op.f('uq_dead_letters_dedupe_key'), type_='unique')
        batch_op.drop_column('dedupe_key')
        batch_op.drop_column('last_replay_detail')
        batch_op.drop_column('last_replay_outcome')
        batch_op.drop_column('last_replay_at')
        batch_op.drop_column('replay_count')
        batch_op.drop_column('replayed_at')
        batch_op.alter_column('stage', existing_type=sa.String(length=32), existing_nullable=False,
                              comment='source | relay | scoring | ingest',
                              existing_comment='source | scoring | bridge | broker | relay | ingest')
