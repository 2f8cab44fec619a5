"""The REST API's store behaviour against a real PostgreSQL store.

The test functions are the SQLite suite's own (imported, so they are collected here too); the
``store`` fixture below swaps the store under them for a fresh, migrated PostgreSQL database.
Run with ``GATEWAY_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test``.
"""

from __future__ import annotations

import pytest

from gateway.store import EventStore
from tests.unit.test_api import (  # noqa: F401  (fixtures and tests re-collected here)
    client,
    test_accept_batch_in_request_order,
    test_accept_one_event,
    test_backlog_over_threshold_is_503_and_accepts_nothing,
    test_events_parse_with_cloudevents_sdk,
    test_get_includes_scores,
    test_get_unknown_event_is_404_problem,
    test_healthz_and_readyz,
    test_invalid_batch_lists_every_error_and_accepts_nothing,
    test_list_filters,
    test_list_pagination_three_pages,
    test_metrics,
    test_on_accept_runs_after_commit_only_for_new_events,
    test_retry_is_idempotent,
    test_traceparent_header_is_kept,
)

from tests.unit.test_api_auth import (  # noqa: F401,E402  (auth tests re-collected on PostgreSQL)
    test_lists_are_filtered_to_the_allowed_sources_across_pages,
    test_only_a_digest_is_stored,
    test_revoked_key_is_401_at_once,
    test_route_matrix_no_key_401_wrong_scope_403_other_source_404,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def store(pg_store: EventStore) -> EventStore:
    """The store under test: PostgreSQL."""
    return pg_store
