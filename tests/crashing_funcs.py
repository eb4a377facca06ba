"""User functions for the worker-death tests, importable as `tests.crashing_funcs:NAME`.

Only for the processes backend: on sync or threads, `os._exit` would end the test run.
"""

from __future__ import annotations

import os
from typing import Any


def exit_on(record: dict, image: Any, marker: str) -> dict:
    """Kill the worker process (as a native crash or the OOM killer would) on the item whose
    URL contains `marker`; pass every other item on unchanged."""
    if marker in record["url"]:
        os._exit(1)
    return {}
