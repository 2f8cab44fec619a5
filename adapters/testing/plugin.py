"""The pytest plugin of the standard adapter suite (entry point ``pytest11``: ``gateway-adapters``).

It is loaded by every pytest run in an environment where ``legacy-gateway`` is installed, so it
imports only pytest. It registers the ``adapter_contract`` marker and puts it on every check a
test class inherits from :class:`adapters.testing.AdapterContract`, so ``pytest -m
adapter_contract`` selects the standard suite and ``-m "not adapter_contract"`` the rest.
"""

from __future__ import annotations

import sys

import pytest

MARKER = "adapter_contract"


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker (``--strict-markers`` runs accept it)."""
    config.addinivalue_line("markers", f"{MARKER}: a check of the standard adapter suite (adapters.testing)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the checks of :class:`AdapterContract` subclasses ``adapter_contract``."""
    contract = sys.modules.get("adapters.testing.contract")
    if contract is None:  # nobody imported the suite: nothing to mark
        return
    base = contract.AdapterContract
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and issubclass(cls, base) and hasattr(base, item.originalname if isinstance(item, pytest.Function) else item.name):
            item.add_marker(MARKER)
