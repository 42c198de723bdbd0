"""One way to make a rich progress bar, for every long job in gfs (training, fine-tuning,
calibration, gfs.prune's groups, the studies)."""

from __future__ import annotations


def progress_bar(description: str = "{task.description}", *fields: str, remaining: bool = False, **options):
    """A rich Progress: ``description``, the bar, done / total, one text column per ``fields``
    (rich format strings such as ``"loss {task.fields[loss]:.4f}"``), the elapsed time and, with
    ``remaining``, the time left. ``options`` go to rich.progress.Progress (console, transient)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(description), BarColumn(), MofNCompleteColumn(), *map(TextColumn, fields)]
    columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, **options)
