"""The online adaptation worker: re-adapt the served head on stored traffic, gate, publish.

Runs in its own process (`python -m online.worker RUN [--state DSN]`), never inside a
serving worker. This module imports neither torch nor adapt at module level: the training
stack is imported inside a run, so the serving process may import the module (e.g. for its
constants) and stay torch-free. Everything it reads and writes goes through the state
backend (online/state.py: files beside RUN by default, PostgreSQL for a fleet).

One run (`run_once`):
  1. the newest stored traffic embeddings of the site holding `max_samples` distinct images
     (`read_distinct`: a burst of one repeated image reaches further back, not fewer samples;
     embeddings that are not finite are dropped and counted in `n_traffic_dropped`; repeats
     of one image count once, `n_traffic_duplicates`);
  2. the served version (`State.load_current`): its head, source_features.safetensors
     (features, labels, domains) and prompts (prompts.safetensors; a zero-shot artifact has
     none: the prompt learner starts from the hand template in metrics.json);
  3. the artifact's frozen model (`adapt.models.load_backbone`) and a MultiPromptLearner with
     one prompt pair per source domain, loaded from the serving prompts when they exist;
  4. `method` (default mp2a-t: MP²A stages, then the transductive refinement of the
     ensemble becomes the head's prototype row, adapt/transductive.py; `mp2a`: the published
     method, prompt rows only) on every row but a held-out slice (every 5th source row and
     every 5th traffic row), starting from the serving head's probabilities as pseudo-labels;
     a served prototype row is not carried over: every run fits its own;
  5. the quality gate (online/gate.py) on the held-out slices; accepted → `State.publish`
     (parent = the served version, the gate's figures as `decision`, the decision recorded
     in the same step; refused if the served version changed meanwhile); rejected → nothing
     is published.
Every step is reported in the state's status (running → accepted | rejected | failed, with
reasons and figures); the outcome goes to the decision history. A run whose worker died
leaves "running": GET /adapt/status reports it failed and the next worker records it so
(`recover`).

The loop (`loop`, the CLI) runs only in the worker that holds the state's lead (a file lock,
or a PostgreSQL advisory lock: one worker for the whole fleet; the others wait and take over
when it dies). It starts a run on a POST /adapt request, every `interval` seconds, and/or when
`min_new` samples arrived since the last run. With PROMETHEUS_MULTIPROC_DIR set to the
server's directory, outcomes and durations land in mp2a_adaptation_runs_total{outcome} and
mp2a_adaptation_duration_seconds next to the serving metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mp2a.artifact import PROMPTS_FILE, SOURCE_FEATURES_FILE, Artifact, load_artifact
from mp2a.errors import ArtifactError
from mp2a.head import PROMPT, PROTOTYPE, Head, l2_normalize
from mp2a.metrics import ServingMetrics
from online import estimate, gate, monitor
from online.state import DEFAULT_SITE, State, StateError, now, open_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Online-run settings. Fields named as in adapt.progressive.FitConfig are passed to it
    (FitConfig lives with torch: the server process imports this module and stays
    torch-free)."""

    max_samples: int = 10_000  # newest stored embeddings used per run
    min_samples: int = 50  # fewer stored samples: the run fails (a request) or waits (schedule)
    method: str = "mp2a-t"  # mp2a-t | mp2a
    stages: int = 3
    steps_per_stage: int = 60
    r0: float = 0.3
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    gate: gate.GateConfig = field(default_factory=gate.GateConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: choose {', '.join(METHODS)}")


METHODS = ("mp2a-t", "mp2a")  # what the worker can run (adapt/progressive.py modes)

# what a request (POST /adapt's JSON body) may change for one run: integer bounds, or choices
REQUEST_SETTINGS: dict[str, tuple[int, int] | tuple[str, ...]] = {
    "method": METHODS,
    "stages": (1, 20),
    "steps_per_stage": (1, 100_000),
    "max_samples": (1, 1_000_000),
    "min_samples": (1, 1_000_000),
    # the gate's rule for this run (gate.GateConfig.gain_correction): "none" when the operator
    # knows the site's traffic is new to an adapted head (no drift run saw the change)
    "gain_correction": gate.GAIN_CORRECTIONS,
}


def request_overrides(body: object) -> dict[str, int | str]:
    """The run settings a request asks for, checked; ValueError says what is wrong."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ValueError('the body must be a JSON object, e.g. {"steps_per_stage": 100}')
    unknown = sorted(set(body) - set(REQUEST_SETTINGS))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(REQUEST_SETTINGS)}"
        )
    out: dict[str, int | str] = {}
    for k, v in body.items():
        allowed = REQUEST_SETTINGS[k]
        if isinstance(allowed[0], str):
            if v not in allowed:
                raise ValueError(f"{k} must be one of {', '.join(map(str, allowed))}, got {v!r}")
        else:
            low, top = allowed
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= top:
                raise ValueError(f"{k} must be an integer in {low}..{top}, got {v!r}")
        out[k] = v
    return out


def with_settings(cfg: WorkerConfig, overrides: Mapping[str, int | str]) -> WorkerConfig:
    """`cfg` with a request's checked settings (request_overrides) applied, the gate's too."""
    rest = dict(overrides)
    if "gain_correction" in rest:
        gate_cfg = dataclasses.replace(cfg.gate, gain_correction=rest.pop("gain_correction"))
        cfg = dataclasses.replace(cfg, gate=gate_cfg)
    return dataclasses.replace(cfg, **rest)


DECISION_FIELDS = (
    "state", "reasons", "request", "serving_version", "version", "started_at", "finished_at",
    "seconds", "fit_seconds", "n_traffic", "pseudo_label_selected_ratio", "gate", "pid", "host",
    "site",
)  # fmt: skip


def decision_entry(status: dict) -> dict:
    """What the version history keeps of a finished run (the gate without its config)."""
    entry = {k: status.get(k) for k in DECISION_FIELDS if k in status}
    if isinstance(entry.get("gate"), dict):
        entry["gate"] = {k: v for k, v in entry["gate"].items() if k != "config"}
    return entry


def record(state: State, status: dict, site: str = DEFAULT_SITE) -> None:
    """Keep a finished run's outcome in the version history: rejected and failed runs
    publish nothing, so this is where their figures stay (accepted ones are recorded by
    their publish, in the same step)."""
    try:
        state.record_decision(decision_entry(status), site)
    except (OSError, StateError) as e:
        log.warning("cannot record the adaptation outcome: %s", e)


def record_rollback(state: State, withdrawn: str, served: str, site: str = DEFAULT_SITE) -> None:
    """A POST /rollback in the history and, unless a run is under way, in the status: an
    operator sees what is served and why."""
    entry = {
        "state": "rolled_back",
        "serving_version": withdrawn,
        "version": served,
        "finished_at": now(),
        "site": site,
        "reasons": [f"rolled back from version {withdrawn} to {served}"],
    }
    record(state, entry, site)
    try:
        if (state.read_status(site) or {}).get("state") != "running":
            state.write_status(entry, site)
    except (OSError, StateError) as e:
        log.warning("cannot write the rollback to the status: %s", e)


def recover(state: State, site: str = DEFAULT_SITE) -> dict | None:
    """At worker start: a run left "running" by a dead worker becomes "failed" (status,
    history and mp2a_adaptation_runs_total{outcome="failed"}); returns that status, else
    None."""
    stale = state.stale_status(site)
    if stale is None:
        return None
    reason = stale.pop("stale_reason")
    status = {**stale, "state": "failed", "reasons": [reason], "finished_at": now()}
    record(state, status, site)
    state.write_status(status, site)
    if (m := _metrics()) is not None:
        m.adaptation_runs.labels(outcome="failed").inc()
    log.warning("%s", reason)
    return status


def _metrics() -> ServingMetrics | None:
    """The shared mp2a_* metrics when the server's multiprocess directory is known."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return None
    from mp2a.metrics import get_metrics

    return get_metrics()


def _prompt_state(art: Artifact) -> tuple[dict | None, str | None]:
    """(prompt tensors or None, template or None) of a served version."""
    metrics = art.metrics()
    cfg = art.manifest.get("prompt") or {}
    template = cfg.get("template") or metrics.get("template")
    if PROMPTS_FILE in art.manifest.get("files", {}):
        return art.tensors(PROMPTS_FILE), template
    return None, template


def run_once(
    state: State,
    cfg: WorkerConfig | None = None,
    request: dict | None = None,
    site: str = DEFAULT_SITE,
) -> dict:
    """One re-adaptation of `site`'s served version on its stored traffic; returns the final
    status (also written to the state). Never raises for an adaptation failure."""
    cfg = cfg or WorkerConfig()
    t0 = time.time()
    base = {
        "started_at": now(),
        "request": request,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "site": site,
    }
    state.write_status({"state": "running", **base}, site)
    m = _metrics()
    try:
        status = _adapt(state, cfg, base, t0, site)
    except Exception as e:  # a failed run never touches the served version
        log.exception("adaptation of %s (site %r) failed", state.run, site)
        status = {
            "state": "failed",
            **base,
            "reasons": [f"{type(e).__name__}: {e}"],
            "traceback": traceback.format_exc(limit=5),
            "seconds": round(time.time() - t0, 2),
        }
    status["finished_at"] = now()
    if status["state"] != "accepted":  # an accepted run was recorded by its publish
        record(state, status, site)
    state.write_status(status, site)  # after the record: an ended status is in the history
    if m is not None:
        m.adaptation_runs.labels(outcome=status["state"]).inc()
        m.adaptation_duration.observe(time.time() - t0)
        if status.get("pseudo_label_selected_ratio") is not None:
            m.pseudo_label_selected_ratio.set(status["pseudo_label_selected_ratio"])
    log.info(
        "adaptation %s in %.1f s: %s", status["state"], status["seconds"], status.get("reasons")
    )
    return status


@dataclass
class Candidate:
    """A re-adapted head and what rebuilds and explains it."""

    head: Head
    prompts: dict[str, np.ndarray]
    prompt_config: dict
    rows: list[dict]  # the manifest's head_rows
    prompt_head: Head  # the prompt rows alone
    per_stage: list[dict]
    figures: dict  # start, load/fit seconds, the prototype row's fit


def train_candidate(
    served: Artifact,
    sources: list[tuple[np.ndarray, np.ndarray]],
    target: np.ndarray,
    cfg: WorkerConfig,
    init_probs: np.ndarray | None = None,
    base_template: str | None = None,
    on_stage: Callable[[int, int], None] | None = None,
) -> Candidate:
    """Re-adapt the served version on `target` embeddings (N, D) with the labeled `sources`
    [(features, labels)] per source domain (the artifact's order): the training half of a
    run, with no store and no gate, so experiments and tests can call it on arrays.
    `init_probs` (N, C) replaces the serving head's probabilities as the first pseudo-labels
    (the benchmark's deliberately permuted candidate). A version with neither prompts nor a
    template of its own (published by hand) starts from `base_template`, the base artifact's
    hand prompt."""
    import torch

    from adapt.models import load_backbone
    from adapt.progressive import FitConfig, fit
    from adapt.prompts import MultiPromptLearner
    from adapt.transductive import prototype_head

    t_load = time.time()
    prompts, template = _prompt_state(served)
    template = template or base_template
    lm = load_backbone(served.backbone)
    classes = served.classes
    if prompts is not None:
        s, _, m2, _ = prompts["domain_ctx"].shape
        n_class_ctx = int(prompts["class_ctx"].shape[2])
        if s != len(sources):
            raise ValueError(f"serving prompts have {s} source pairs, features {len(sources)}")
        learner = MultiPromptLearner(
            lm, classes, s, template, n_class_ctx=n_class_ctx, n_domain_ctx=int(m2)
        )
        learner.load_state({k: torch.from_numpy(v) for k, v in prompts.items()})
        start = "serving prompts"
    else:
        if not template:
            raise ValueError(f"{served.path} has neither prompts nor a template in metrics.json")
        learner = MultiPromptLearner(lm, classes, len(sources), template, seed=cfg.seed)
        start = f"hand template {template!r}"
    load_seconds = time.time() - t_load
    shared = {f.name for f in dataclasses.fields(FitConfig)} & {
        f.name for f in dataclasses.fields(cfg)
    }
    fit_cfg = FitConfig(**{k: getattr(cfg, k) for k in shared})  # the fields they share
    serving_head = served.head
    t_fit = time.time()
    result = fit(
        learner,
        sources,
        target,
        init_probs=serving_head.probs(target) if init_probs is None else init_probs,
        logit_scale=serving_head.logit_scale,
        cfg=fit_cfg,
        mode=cfg.method,
        progress=False,
        on_stage=on_stage,
    )
    head = prompt_head = Head(weight=result.head_weight, logit_scale=serving_head.logit_scale)
    names = served.manifest.get("source_domains") or [str(i) for i in range(len(sources))]
    rows = [{"kind": PROMPT, "source": n} for n in names]
    head_fit = None
    if result.refinement is not None:
        head, head_fit = prototype_head(head, result.refinement, target)
        rows.append({"kind": PROTOTYPE, "target": "traffic"})
    figures = {
        "start": start,
        "method": cfg.method,
        "load_seconds": round(load_seconds, 2),
        "fit_seconds": round(time.time() - t_fit, 2),
        "head_fit": head_fit,
    }
    return Candidate(
        head=head,
        prompts=learner.arrays(),
        prompt_config=learner.config(fit_cfg),
        rows=rows,
        prompt_head=prompt_head,
        per_stage=result.per_stage,
        figures=figures,
    )


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Mask of the rows without NaN or infinity (a broken encoder, a damaged store)."""
    return np.isfinite(x).all(axis=1)


READ_GROWTH = 4  # each further read of the store asks for this many times more rows
READ_REACH = 16  # and goes back at most this many times `limit` rows (memory: N × D floats)


def read_distinct(state: State, limit: int | None, site: str) -> np.ndarray:
    """The newest stored embeddings of `site` holding `limit` distinct images (all if None).

    One image sent again and again (a health probe, a stuck camera) is one sample: read only
    the newest `limit` rows and a burst of it would fill the window and leave nothing to adapt
    on. So the read reaches further back while repeats fill it, up to READ_REACH × `limit`
    rows; the repeats stay in (prepare_traffic counts and drops them)."""
    n = limit
    while True:
        traffic = state.read_traffic(n, site)
        if n is None:
            return traffic
        keep = monitor.newest_copies(traffic)
        if len(keep) >= limit:  # from the newest copy of the limit-th newest image on
            return traffic[keep[-limit] :]
        if len(traffic) < n or n >= READ_REACH * limit:  # the store holds no more
            return traffic
        n = min(n * READ_GROWTH, READ_REACH * limit)


def prepare_traffic(served: Artifact, traffic: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """The stored embeddings of a run: rows that are not finite and repeats of one image are
    dropped; (rows, in_set mask, counts). `in_set` is False where a row looks out of the label
    set: such rows teach the prompts nothing true and are kept out of training and out of the
    gain estimate, but the stream-level guards see them (a stream of noise must still look
    like noise to the gate: with its most class-like rows alone it can pass as a digit stream)."""
    ok = finite_rows(traffic)
    dropped = int((~ok).sum())
    if dropped:
        log.warning("dropped %d stored embeddings holding NaN or infinity", dropped)
        traffic = traffic[ok]
    # the same image sent again and again (a stuck camera, a health probe) is one sample: a
    # pile of identical points would pull a class mean and the held-out slice towards it
    _, first = np.unique(traffic, axis=0, return_index=True)
    duplicates = len(traffic) - len(first)
    traffic = traffic[np.sort(first)]
    # online/estimate.py: 1 − MCM above the source rows' 95th percentile
    prompts_head = served.prompt_head()
    threshold = estimate.ood_threshold(
        prompts_head, served.tensors(SOURCE_FEATURES_FILE)["features"]
    )
    in_set = estimate.ood_scores(prompts_head, l2_normalize(traffic)) <= threshold
    log.info("%d traffic embeddings (%d out of the label set)", len(traffic), (~in_set).sum())
    counts = {"n_traffic_dropped": dropped, "n_traffic_duplicates": duplicates}
    return traffic, in_set, {**counts, "n_traffic_ood": int((~in_set).sum())}


def train_and_gate(
    served: Artifact,
    traffic: np.ndarray,
    cfg: WorkerConfig,
    base_template: str | None = None,
    on_stage: Callable[[int, int], None] | None = None,
    on_gate: Callable[[int], None] | None = None,
    in_set: np.ndarray | None = None,
    traffic_changed: bool = False,
) -> tuple[Candidate, dict, dict]:
    """A run on arrays: train a candidate on all but the held-out slice of `traffic` (and of
    the source rows), then the gate on the held-out slices. `in_set` (prepare_traffic): rows
    kept out of training and of the gain estimate, not of the stream's guards;
    `traffic_changed`: the traffic is not what the served head was adapted on (a drift run),
    for the gate's `gain_correction="auto"` (gate.adapted_to_traffic).
    (candidate, decision, sizes)."""
    sf = served.tensors(SOURCE_FEATURES_FILE)
    src_x, src_y = sf["features"].astype(np.float32), sf["labels"].astype(np.int64)
    src_d = sf["domains"].astype(np.int64)
    domains = sorted(int(d) for d in np.unique(src_d))
    src_hold, tr_hold = gate.holdout_mask(len(src_y)), gate.holdout_mask(len(traffic))
    sources = [(src_x[~src_hold & (src_d == d)], src_y[~src_hold & (src_d == d)]) for d in domains]
    in_set = np.ones(len(traffic), bool) if in_set is None else in_set
    target = traffic[~tr_hold & in_set]
    cand = train_candidate(
        served, sources, target, cfg, base_template=base_template, on_stage=on_stage
    )
    if on_gate is not None:
        on_gate(len(cand.per_stage))
    decision = gate.evaluate(
        served.head,
        cand.head,
        src_x[src_hold],
        src_y[src_hold],
        traffic[tr_hold & in_set],
        cfg.gate,
        serving_prompts=served.prompt_head(),
        candidate_prompts=cand.prompt_head,
        source_domains=src_d[src_hold],
        stream=traffic[tr_hold],
        serving_adapted=gate.adapted_to_traffic(served.manifest, traffic_changed),
    )
    sizes = {"n_traffic_train": len(target), "n_source_train": int((~src_hold).sum())}
    return cand, decision, sizes


def _adapt(state: State, cfg: WorkerConfig, base: dict, t0: float, site: str) -> dict:
    served = state.load_current(site)
    traffic = read_distinct(state, cfg.max_samples, site)
    n_read = len(traffic)
    traffic, in_set, counts = prepare_traffic(served, traffic)
    need = max(cfg.min_samples, len(served.classes))
    if in_set.sum() < need:
        trigger = (base.get("request") or {}).get("trigger")
        lower = {
            "request": '"min_samples" in the POST /adapt body',
            "cli": "--min-samples",
        }.get(trigger, "MP2A_ADAPT_MIN_SAMPLES")
        raise ValueError(
            f"{in_set.sum()} usable stored traffic samples ({counts['n_traffic_dropped']} "
            f"dropped as NaN/inf, {counts['n_traffic_duplicates']} repeats of one image, "
            f"{counts['n_traffic_ood']} out of the label set), need at "
            f"least {need} (min_samples, and one per class); serve more traffic (or lower "
            f"{lower}) and retry"
        )
    try:
        base_template = _prompt_state(load_artifact(state.run))[1]
    except (ArtifactError, OSError, ValueError):
        base_template = None

    def on_stage(stage: int, stages: int) -> None:  # GET /adapt/status shows where it is
        progress = {"phase": "training", "stage": stage, "stages": stages}
        state.write_status({"state": "running", **base, "progress": progress}, site)

    def on_gate(stages: int) -> None:
        progress = {"phase": "gate", "stage": stages, "stages": stages}
        state.write_status({"state": "running", **base, "progress": progress}, site)

    drift_run = (base.get("request") or {}).get("trigger") == "drift"
    cand, decision, split = train_and_gate(
        served, traffic, cfg, base_template, on_stage, on_gate, in_set, traffic_changed=drift_run
    )
    figures = {
        "serving_version": served.version,
        "n_traffic": n_read,
        "n_traffic_used": int(in_set.sum()),
        **counts,
        **split,
        **cand.figures,
        "per_stage": cand.per_stage,
        "pseudo_label_selected_ratio": cand.per_stage[-1]["ratio"] if cand.per_stage else None,
        "gate": decision,
    }
    if not decision["accepted"]:
        return {
            "state": "rejected",
            **base,
            **figures,
            "reasons": decision["reasons"],
            "seconds": round(time.time() - t0, 2),
        }
    method = f"online-{cfg.method}"
    metrics = {
        "method": method,
        "parent_version": served.version,
        "template": cand.prompt_config.get("template"),
        "n_traffic": len(traffic),
        "per_stage": cand.per_stage,
        "head": cand.figures.get("head_fit"),
        "gate": decision,
        "target_accuracy": None,  # no labels online
        "seconds": round(time.time() - t0, 2),
    }
    status = {
        "state": "accepted",
        **base,
        **figures,
        "reasons": [],
        "seconds": round(time.time() - t0, 2),
        "finished_at": now(),
    }
    # the version, its pointer and its decision in one step (a transaction on PostgreSQL);
    # refused if the served version changed while this run trained
    status["version"] = state.publish(
        cand.head,
        metrics,
        parent=served.version,
        prompts=cand.prompts,
        decision=decision,
        method=method,
        prompt_config=cand.prompt_config,
        rows=cand.rows,
        record=decision_entry(status),
        site=site,
    )
    return status


@dataclass
class Drift:
    """The drift trigger of `loop`: per site, the traffic since its last run tested by
    online/monitor.py `drift`; the figures of the last check are in `last`.

    A change flagged (`check`) starts a run once `adapt_after` samples have arrived since it,
    and that run adapts on them alone (`due`): the traffic before the change is the domain
    the site left, and adapting on it (it fills most of any window read at the moment of the
    flag) teaches the head the wrong domain."""

    monitor: monitor.MonitorConfig = field(default_factory=monitor.MonitorConfig)
    check_every: int = 50  # new samples between checks
    cooldown_s: float = 120.0  # after a run, or a drift run, of the site
    adapt_after: int = 400  # samples since the change that a drift run waits for and uses
    change_id: dict[str, int] = field(default_factory=dict)  # a flagged change's first row
    checked_id: dict[str, int] = field(default_factory=dict)
    last_trigger: dict[str, float] = field(default_factory=dict)
    last: dict[str, dict] = field(default_factory=dict)
    _cal: dict[str, monitor.Calibrated] = field(default_factory=dict)

    def check(self, state: State, site: str, since_id: int) -> bool:
        newest = state.traffic_max_id(site)
        if newest - self.checked_id.get(site, 0) < self.check_every:
            return False
        if time.monotonic() - self.last_trigger.get(site, -1e18) < self.cooldown_s:
            return False
        self.checked_id[site] = newest
        n = min(newest - since_id, self.monitor.window)  # what arrived since the last run
        if n < 2 * self.monitor.drift_window:
            return False
        art = state.load_current(site)
        cal = self._cal.get(site)
        if cal is None or cal.version != art.version:
            cal = self._cal[site] = monitor.calibrate(art)
        fig = monitor.drift(cal, state.read_traffic(n, site), self.monitor)
        self.last[site] = fig
        if fig["drifted"]:
            self.last_trigger[site] = time.monotonic()
            log.info("site %r drifted: %s", site, fig["reason"])
        return bool(fig["drifted"])

    def due(self, state: State, site: str, since_id: int) -> dict | None:
        """The settings of the drift run to start now, or None. The change is taken to begin
        after the last check that did not flag it: a flag comes some samples after a change,
        so a run from there holds at most `check_every` samples of the old domain, where the
        whole tested slice (`drift_window`) held up to 150 of them on the bench. The run
        waits for `adapt_after` samples since then and reads only those (`max_samples`)."""
        if site not in self.change_id:
            before = self.checked_id.get(site, since_id)
            if not self.check(state, site, since_id):
                return None
            self.change_id[site] = max(since_id, before)
        n = state.traffic_max_id(site) - self.change_id[site]
        if n < self.adapt_after:
            return None
        del self.change_id[site]
        return {"max_samples": int(n)}


def drift_from_env(env: Mapping[str, str]) -> Drift | None:
    """The drift trigger as the environment sets it: MP2A_DRIFT=0 turns it off;
    MP2A_DRIFT_SCORE / _WINDOW (online/monitor.py), MP2A_DRIFT_COOLDOWN_S,
    MP2A_DRIFT_ADAPT_AFTER; ValueError on a bad value."""
    if env.get("MP2A_DRIFT", "1") == "0":
        return None
    raw = env.get("MP2A_DRIFT_COOLDOWN_S", "")
    try:
        cooldown = float(raw) if raw else Drift.cooldown_s
    except ValueError:
        raise ValueError(f"MP2A_DRIFT_COOLDOWN_S={raw!r} is not a number") from None
    raw = env.get("MP2A_DRIFT_ADAPT_AFTER", "")
    try:
        after = int(raw) if raw else Drift.adapt_after
        if after < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"MP2A_DRIFT_ADAPT_AFTER={raw!r} is not a whole number >= 1") from None
    return Drift(
        monitor=monitor.MonitorConfig.from_env(env), cooldown_s=cooldown, adapt_after=after
    )


def _sites(state: State) -> list[str]:
    """The server's own line, and a hub's sites (MP2A_EDGE_TOKENS and those with a line)."""
    from online.hub import EdgeTokens

    configured = EdgeTokens.from_env(os.environ)
    extra = set(configured.sites) if configured is not None else set()
    with contextlib.suppress(StateError):
        extra |= set(state.sites())
    return [DEFAULT_SITE, *sorted(extra - {DEFAULT_SITE})]


def loop(
    state: State,
    cfg: WorkerConfig | None = None,
    interval: float | None = None,
    min_new: int | None = None,
    poll: float = 1.0,
    max_iterations: int | None = None,
    drift: Drift | None = None,
) -> list[dict]:
    """Wait for work and run it: a POST /adapt request (any site), or on a schedule, per
    site (the server's own line and a hub's edge sites): every `interval` s, or once `min_new`
    samples of that site arrived since its last run, and only when the site's store holds
    cfg.min_samples (a site with too little traffic keeps the base head). Only the one worker
    that holds the state's lead runs anything; the others wait and take over when it dies.
    A run also starts when a site's traffic drifts (`drift`, online/monitor.py): checked
    every `check_every` new samples, at most once per `cooldown_s`, on the samples that
    arrived since the site's last run only, so one change starts one run; that run waits for
    `drift.adapt_after` samples of the new traffic and adapts on them (`Drift.due`).
    Returns the statuses of the runs made (for tests; forever unless max_iterations)."""
    cfg = cfg or WorkerConfig()
    leading = False
    next_try = 0.0  # when a worker that does not lead tries the lead again
    followed: str | None = ""  # the leader last named in the log ("": none yet)
    last_run: dict[str, float] = {}
    last_id: dict[str, int] = {}
    done: list[dict] = []
    i = 0
    while max_iterations is None or i < max_iterations:
        if i:
            time.sleep(poll)
        i += 1
        try:
            if leading and not state.try_lead():
                # the lock's session ended (a database restart) while the pool reconnected:
                # the lead is open to anyone again, this worker among them
                log.warning("lost the lead (%s)", state.describe())
                leading = False
            if not leading:
                # a worker that does not lead holds no connection: each try is a short-lived
                # one, every lead_retry_s (jittered: a fleet's tries spread out)
                if time.monotonic() < next_try:
                    continue
                retry = getattr(state, "lead_retry_s", 0.0)
                next_try = time.monotonic() + retry * random.uniform(0.5, 1.0)
                if not state.try_lead():
                    holder = getattr(state, "lead_holder", None)
                    if holder != followed:  # said once, and again when the leader changes
                        followed = holder
                        log.info(
                            "this worker follows: %s leads the adaptation of %s; this one "
                            "takes over if it ends",
                            holder or "another worker",
                            state.run,
                        )
                    continue
                followed = None
                leading = True
                log.info("this worker leads (%s)", state.describe())
                for site in _sites(state):
                    recover(state, site)
                    last_run[site], last_id[site] = time.monotonic(), state.traffic_max_id(site)
            req = state.take_request()
            site, reason = DEFAULT_SITE, None
            if req is not None:
                reason, site = "request", req.pop("site", DEFAULT_SITE) or DEFAULT_SITE
            else:
                for candidate in _sites(state):
                    last_run.setdefault(candidate, time.monotonic())
                    last_id.setdefault(candidate, 0)
                    elapsed = time.monotonic() - last_run[candidate]
                    due = interval is not None and elapsed >= interval
                    newest = state.traffic_max_id(candidate) if min_new is not None else 0
                    fresh = min_new is not None and newest - last_id[candidate] >= min_new
                    if (due or fresh) and state.traffic_count(candidate) >= cfg.min_samples:
                        reason, site = ("schedule" if due else "new samples"), candidate
                        break
                    if drift is None:
                        continue
                    settings = drift.due(state, candidate, last_id[candidate])
                    if settings is not None:
                        reason, site, req = "drift", candidate, {"settings": settings}
                        break
        except StateError as e:  # the database went away: keep trying, never crash
            log.warning("state unavailable (%s); retrying", e)
            leading = False
            state.release_lead()
            continue
        if reason is None:
            continue
        log.info("adaptation run (%s, site %r)", reason, site)
        with contextlib.suppress(StateError):
            last_id[site] = state.traffic_max_id(site)
        request = {"trigger": reason, **(req or {})}
        try:  # the server checked them; a hand-written request may not have been
            run_cfg = with_settings(cfg, request_overrides(request.get("settings")))
        except (ValueError, TypeError) as e:
            status = {
                "state": "failed",
                "request": request,
                "site": site,
                "reasons": [f"bad request: {e}"],
                "seconds": 0.0,
                "finished_at": now(),
            }
            record(state, status, site)
            state.write_status(status, site)
            if (m := _metrics()) is not None:
                m.adaptation_runs.labels(outcome="failed").inc()
        else:
            status = run_once(state, run_cfg, request=request, site=site)
        last_run[site] = time.monotonic()
        done.append(status)
    return done


def lower_priority(kind: str) -> str:
    """Lower this process's CPU priority; returns what was applied. SCHED_IDLE (Linux) runs
    the worker only on otherwise idle CPU, and any serving thread that wakes up preempts it;
    where it is unavailable, nice 10."""
    if kind == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except OSError as e:
            log.warning("SCHED_IDLE refused (%s); using nice 10", e)
    if kind in ("idle", "nice"):
        with contextlib.suppress(OSError):
            os.nice(10)
        return "nice"
    return "normal"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m online.worker", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="the served artifact folder")
    p.add_argument(
        "--state",
        help="postgresql://user@host:port/db (default: $MP2A_STATE, else files beside RUN)",
    )
    p.add_argument("--store", type=Path, help="traffic store (default RUN/traffic.sqlite)")
    p.add_argument("--interval", type=float, help="re-adapt every S seconds")
    p.add_argument("--min-new", type=int, help="re-adapt after N new stored samples")
    p.add_argument("--min-samples", type=int, default=WorkerConfig.min_samples)
    p.add_argument("--max-samples", type=int, default=WorkerConfig.max_samples)
    p.add_argument("--steps", type=int, default=WorkerConfig.steps_per_stage, help="per stage")
    p.add_argument("--stages", type=int, default=WorkerConfig.stages)
    p.add_argument("--method", choices=METHODS, default=WorkerConfig.method)
    p.add_argument("--gate-source-margin", type=float, default=gate.GateConfig.source_margin)
    p.add_argument("--gate-agreement-floor", type=float, default=gate.GateConfig.agreement_floor)
    p.add_argument("--gate-min-gain", type=float, default=gate.GateConfig.min_gain)
    p.add_argument(
        "--gate-gain-correction",
        choices=gate.GAIN_CORRECTIONS,
        default=gate.GateConfig.gain_correction,
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds between checks")
    p.add_argument("--once", action="store_true", help="run one adaptation now and exit")
    p.add_argument(
        "--priority",
        choices=["idle", "nice", "normal"],
        default="idle",
        help="CPU priority: idle (SCHED_IDLE: only cores serving leaves free; the default), "
        "nice (nice 10), normal",
    )
    a = p.parse_args(argv)
    lower_priority(a.priority)  # training must not take the cores serving latency needs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    env = dict(os.environ)
    if a.state:
        env["MP2A_STATE"] = a.state
    if a.store:
        env["MP2A_STORE"] = str(a.store)
    try:
        state = open_state(a.run, env)
    except StateError as e:
        print(f"mp2a worker: {e}", file=sys.stderr)
        return 2
    cfg = WorkerConfig(
        max_samples=a.max_samples,
        min_samples=a.min_samples,
        steps_per_stage=a.steps,
        stages=a.stages,
        method=a.method,
        gate=gate.GateConfig(
            source_margin=a.gate_source_margin,
            agreement_floor=a.gate_agreement_floor,
            min_gain=a.gate_min_gain,
            gain_correction=a.gate_gain_correction,
        ),
    )
    try:
        if a.once:
            if not state.try_lead():
                print("mp2a worker: another worker is running (it holds the lead)", file=sys.stderr)
                return 2
            recover(state)
            status = run_once(state, cfg, request={"trigger": "cli"})
            print(json.dumps({k: status.get(k) for k in ("state", "reasons", "seconds")}))
            return 0 if status["state"] != "failed" else 1
        with contextlib.suppress(KeyboardInterrupt):
            loop(
                state,
                cfg,
                interval=a.interval,
                min_new=a.min_new,
                poll=a.poll,
                drift=drift_from_env(os.environ),
            )
        return 0
    finally:
        state.close()


if __name__ == "__main__":
    sys.exit(main())
