"""Seeds derived from names, identical on every machine and Python (the builtin hash() is salted per process)."""
from __future__ import annotations

import hashlib


def stable_seed(*parts) -> int:
    """A 32-bit seed from its parts, joined by ':': the same parts give the same seed everywhere, so a rerun
    renders and samples the same bytes whatever the batching."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")
