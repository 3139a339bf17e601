"""Errors prunec reports to users as one line."""


class PruneError(Exception):
    """A problem with the user's input or a graph prunec refuses to rewrite."""
