"""What Redis's replies are made of, as flowd reads them: a stream entry (`Entry`) and the
text of a reply value (`text`). Every layer that reads Redis takes both from here, so an
entry has one shape from the read to the commit.

Guarantees: `text` gives bytes as the text they encode (UTF-8; `errors` as `bytes.decode`)
and anything else as `str()` of it; an `Entry` is `(id, flat)` as the server sent it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Entry", "text"]

Entry = tuple[str, list[bytes] | None]  # id, flat [field, value, ...]; None once deleted


def text(value: Any, errors: str = "strict") -> str:
    """`value` from a Redis reply as text: bytes decoded, anything else as str()."""
    return value.decode(errors=errors) if isinstance(value, bytes) else str(value)
