"""Source adapters: the plugin API (``adapters.base``) and the built-in adapters."""
