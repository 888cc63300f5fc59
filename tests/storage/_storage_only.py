"""Import the storage layer alone, as a process that only reads or commits scores does.

The package's face is lazy, so ``import infobatch_stream.storage`` loads neither torch nor
webdataset (DESIGN.md: the storage layer knows nothing of them). The helper scripts that
tests run in fresh interpreters import it that way, which keeps them fast and checks the
layering: ``assert_storage_only()`` fails if torch or webdataset got imported anyway.
"""

from __future__ import annotations

import sys


def import_storage():
    """The ``infobatch_stream.storage`` module, imported the plain way."""
    import infobatch_stream.storage as storage

    return storage


def assert_storage_only() -> None:
    heavy = [name for name in ("torch", "webdataset") if name in sys.modules]
    assert not heavy, f"the storage layer imported {heavy}"
