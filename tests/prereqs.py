"""Test prerequisites that are real programs (Prometheus, promtool, PostgreSQL, pgbouncer).

A missing one fails the test that needs it, never skips it: `make test` installs the Debian
packages when they are missing, so a skip would only hide that a machine runs less than CI.
"""

from __future__ import annotations

import shutil

import pytest

SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def require_binary(name: str, package: str) -> str:
    """The path of program `name` (Debian package `package`); fails the test when absent."""
    found = shutil.which(name) or shutil.which(name, path=SBIN)
    if found is None:
        pytest.fail(f"needs {name} (apt-get install {package}); `make test` installs it")
    return found
