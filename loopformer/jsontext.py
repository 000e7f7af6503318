"""JSON text read from files a user (or something else) may have written: `loads` is `json.loads` with one more
kind of malformed JSON answered as malformed.

A document nested past Python's recursion limit (a file of 100,000 ``[``) made `json.loads` raise RecursionError,
which no reader caught: a traceback from every command that reads such a file (a probe, a corpus line, a run's
`config_changes.jsonl` or `metrics.jsonl`, a Hugging Face `config.json`, a bench record; #27 pass 24). Here it is a
`json.JSONDecodeError` (a ValueError), which each reader already turns into its one line.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """``json.loads(text, **kwargs)``; a document nested too deeply for Python is a `json.JSONDecodeError`."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        doc = text if isinstance(text, str) else ""
        raise json.JSONDecodeError("nested too deeply (arrays or objects inside each other past Python's recursion "
                                   "limit)", doc, 0) from None
