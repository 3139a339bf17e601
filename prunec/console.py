"""The rich console the command-line tools print to (shared by :mod:`prunec.cli` and
:mod:`prunec.demo`, which imports nothing of the cli)."""
from __future__ import annotations


def console(stderr: bool = False):
    """A rich Console without highlighting; 160 columns when not a terminal."""
    from rich.console import Console

    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal:
        c.width = 160  # pipes and logs: do not wrap tables at 80 columns
    return c
