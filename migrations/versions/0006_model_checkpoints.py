"""model checkpoints: the learned state of stateful models, one row per model version and scorer process

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import gateway.store.types

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'model_checkpoints',
        sa.Column('model_name', sa.String(length=128), nullable=False),
        sa.Column('model_version', sa.String(length=64), nullable=False),
        sa.Column('instance', sa.String(length=128), nullable=False,
                  comment='The writing scorer process (hostname-pid-id)'),
        # Several MB for a model that learned many categorical values: MariaDB's TEXT holds 64 KB.
        sa.Column('state', sa.Text().with_variant(mysql.LONGTEXT(), 'mysql', 'mariadb'), nullable=False,
                  comment="The model's state_dict() as JSON"),
        sa.Column('events_seen', sa.BigInteger(), nullable=False, comment='Events the state has learned from'),
        sa.Column('saved_at', gateway.store.types.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('model_name', 'model_version', 'instance', name=op.f('pk_model_checkpoints')),
    )


def downgrade() -> None:
    op.drop_table('model_checkpoints')
