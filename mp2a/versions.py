"""Versions of a served artifact: heads published over time, one of them served (DESIGN.md §1).

Layout inside the artifact folder RUN (version 1 is RUN itself, never copied):

    RUN/versions/<N>/            version N >= 2, a complete artifact (load_artifact reads it):
        manifest.json            RUN's manifest with version N, parent_version, created_at,
                                 method, decision (the gate's figures) and its own checksums
        head.safetensors         the new head (kilobytes)
        prompts.safetensors      the prompts that produced it (when given)
        metrics.json
        source_features.safetensors  a hard link to RUN's (a copy where links are refused):
                                 re-adaptation changes only the head, never the encoders
        rolled_back.json         written by `rollback`: this version was withdrawn
    RUN/versions/CURRENT         {"version": N}: the served version, replaced atomically
    RUN/versions/decisions.jsonl every adaptation outcome (accepted, rejected, failed) with its
                                 figures, one JSON object a line, oldest first (capped)
    RUN/versions/.lock           flock held by publish / rollback / prune / record_decision
    RUN/versions/.tmp-*          a publish in progress (or one that crashed: removed later)

Crash safety: a version is written into a temporary folder (every file fsynced), renamed to
`versions/<N>` and only then does CURRENT move (temp file + fsync + os.replace + fsync of the
folder). A kill at any point leaves CURRENT naming the old or the new complete version.
`load_current` verifies every checksum; when CURRENT is damaged or names a version that fails
verification it serves the newest complete version that was not rolled back (RUN itself last).

Sites: a hub keeps one version line per edge site in RUN/sites/<site>/versions/, laid out the
same way (version 1 of every line is RUN itself); every function takes `site` ("" is the
server's own line, RUN/versions). An edge installs the versions its hub sends with `mirror`.

The encoder (RUN/export/) belongs to the base artifact: a version never carries its own.
Configuration: MP2A_KEEP_VERSIONS (default 5) version folders are kept; the served one and
version 1 are never deleted.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mp2a.artifact import (
    FORMAT_VERSION,
    HEAD_FILE,
    MANIFEST,
    METRICS_FILE,
    PROMPTS_FILE,
    SOURCE_FEATURES_FILE,
    Artifact,
    fsync_dir,
    head_rows,
    load_artifact,
    save_tensors,
    sha256_file,
    write_bytes,
    write_json,
)
from mp2a.errors import ArtifactError
from mp2a.head import Head

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
CURRENT = "CURRENT"
ROLLED_BACK = "rolled_back.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
DECISIONS = "decisions.jsonl"
MAX_DECISIONS = 1000  # lines kept in decisions.jsonl (older ones are dropped)
BASE_VERSION = 1
DEFAULT_KEEP = 5


SITES_DIR = "sites"


def versions_dir(run: Path | str, site: str = "") -> Path:
    """RUN/versions, or RUN/sites/<site>/versions for a hub's site line."""
    if site:
        return Path(run) / SITES_DIR / site / VERSIONS_DIR
    return Path(run) / VERSIONS_DIR


def current_file(run: Path | str, site: str = "") -> Path:
    """The pointer file; its (inode, mtime, size) changes on every publish or rollback."""
    return versions_dir(run, site) / CURRENT


def keep_versions() -> int:
    raw = os.environ.get("MP2A_KEEP_VERSIONS", "")
    try:
        keep = int(raw) if raw else DEFAULT_KEEP
    except ValueError:
        raise ArtifactError(f"MP2A_KEEP_VERSIONS={raw!r} is not an integer") from None
    if keep < 1:
        raise ArtifactError(f"MP2A_KEEP_VERSIONS must be >= 1, got {keep}")
    return keep


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def version_path(run: Path | str, version: int, site: str = "") -> Path:
    return Path(run) if version == BASE_VERSION else versions_dir(run, site) / str(version)


def _folders(run: Path, site: str = "") -> list[int]:
    """Version numbers that have a folder (complete or not), ascending."""
    d = versions_dir(run, site)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def _rolled_back(run: Path, version: int, site: str = "") -> bool:
    return version != BASE_VERSION and (version_path(run, version, site) / ROLLED_BACK).is_file()


def _read_pointer(run: Path, site: str = "") -> int | None:
    """The version CURRENT names, or None when it is absent or unreadable."""
    try:
        data = json.loads(current_file(run, site).read_text())
        return int(data["version"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        log.debug("%s is damaged (%s)", current_file(run, site), e)
        return None


def _load(run: Path, version: int, site: str = "") -> Artifact:
    art = load_artifact(version_path(run, version, site))
    if art.version != version:
        raise ArtifactError(
            f"{art.path} says it is version {art.version}, its folder says {version}"
        )
    return art


def load_version(run: Path | str, version: int, site: str = "") -> Artifact:
    """One version, checksum-verified; raises ArtifactError naming what is wrong."""
    return _load(Path(run), version, site)


def load_current(run: Path | str, site: str = "") -> Artifact:
    """The served version, verified. If CURRENT is missing, damaged or names a version that
    fails verification: the newest complete version not rolled back, RUN itself last."""
    run = Path(run)
    pointed = _read_pointer(run, site)
    problem = "CURRENT is damaged"
    if pointed is not None:
        try:
            return _load(run, pointed, site)
        except ArtifactError as e:
            problem = f"CURRENT names version {pointed}, which fails to load ({e})"
    if pointed is None and not current_file(run, site).exists():
        return _load(run, BASE_VERSION)  # never published: RUN itself
    for v in reversed(_folders(run, site)):
        if v == pointed or _rolled_back(run, v, site):
            continue
        try:
            art = _load(run, v, site)
        except ArtifactError as e:
            log.warning("version %s is incomplete or damaged (%s); skipping it", v, e)
            continue
        _heal_pointer(run, site, problem, art.version)
        return art
    art = _load(run, BASE_VERSION)
    _heal_pointer(run, site, problem, art.version)
    return art


_unhealed: set[tuple[str, str, str]] = set()  # said once per process when healing fails


def _heal_pointer(run: Path, site: str, problem: str, version: int) -> None:
    """CURRENT was damaged or named a version that fails verification, and `version` is the
    newest verified one: move the damaged CURRENT aside (CURRENT.damaged-STAMP), point CURRENT
    at `version`, count it in mp2a_state_healed_total{what="versions"} and say it once. The
    damaged version folder stays where it is (never served: it fails verification)."""
    from mp2a.heal import DAMAGED_INFIX, count_healed, stamp

    cur = current_file(run, site)
    try:
        with _locked(run, site):
            before = _read_pointer(run, site)
            if before is not None and before != version:  # changed since we read it?
                with contextlib.suppress(ArtifactError):
                    _load(run, before, site)
                    return  # a publish or rollback pointed it at a good version meanwhile
            if before == version:
                return
            with contextlib.suppress(FileNotFoundError):
                os.replace(cur, cur.with_name(cur.name + DAMAGED_INFIX + stamp()))
            _point(run, version, site)
    except OSError as e:  # a read-only RUN: serve the fallback, say so once
        key = (str(run), site, problem)
        if key not in _unhealed:
            _unhealed.add(key)
            log.error("%s: %s; serving version %s (cannot repair: %s)", cur, problem, version, e)
        return
    count_healed("versions")
    log.error(
        "%s: %s; moved it aside and serving version %s, the newest verified one",
        cur,
        problem,
        version,
    )


def current(run: Path | str, site: str = "") -> int:
    """The version `load_current` serves."""
    return load_current(run, site).version


_held = threading.local()  # the version folders this thread holds the lock of


@contextlib.contextmanager
def _locked(run: Path, site: str = "") -> Iterator[Path]:
    """The line's lock; re-entrant within a thread (a publish reads the served version, which
    may repair CURRENT under the same lock: a second flock would wait for itself)."""
    d = versions_dir(run, site)
    held = _held.__dict__.setdefault("dirs", set())
    if str(d) in held:
        yield d
        return
    d.mkdir(parents=True, exist_ok=True)
    with open(d / LOCK, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        held.add(str(d))
        try:
            yield d
        finally:
            held.discard(str(d))
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _point(run: Path, version: int, site: str = "") -> None:
    """Move CURRENT to `version` atomically (temp file + fsync + os.replace + dir fsync)."""
    d = versions_dir(run, site)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + "current-", dir=d)
    os.close(fd)
    try:
        write_json(Path(tmp), {"version": version, "updated_at": _now()})
        os.replace(tmp, d / CURRENT)
        fsync_dir(d)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())


def _clean_tmp(d: Path) -> None:
    """Remove what crashed publishers left (only called under the lock)."""
    for p in d.iterdir():
        if p.name.startswith(TMP_PREFIX):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _check_head(run: Path, head: Head) -> Artifact:
    base = load_artifact(run)
    if head.num_classes != len(base.classes) or head.dim != base.backbone.embed_dim:
        raise ArtifactError(
            f"head shape (C={head.num_classes}, D={head.dim}) does not fit {run}: it has "
            f"{len(base.classes)} classes and embed_dim {base.backbone.embed_dim}"
        )
    return base


def _write_version(
    run: Path,
    d: Path,
    base: Artifact,
    version: int,
    head: Head,
    metrics: dict,
    parent: int | None,
    prompts: dict[str, np.ndarray] | None,
    decision: dict | None,
    method: str,
    prompt_config: dict | None,
    rows: list[dict] | None,
) -> None:
    """Write version `version` into `d` (temp folder, every file fsynced, then a rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{version}-", dir=d))
    try:
        save_tensors(tmp / HEAD_FILE, head.tensors())
        if prompts is not None:
            save_tensors(tmp / PROMPTS_FILE, prompts)
        write_json(tmp / METRICS_FILE, metrics)
        _link_or_copy(run / SOURCE_FEATURES_FILE, tmp / SOURCE_FEATURES_FILE)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            **base.manifest,
            "format_version": FORMAT_VERSION,
            "version": version,
            "parent_version": parent,
            "created_at": _now(),
            "method": method,
            "decision": decision,
            "files": files,
        }
        manifest["prompt"] = None if prompts is None else prompt_config
        manifest["head_rows"] = head_rows(head, rows)
        write_json(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
        os.rename(tmp, d / str(version))
        fsync_dir(d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(
    run: Path | str,
    head: Head,
    metrics: dict,
    parent: int | None = None,
    prompts: dict[str, np.ndarray] | None = None,
    decision: dict | None = None,
    method: str = "online",
    prompt_config: dict | None = None,
    rows: list[dict] | None = None,
    expect_current: int | None = None,
    site: str = "",
) -> int:
    """Write `head` as version N+1 (complete, checksummed, `parent` recorded; default: the
    served version), then make it the served one. Returns N+1. Safe against concurrent
    publishers (a file lock) and against a kill at any point (see the module docstring).
    With `prompts`, `prompt_config` (template, context sizes, fit settings) becomes the
    manifest's `prompt`; without prompts the version has none. `rows` describes the head's
    rows (mp2a/artifact.py `head_rows`; default: all prompt rows). With `expect_current`, the
    publish is refused (ArtifactError) unless that is still the served version: a run
    trained on version N never replaces a version someone published or rolled back to
    meanwhile."""
    run = Path(run)
    base = _check_head(run, head)
    with _locked(run, site) as d:
        _clean_tmp(d)
        if expect_current is not None and (served := current(run, site)) != expect_current:
            raise ArtifactError(
                f"{run} serves version {served}, not {expect_current} as when the run started "
                "(another publish or a rollback happened): nothing published"
            )
        if parent is None:
            parent = current(run, site)
        else:
            _load(run, parent, site)  # the parent must exist and be complete
        version = max([BASE_VERSION, *_folders(run, site)]) + 1
        _write_version(
            run, d, base, version, head, metrics, parent, prompts, decision, method,
            prompt_config, rows,
        )  # fmt: skip
        _point(run, version, site)
        _prune(run, version, site)
    log.info("published version %s of %s %r (parent %s)", version, run, site, parent)
    return version


def mirror(
    run: Path | str,
    version: int,
    head: Head,
    *,
    parent: int | None,
    metrics: dict,
    rows: list[dict] | None = None,
    method: str = "hub",
) -> bool:
    """Serve `head` as version `version`, a number given elsewhere (an edge installing its
    hub's version of its site). A kept folder of that number holding the same head is served
    again (a rollback on the hub); one holding another head is replaced. Returns True when
    the served version changed."""
    run = Path(run)
    base = _check_head(run, head)
    with _locked(run) as d:
        _clean_tmp(d)
        if version == BASE_VERSION:
            changed = current(run) != BASE_VERSION
            _point(run, BASE_VERSION)
            return changed
        folder = version_path(run, version)
        same = False
        if folder.is_dir():
            try:
                kept = _load(run, version)
                a, b = kept.head.tensors(), head.tensors()
                same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
            except ArtifactError:
                same = False
            if not same:
                shutil.rmtree(folder, ignore_errors=True)
        if not same:
            _write_version(
                run, d, base, version, head, metrics, parent, None, None, method, None, rows
            )
        (folder / ROLLED_BACK).unlink(missing_ok=True)
        changed = _read_pointer(run) != version
        _point(run, version)
        _prune(run, version)
    return changed


def rollback(run: Path | str, site: str = "") -> int:
    """Serve the served version's parent again (or, if it is gone, the newest complete older
    version) and mark the withdrawn one rolled back. Returns the version now served."""
    run = Path(run)
    with _locked(run, site):
        served = load_current(run, site)
        if served.version == BASE_VERSION:
            raise ArtifactError(
                f"{run} serves version 1, the original artifact: nothing to roll back"
            )
        parent = served.manifest.get("parent_version")
        older = [v for v in reversed(_folders(run, site)) if v < served.version]
        candidates = [parent] if parent is not None else []
        candidates += [
            v for v in [*older, BASE_VERSION] if v != parent and not _rolled_back(run, v, site)
        ]
        for v in candidates:
            try:
                _load(run, int(v), site)
            except ArtifactError as e:
                log.warning("cannot roll back to version %s (%s)", v, e)
                continue
            write_bytes(
                served.path / ROLLED_BACK,
                json.dumps({"at": _now(), "to": int(v)}).encode(),
            )
            _point(run, int(v), site)
            log.info("rolled %s back from version %s to %s", run, served.version, v)
            return int(v)
    raise ArtifactError(f"{run}: no complete version to roll back to")


def _prune(run: Path, served: int, site: str = "") -> None:
    """Keep the newest MP2A_KEEP_VERSIONS version folders, the served one always."""
    folders = _folders(run, site)
    for v in folders[: max(0, len(folders) - keep_versions())]:
        if v not in (served, BASE_VERSION):
            shutil.rmtree(version_path(run, v, site), ignore_errors=True)
            log.info("pruned version %s of %s", v, run)


def history(run: Path | str, served: int | None = None, site: str = "") -> list[dict]:
    """Every kept version, newest first: version, parent, created_at, method, metrics,
    decision, served, rolled_back (with when and to what), complete (files present).
    `served` defaults to what CURRENT names."""
    run = Path(run)
    if served is None:
        served = _read_pointer(run, site) or BASE_VERSION
    out = []
    for v in [*reversed(_folders(run, site)), BASE_VERSION]:
        p = version_path(run, v, site)
        entry: dict = {"version": v, "served": v == served, "complete": True}
        try:
            m = json.loads((p / MANIFEST).read_text())
            metrics = json.loads((p / METRICS_FILE).read_text())
        except (OSError, ValueError) as e:
            entry.update(complete=False, error=str(e))
            out.append(entry)
            continue
        entry.update(
            parent=m.get("parent_version"),
            created_at=m.get("created_at"),
            method=m.get("method"),
            metrics=metrics,
            decision=m.get("decision"),
            rolled_back=None,
        )
        if _rolled_back(run, v, site):
            with contextlib.suppress(OSError, ValueError):
                entry["rolled_back"] = json.loads((p / ROLLED_BACK).read_text())
        out.append(entry)
    return out


def record_decision(run: Path | str, entry: dict, site: str = "") -> None:
    """Append one adaptation outcome to RUN/versions/decisions.jsonl (fsynced). Rejected and
    failed runs publish no version, so this log is where their figures are kept. Past
    MAX_DECISIONS lines the oldest are dropped (an atomic rewrite)."""
    run = Path(run)
    line = json.dumps({"recorded_at": _now(), **entry}, default=str)
    with _locked(run, site) as d:
        path = d / DECISIONS
        with open(path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
            # a line a crash cut short is closed first, so it cannot swallow this one
            f.write((b"\n" if torn else b"") + line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        lines = path.read_text().splitlines()
        if len(lines) > MAX_DECISIONS:
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".jsonl", dir=d)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines[-MAX_DECISIONS:]) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(d)


def decisions(run: Path | str, limit: int | None = None, site: str = "") -> list[dict]:
    """Recorded adaptation outcomes, newest first (a damaged line is skipped)."""
    path = versions_dir(run, site) / DECISIONS
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
        if limit is not None and len(out) >= limit:
            break
    return out


def ancestors(run: Path | str, art: Artifact, site: str = "") -> list[int]:
    """The parent chain of `art` that is still kept, nearest first."""
    run = Path(run)
    kept = {BASE_VERSION, *_folders(run, site)}
    out: list[int] = []
    parent = art.manifest.get("parent_version")
    while parent is not None and int(parent) in kept and int(parent) not in out:
        out.append(int(parent))
        try:
            m = json.loads((version_path(run, int(parent), site) / MANIFEST).read_text())
        except (OSError, ValueError):
            break
        parent = m.get("parent_version")
    return out
