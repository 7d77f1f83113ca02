"""The project's own error and warning types.

Every check on user input (data files, data sets, settings, basis files, the feature cache) raises
a ``LoreDataError``. It subclasses ``ValueError``, so code that caught ``ValueError`` before still
catches it, and callers can catch the project's errors apart from bugs (``KeyError``, ...).
"""

from __future__ import annotations


class LoreDataError(ValueError):
    """Bad input: a data file, a data set, a setting, a basis file or a cache. The message names
    the culprit (file, row, user, field)."""


class LoreDataWarning(UserWarning):
    """Suspicious but usable input (e.g. duplicate pairs): training goes on."""
