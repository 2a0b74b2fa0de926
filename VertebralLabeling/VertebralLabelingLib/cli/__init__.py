"""The ``vertebral-labeling`` command line: one file per part (``main``: the parser and the MRI
commands; ``xray``; ``study``)."""

from .main import main, parser

__all__ = ["main", "parser"]
