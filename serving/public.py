"""What anonymous callers may see: answers without internals.

The state keeps what the loop needs (a run's pid and host tell a dead worker's leftover from a
live run; a failed run keeps its traceback), but an anonymous HTTP answer never carries
tracebacks, pids, host names or absolute paths (DESIGN.md §3): they tell an attacker the
layout of the machine and nothing to a user. `public()` filters an answer at the HTTP
boundary: the keys below are removed, an absolute path inside any string becomes its last
component (`/srv/data/digits` -> `digits`), this host's name becomes `<host>` and a
`pid N` becomes `pid`. Admin callers (a valid bearer token) get the full answer, and every
500's full message goes to the log.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from typing import Any

# keys whose values are internal wherever they appear in an answer
HIDDEN_KEYS = frozenset({"traceback", "pid", "host", "database"})


@functools.cache
def _path_re() -> re.Pattern[str]:
    """Absolute paths under this machine's top-level folders (/tmp/…, /home/…, /usr/…): so a
    route named in a message (`GET /adapt/status`) is left alone."""
    try:
        roots = sorted((n for n in os.listdir("/") if re.fullmatch(r"[\w.+-]+", n)), key=len)
    except OSError:
        roots = []
    roots = sorted({*roots, "tmp", "home", "root", "usr", "var", "opt", "srv", "mnt", "work"})
    alt = "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True))
    # not after a word character or a dot (a URL's path, a relative path): a real absolute
    # path; it runs to the next blank, quote, bracket, comma or colon-space
    stop = r"\s'\"()\[\]{},;"
    return re.compile(rf"(?<![\w.~])/(?:{alt})(?:/[^{stop}]*)?(?=$|[{stop}:])")


@functools.cache
def _host_re() -> re.Pattern[str] | None:
    names = {socket.gethostname(), socket.getfqdn()} - {"", "localhost"}
    names = {n for n in names if len(n) >= 2}
    if not names:
        return None
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w.-])(?:{alt})(?![\w-])")


_PID = re.compile(r"\bpid[ =:]+\d+")


def _last_part(m: re.Match[str]) -> str:
    path = m.group(0).rstrip("/.")
    return path.rsplit("/", 1)[-1] or "/"


def public_text(text: str) -> str:
    """`text` without absolute paths, this host's name or pids."""
    if "Traceback (most recent call last)" in text:  # a pasted traceback: its first line only
        text = text.split("Traceback (most recent call last)", 1)[0].rstrip() or "(see the log)"
    text = _path_re().sub(_last_part, text)
    if (host := _host_re()) is not None:
        text = host.sub("<host>", text)
    return _PID.sub("pid", text)


def public(obj: Any) -> Any:
    """A JSON-able answer as anonymous callers see it (a new object; `obj` is not changed)."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items() if k not in HIDDEN_KEYS}
    if isinstance(obj, (list, tuple)):
        return [public(v) for v in obj]
    if isinstance(obj, str):
        return public_text(obj)
    return obj
