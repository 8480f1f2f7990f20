"""A pipeline's inputs: one repository, or several combined by cross, union, join, group.

Inside a datum's container every input is a directory ``/pfs/<name>`` (its name is
the repository's unless the spec gives one) holding that datum's files of it, and
``VFS_INPUT_<NAME>_COMMIT`` names the input commit they were read from.
"""

from __future__ import annotations

import re

_NOT_ENV = re.compile(r"[^A-Z0-9_]")


def commit_env_var(name: str) -> str:
    """The environment variable naming input ``name``'s commit in a datum's container:
    ``VFS_INPUT_<NAME>_COMMIT``, the name upper-cased with every character that cannot
    be in a variable name (``-``, ``.``) written ``_``."""
    return f"VFS_INPUT_{_NOT_ENV.sub('_', name.upper())}_COMMIT"


__all__ = ["commit_env_var"]
