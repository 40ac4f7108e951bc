"""The platform: API keys, the usage ledger at each model's price, and per-key rate limits.

`open_platform(...)` opens (and migrates) the database and returns a `Platform`;
`create_app(registry, platform=...)` wires it into the API. Without a platform the API runs
as before: open, unmetered. (Imported lazily: `k2serve keys` / `k2serve usage` load only the
database modules, not the serving stack.)
"""

__all__ = ["Platform", "open_platform"]


def __getattr__(name):
    if name in __all__:
        from k2serve.platform import service

        return getattr(service, name)
    raise AttributeError(name)
