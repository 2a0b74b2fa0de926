"""Errors a user can act on.

The command line and the Slicer panel show ``str(error)`` of these to the user instead of a
traceback, so every message says what is wrong and what to do about it.
"""


class VertebralLabelingError(Exception):
    """Base class of the errors that are the user's input, not a bug."""


class InputError(VertebralLabelingError):
    """The image (or a file the user gave) cannot be used."""


class ModelError(VertebralLabelingError):
    """A model file is missing, corrupt or not a VertebralLabeling model."""
