"""Output helpers shared by commands: JSON for machines, rich tables for people, progress bars for long work."""
from __future__ import annotations

import json
import sys
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=False)
err_console = Console(stderr=True)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print `data` as JSON (stdout, nothing else) or through `render` for a terminal."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
    else:
        render(data)


def _json_default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__fspath__"):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def progress(disable: bool = False) -> Progress:
    """A progress bar on stderr (stdout stays clean for --json)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err_console, disable=disable, transient=False)


def human_size(n: int) -> str:
    """Bytes as the largest binary unit that keeps at least 1 (1.5 GiB, 27.0 MiB, 12 B)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def plain(text: str = "") -> None:
    """Plain stdout: commands meant to be copied must never be wrapped or styled."""
    sys.stdout.write(text + "\n")
