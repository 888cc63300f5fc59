"""Import the storage layer alone, as a process that only reads or commits scores does.

The package's ``__init__`` also imports the training side (torch, webdataset: seconds per
process). The storage layer needs neither (DESIGN.md: it knows nothing of torch or
webdataset), so the helper scripts that tests run in fresh interpreters load it under a bare
package module, which keeps them fast and checks that layering: ``assert_storage_only()``
fails if torch or webdataset got imported anyway.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def import_storage():
    """The ``infobatch_stream.storage`` module, without running the package's ``__init__``."""
    if "infobatch_stream" not in sys.modules:
        spec = importlib.util.find_spec("infobatch_stream")
        package = types.ModuleType("infobatch_stream")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["infobatch_stream"] = package
    import infobatch_stream.storage as storage

    return storage


def assert_storage_only() -> None:
    heavy = [name for name in ("torch", "webdataset") if name in sys.modules]
    assert not heavy, f"the storage layer imported {heavy}"
