"""Errors srd-ray reports to users. The CLI prints their message (no traceback) and exits non-zero."""


class SrdError(Exception):
    """Base class: a problem with the user's spec, data, models or run directory."""


class SpecError(SrdError):
    """The job spec is malformed or inconsistent."""


class DataError(SrdError):
    """A data file is missing, unreadable, or has a bad row; the message names file and row."""


class ModelError(SrdError):
    """A model or tokenizer cannot be loaded, or teacher and student do not fit together."""


class RunDirError(SrdError):
    """The run directory holds outputs that do not match this spec."""


class ResourceError(SrdError):
    """The cluster cannot hold what a stage asks for; the message names the setting and the numbers."""


class NothingToDo(Exception):
    """The stages asked for are all off for this spec; the message says why (not an error: exit 0)."""
