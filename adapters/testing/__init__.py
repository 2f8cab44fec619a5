"""The standard adapter test suite: run it against your adapter to prove it keeps the contract.

Subclass :class:`AdapterContract` in your tests and provide its hooks (see docs/plugins.md,
"The standard test suite")::

    from adapters.testing import AdapterContract

    class TestMyAdapter(AdapterContract):
        adapter_class = MySource
        mapping = {"type": "com.acme.thing.changed", "entity": "thing", "key": ["id"]}

        def valid_config(self): ...
        def add_records(self, n): ...

Installing ``legacy-gateway`` also registers the pytest plugin :mod:`adapters.testing.plugin`
(entry point ``pytest11``), which marks every contract check ``adapter_contract`` so
``pytest -m adapter_contract`` runs only the suite. This package imports nothing heavy until one
of its names is used, so the plugin costs nothing in test runs that do not use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AdapterContract", "ContractHarness", "read_all"]

if TYPE_CHECKING:  # pragma: no cover
    from adapters.testing.contract import AdapterContract
    from adapters.testing.harness import ContractHarness, read_all


def __getattr__(name: str) -> Any:
    """Load the suite lazily: ``import adapters.testing`` (the pytest plugin) stays cheap."""
    if name == "AdapterContract":
        from adapters.testing.contract import AdapterContract

        return AdapterContract
    if name in ("ContractHarness", "read_all"):
        from adapters.testing import harness

        return getattr(harness, name)
    raise AttributeError(f"module 'adapters.testing' has no attribute {name!r}")
