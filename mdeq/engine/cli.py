"""What the commands share: ``KEY=VALUE`` options, and an error told in one line with the right exit code.

Why: a researcher who mistypes a config key, a path or an option should read one line that says what was
expected, not a traceback (exit code 2 for bad input, 1 for a fault; ``--traceback`` or
``MDEQ_TRACEBACK=1`` shows the stack).
"""
from __future__ import annotations

from typing import Any, Sequence

import yaml

from mdeq.engine.checkpoint import CheckpointError
from mdeq.engine.rundir import RunFolderInUse

__all__ = ["TRACEBACK_ENV", "parse_kv", "is_input_error", "one_line", "error_line"]


TRACEBACK_ENV = "MDEQ_TRACEBACK"  # set to 1: python -m mdeq.train prints the stack with an error



def parse_kv(items: Sequence[str], flag: str = "--data-option") -> dict[str, Any]:
    out = {}
    for text in items:
        if "=" not in text:
            raise ValueError(f"{flag} must look like KEY=VALUE, got {text!r}")
        k, v = text.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as exc:
            raise ValueError(f"{flag} {text!r}: the value is not valid YAML "
                             f"({getattr(exc, 'problem', None) or exc})") from None
    return out



def is_input_error(err: BaseException) -> bool:
    """Bad input (exit code 2): the config, the options, the data, the run folder; anything else is a fault (1)."""
    from mdeq.engine.data import DatasetIntegrityError

    return isinstance(err, (ValueError, FileExistsError, FileNotFoundError, DatasetIntegrityError, CheckpointError,
                            RunFolderInUse))



def one_line(err: BaseException) -> str:
    """The error as one line: its own summary, a DataLoader worker's original error, or the first line."""
    text = (getattr(err, "summary", None) or str(err)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its error is the last line
        name, sep, rest = lines[-1].partition(": ")
        return rest if sep and " " not in name else lines[-1]
    return lines[0] + (" [...]" if len(lines) > 1 else "")



def error_line(err: BaseException) -> str:
    line = one_line(err)
    if is_input_error(err) or isinstance(err, (FloatingPointError, OSError)):
        return f"error: {line}"
    return f"error: {type(err).__name__}: {line} (--traceback or {TRACEBACK_ENV}=1 shows where)"
