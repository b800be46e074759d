"""The daemon's one HTTP address (aiohttp): /metrics and health, the message hub's ingest,
the web console (its JSON API and its page in `assets/`), the OpenAPI document, bearer
tokens.

May import: `flowd.admin` and down.
"""
