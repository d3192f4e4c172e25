"""`mp2a bench estimate --json`: every label-free decision measured against the labels.

The benchmark streams have labels; the loop never sees them. Here they score:
1. the estimators of a head's accuracy (online/estimate.py: every method) on the serving
   head: streams (the DigitsDA domains, the shift styles lcd and dotmatrix, a mixed stream of
   lcd with a share of letters) × traffic sizes × bases (a zero-shot artifact and an mp2a-t
   artifact made for the stream's domain on another draw): estimate − truth, and whether the
   default method's interval covers the truth;
2. the gate (online/gate.py) on the candidate the worker's own `train_and_gate` trains on that
   traffic, harmful streams (letters, noise) included: its decision against the true gain on
   the stream's images it never trained on (the held-out slice and the rest of the draw),
   and what every gain rule (`gain_correction`) would have decided on the same figures;
3. a drift run: printed traffic, then lcd, into a real traffic store beside a zero-shot
   artifact for printed; the worker's own loop with only the drift trigger on, checked every
   `drift_chunk` samples: the samples after the change until flagged, the triggers over the
   stationary part, the monitor's estimate against the truth over time (docs/drift.png); the
   run it starts (`Drift.due`: once `drift_adapt_after` new samples arrived, on those alone):
   when, its seconds, and the served head's accuracy on the new domain's later samples before
   and after it.

Artifacts are made by `mp2a adapt` (zeroshot, mp2a-t), streams embedded by the artifact's own
frozen encoder. The figures are one JSON object; `targets` says which targets were met
(null: not measured by the plan). `python -m benchmarks.estimate --heldout [WORK]` runs the
same on held-out styles (HELDOUT) that nothing was chosen on.

`slices`: each size drawn `slices` times from the stream, disjoint (slice k: samples k·n to
(k+1)·n; the candidate is scored on the rest of the stream), so that a decision is measured
on several draws rather than one: at a few hundred samples the candidate's true gain moves
by several points from one draw to the next. `python -m benchmarks.estimate --spread [WORK]`
runs the labelled streams at 300 and 1,000 samples × 6 slices; `--spread --heldout` the
held-out styles. `served_change_by_rule`: per gain rule, the served accuracy's mean change
per run (a true gain where the rule accepts, 0 where it rejects): what a site gets from the
loop under that rule.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from mp2a.errors import Mp2aError
from online.supervisor import REPO_ROOT

log = logging.getLogger(__name__)

DIGITS = ("printed", "handwritten", "textured", "street")
SHIFT = ("lcd", "dotmatrix")
HARMFUL = ("letters", "noise")
MIXED = "mixed"  # lcd with `mixed_share` letters
# held-out styles: corruptions of a domain's stream images that no estimator, gate rule or
# constant was chosen on (`python -m benchmarks.estimate --heldout`); style: the domain whose
# images it corrupts. The first `per_class` images of each class make the style's artifact
# data (the mp2a-t base's target), the rest its stream.
HELDOUT = {
    "blur": "printed",  # an out-of-focus camera: Gaussian blur, low contrast, pixel noise
    "negative": "street",  # colours inverted: a negative, an inverted display
    "rotated": "handwritten",  # a tilted camera: 20-40 degrees either way
    "pixelated": "dotmatrix",  # a cheap webcam: down to 12 px and back, JPEG quality 25
}


@dataclass(frozen=True)
class EstimatePlan:
    streams: tuple[str, ...] = (*DIGITS, *SHIFT, MIXED, *HARMFUL)
    sizes: tuple[int, ...] = (300, 1000, 5000)
    bases: tuple[str, ...] = ("zeroshot", "mp2a-t")
    per_class: int = 100  # the artifacts' data (seed 0)
    stream_per_class: int = 500  # the streams (seed 1): 5,000 images per domain
    mixed_share: float = 0.25
    adapt_stages: int = 3  # the mp2a-t bases' schedule
    adapt_steps: int = 60
    drift_before: int = 1000  # printed samples before the change
    drift_after: int = 1000  # lcd samples after it
    drift_chunk: int = 50  # samples between checks
    drift_adapt_after: int = 400  # the drift run waits for, and adapts on, this many new ones
    cross: int = 0  # held-out styles: n samples of each served by the previous style's head
    slices: int = 1  # disjoint draws of each size (module docstring)

    @classmethod
    def heldout(cls) -> EstimatePlan:
        """The held-out styles alone (both bases), and the drift run."""
        return cls(streams=tuple(HELDOUT), sizes=(300, 1000, 3000), cross=1000)

    @classmethod
    def spread(cls, heldout: bool = False) -> EstimatePlan:
        """Up to six draws of 300 and of 1,000 samples per stream (`slice_starts`: 6 and 4 of
        a 5,000-sample stream): the labelled streams (harmful ones aside: the guards decide
        those, every draw alike) or the held-out styles."""
        streams = tuple(HELDOUT) if heldout else (*DIGITS, *SHIFT, MIXED)
        return cls(streams=streams, sizes=(300, 1000), slices=6)

    @classmethod
    def quick(cls) -> EstimatePlan:
        return cls(
            streams=("lcd", "noise"),
            sizes=(120,),
            bases=("zeroshot",),
            per_class=8,
            stream_per_class=20,
            adapt_steps=5,
            drift_before=200,
            drift_after=200,
            drift_adapt_after=100,
        )


def _mp2a(*args: str) -> None:
    cmd = [sys.executable, "-m", "mp2a", *args]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise Mp2aError(f"{' '.join(cmd[3:])} failed ({r.returncode}): {r.stderr[-2000:]}")


def _base_domain(stream: str) -> str:
    """The domain the stream's artifact is made for (harmful streams reuse lcd's)."""
    return stream if stream in (*DIGITS, *SHIFT, *HELDOUT) else "lcd"


def corrupt(style: str, img, rng: np.random.Generator):
    """One image in a held-out style (HELDOUT), as an RGB PIL image."""
    from PIL import Image, ImageFilter, ImageOps

    img = img.convert("RGB")
    if style == "blur":
        a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.1)), np.float32)
        a = 128 + 0.55 * (a - 128) + rng.normal(0, 14, a.shape)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if style == "negative":
        return ImageOps.invert(img)
    if style == "rotated":
        angle = rng.uniform(20, 40) * rng.choice([-1, 1])
        return img.rotate(angle, resample=Image.BICUBIC, fillcolor=img.getpixel((0, 0)))
    if style == "pixelated":
        small = img.resize((12, 12), Image.BOX).resize(img.size, Image.NEAREST)
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=25)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    raise ValueError(f"unknown held-out style {style!r}: choose {', '.join(HELDOUT)}")


def _corrupt_domain(style: str, stream_data: Path, data: Path, per_class: int) -> None:
    """stream_data/<origin> in `style`: per class the first `per_class` images into
    data/<style> (the artifacts' target), the rest into stream_data/<style>."""
    from PIL import Image

    rng = np.random.default_rng(sorted(HELDOUT).index(style))
    for cls_dir in sorted(p for p in (stream_data / HELDOUT[style]).iterdir() if p.is_dir()):
        for i, f in enumerate(sorted(cls_dir.iterdir())):
            out = (data if i < per_class else stream_data) / style / cls_dir.name / f.name
            out.parent.mkdir(parents=True, exist_ok=True)
            corrupt(style, Image.open(f), rng).save(out)


def _sources(target: str) -> list[str]:
    return [d for d in DIGITS if d != target]


PREPARE_FIELDS = ("streams", "bases", "per_class", "stream_per_class", "mixed_share",
                  "adapt_stages", "adapt_steps")  # fmt: skip


def _prepare(plan: EstimatePlan, work: Path) -> dict:
    """Data, artifacts, stream embeddings: {stream: (x, y)}; y = -1 out of the label set.
    A reused work folder (`--work`) prepared for the same plan is reused as it is."""
    recipe = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(plan).items()
              if k in PREPARE_FIELDS}  # fmt: skip
    done, cache = work / "prepared.json", work / "streams.npz"
    if done.is_file() and json.loads(done.read_text()) == recipe and cache.is_file():
        z = np.load(cache)
        return {k[:-2]: (z[k], z[k[:-2] + "_y"]) for k in z.files if k.endswith("_x")}
    streams = _prepare_anew(plan, work)
    np.savez(cache, **{f"{k}_{a}": v for k, (x, y) in streams.items()
                       for a, v in (("x", x), ("y", y))})  # fmt: skip
    done.write_text(json.dumps(recipe))
    return streams


def _prepare_anew(plan: EstimatePlan, work: Path) -> dict:
    targets = sorted({_base_domain(s) for s in plan.streams} | {"printed"})  # printed: drift
    heldout = [s for s in plan.streams if s in HELDOUT]
    embedded = sorted(
        {s for s in plan.streams if s in DIGITS + SHIFT}
        | {HELDOUT[s] for s in heldout}
        | {"printed", "lcd"}
    )
    data, stream_data = work / "digits", work / "stream"
    _mp2a(
        "data",
        "digits",
        "--out",
        str(data),
        "--per-class",
        str(plan.per_class),
        "--domains",
        ",".join(sorted(set(DIGITS) | set(targets) - set(HELDOUT))),
    )
    _mp2a(
        "data",
        "digits",
        "--out",
        str(stream_data),
        "--seed",
        "1",
        "--per-class",
        str(plan.stream_per_class),
        "--domains",
        ",".join(embedded),
    )
    for style in heldout:
        _corrupt_domain(style, stream_data, data, plan.per_class)
    for base in plan.bases:
        for t in targets:
            args = [
                "adapt",
                "--data",
                str(data),
                "--target",
                t,
                "--sources",
                ",".join(_sources(t)),
                "--method",
                base,
                "--out",
                str(work / f"{base}-{t}"),
                "--quiet",
                "--no-cache",
            ]
            if base != "zeroshot":
                args += [
                    "--stages",
                    str(plan.adapt_stages),
                    "--steps-per-stage",
                    str(plan.adapt_steps),
                ]
            _mp2a(*args)
    return _embed(plan, stream_data, work / f"{plan.bases[0]}-{targets[0]}")


def _embed(plan: EstimatePlan, stream_data: Path, any_run: Path) -> dict:
    import torch
    from PIL import Image

    from adapt.data import open_dataset, read_domain
    from adapt.features import encode_files
    from adapt.models import load_model
    from adapt.shift import harmful_stream
    from mp2a.artifact import load_artifact
    from mp2a.preprocess import preprocess_image

    art = load_artifact(any_run)
    lm = load_model(art.backbone.model)  # every base shares the frozen encoder
    ds = open_dataset(stream_data)
    n = plan.stream_per_class * len(ds.classes)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for d in ds.domains:
        dd = read_domain(ds, d)
        x, _ = encode_files(lm, dd.files, progress=False)
        order = np.random.default_rng(1).permutation(len(x))  # a stream in no class order
        out[d] = (x[order], dd.labels[order])
    for kind in HARMFUL:
        imgs = harmful_stream(kind, n, seed=1)
        px = np.stack(
            [
                preprocess_image(Image.open(io.BytesIO(b)).convert("RGB"), lm.preprocess)
                for b in imgs
            ]
        )
        with torch.no_grad():
            x = torch.cat(
                [
                    lm.model.encode_image(torch.from_numpy(px[i : i + 512]), normalize=True)
                    for i in range(0, len(px), 512)
                ]
            ).numpy()
        out[kind] = (x, np.full(len(x), -1))
    x_l, y_l = out["lcd"]
    k = round(plan.mixed_share * len(x_l))
    x_m = np.concatenate([x_l[: len(x_l) - k], out["letters"][0][:k]])
    y_m = np.concatenate([y_l[: len(x_l) - k], np.full(k, -1)])
    order = np.random.default_rng(2).permutation(len(x_m))
    out[MIXED] = (x_m[order], y_m[order])
    return out


def _acc(head, x: np.ndarray, y: np.ndarray) -> float | None:
    m = y >= 0
    return float((head.probs(x[m]).argmax(1) == y[m]).mean()) if m.any() else None


def slice_starts(n: int, total: int, slices: int) -> list[int]:
    """Where each disjoint draw of `n` samples starts: the first always; another only where it
    leaves at least `n` of the `total` samples unseen by it."""
    return [k * n for k in range(max(1, slices)) if k == 0 or (k + 1) * n <= total - n]


def _case(
    run: Path,
    stream: str,
    x: np.ndarray,
    y: np.ndarray,
    n: int,
    cfg,
    keep: Path | None = None,
    start: int = 0,
) -> dict:
    """One base × stream × size × draw (samples `start` to `start` + n): the estimators on
    the serving head, the worker's candidate and the gate, each against the truth."""
    from mp2a.artifact import SOURCE_FEATURES_FILE, load_artifact
    from online import estimate, gate, worker

    art = load_artifact(run)
    sf = art.tensors(SOURCE_FEATURES_FILE)
    src = estimate.source_view(art.head, sf["features"], sf["labels"], sf["domains"])
    draw = slice(start, start + n)
    traffic, y_t = x[draw], y[draw]
    unseen_x = np.concatenate([x[:start], x[start + n :]])
    unseen_y = np.concatenate([y[:start], y[start + n :]])
    in_set = y_t >= 0
    true_s = _acc(art.head, traffic, y_t)
    row: dict = {"stream": stream, "n": n, "slice": start // n, "true_serving": true_s}
    est = {}
    for method in estimate.all_methods():
        e = estimate.estimate(
            art.head, src, traffic[in_set], method, rows=art.manifest.get("head_rows")
        )
        est[method] = e.to_dict()
    row["estimates_serving"] = est
    t0 = time.time()
    kept, in_set_kept, counts = worker.prepare_traffic(art, traffic)
    cand, decision, _ = worker.train_and_gate(
        art, kept, cfg, art.metrics().get("template"), in_set=in_set_kept
    )
    row["candidate_seconds"] = round(time.time() - t0, 2)
    if keep is not None:  # the candidate's head, for studying the gate offline
        from safetensors.numpy import save_file

        keep.mkdir(parents=True, exist_ok=True)
        tag = f"{run.name}-{stream}-{n}" + (f"-{start // n}" if start else "")
        save_file(cand.head.tensors(), str(keep / f"{tag}.safetensors"))
    # the truth of the gain: the stream's images the candidate never trained on
    hold = gate.holdout_mask(len(kept))
    keep_idx = _kept_index(traffic, kept)
    eval_x = np.concatenate([kept[hold], unseen_x])
    eval_y = np.concatenate([y_t[keep_idx][hold], unseen_y])
    true_c = _acc(cand.head, eval_x, eval_y)
    true_s_eval = _acc(art.head, eval_x, eval_y)
    row.update(
        counts,
        true_serving_eval=true_s_eval,
        true_candidate_eval=true_c,
        true_gain=None if true_c is None else round(true_c - true_s_eval, 4),
        accepted=decision["accepted"],
        reasons=decision["reasons"],
        estimated_gain=decision.get("estimated_gain"),
        estimated_gain_interval=decision.get("estimated_gain_interval"),
        estimated_gain_raw=decision.get("estimated_gain_raw"),
        gain_corrected=decision.get("gain_corrected"),
        serving_adapted=decision.get("serving_adapted"),
        estimate_candidate=decision.get("estimate_candidate"),
        gain_bias_on_sources=decision.get("gain_bias_on_sources"),
        guards_passed=decision.get("guards_passed"),
        ood_in_set_kept=round(float(in_set[keep_idx].mean()), 4) if len(keep_idx) else None,
    )
    return row


def _cross(plan: EstimatePlan, work: Path, streams: dict, cfg) -> list[dict]:
    """Each held-out style's stream served by the mp2a-t head made for the style before it:
    an adapted head whose site's traffic changed. The gate's decision as a scheduled run
    takes it (the head counts as adapted to the traffic) and as a drift run would (the plain
    gain), against the true gain."""
    styles = [s for s in plan.streams if s in HELDOUT]
    out = []
    for i, style in enumerate(styles[1:] + styles[:1]):
        head_of = styles[i]  # the style before it, in a ring
        x, y = streams[style]
        if head_of == style or plan.cross >= len(x) or "mp2a-t" not in plan.bases:
            continue
        row = _case(work / f"mp2a-t-{head_of}", style, x, y, plan.cross, cfg)
        out.append(
            {
                "head_made_for": head_of,
                "stream": style,
                "n": plan.cross,
                "true_serving": row["true_serving"],
                "true_gain": row["true_gain"],
                "serving_adapted": row["serving_adapted"],
                "accepted": row["accepted"],
                "accepted_as_drift_run": decide({**row, "serving_adapted": False}, "auto"),
                "accepted_none": decide(row, "none"),
                "accepted_sources": decide(row, "sources"),
                "estimated_gain_raw": row["estimated_gain_raw"],
                "gain_bias_on_sources": row["gain_bias_on_sources"],
            }
        )
        log.info("cross %s on %s: %s", head_of, style, out[-1])
    return out


def _kept_index(traffic: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Where each kept row stands in `traffic` (prepare_traffic keeps the order)."""
    lookup = {r.tobytes(): i for i, r in enumerate(traffic)}
    return np.asarray([lookup[r.tobytes()] for r in kept], np.int64)


def _drift(plan: EstimatePlan, run: Path, streams: dict, work: Path, cfg, plot: Path) -> dict:
    """printed then lcd into a real store; the worker loop with the drift trigger alone."""
    from mp2a.artifact import load_artifact
    from online import monitor, worker
    from online.state import FileState
    from online.store import StoreConfig, TrafficStore

    shutil.rmtree(work / "drift-run", ignore_errors=True)  # a reused work folder: anew
    run = Path(shutil.copytree(run, work / "drift-run"))
    art = load_artifact(run)
    x = np.concatenate(
        [streams["printed"][0][: plan.drift_before], streams["lcd"][0][: plan.drift_after]]
    )
    y = np.concatenate(
        [streams["printed"][1][: plan.drift_before], streams["lcd"][1][: plan.drift_after]]
    )
    state = FileState(run)
    store = TrafficStore(StoreConfig(path=run / "traffic.sqlite", dim=x.shape[1]))
    drift = worker.Drift(
        cooldown_s=0.0, check_every=plan.drift_chunk, adapt_after=plan.drift_adapt_after
    )
    mcfg = monitor.MonitorConfig(window=500, min_samples=50)
    timeline, flags, served_at = [], [], None
    since = 0  # the loop's last_id: drift is tested on what arrived since the last run
    served_by = np.empty(len(x), dtype=object)  # the version that answered each sample
    serving = str(art.version)
    for start in range(0, len(x), plan.drift_chunk):
        for e, lab in zip(
            x[start : start + plan.drift_chunk], y[start : start + plan.drift_chunk], strict=True
        ):
            store.offer(e, int(lab), 1.0, serving)
        served_by[start : start + plan.drift_chunk] = serving
        store.flush(30)
        seen = start + plan.drift_chunk
        t0 = time.time()
        done = []
        pending = "" in drift.change_id
        settings = drift.due(state, "", since)  # what worker.loop does on each poll
        if not pending and ("" in drift.change_id or settings is not None):
            flags.append(seen)
        before = None
        if settings is not None:
            before = load_artifact_current(run).head
            since = state.traffic_max_id("")
            run_cfg = worker.with_settings(cfg, worker.request_overrides(settings))
            done.append(worker.run_once(state, run_cfg, request={"trigger": "drift"}))
        cur = load_artifact_current(run)
        serving = str(cur.version)
        # what the server's monitor reads: the window's rows that the served version answered
        window = np.arange(max(0, seen - mcfg.window), seen)
        window = window[served_by[window] == serving]
        fig = monitor.compute(monitor.calibrate(cur), x[window], mcfg)
        true = _acc(cur.head, x[window], y[window]) if len(window) else None
        # the served head on the new domain's samples still to come: what adapting bought
        ahead = slice(max(seen, plan.drift_before), len(x))
        true_ahead = (
            float((cur.head.probs(x[ahead]).argmax(1) == y[ahead]).mean())
            if ahead.start < len(x)
            else None
        )
        timeline.append(
            {
                "seen": seen,
                "version": cur.version,
                "n": len(window),
                "true": None if true is None else round(true, 4),
                "true_new_domain_ahead": None if true_ahead is None else round(true_ahead, 4),
                "estimate": fig["estimated_accuracy"],
                "interval": fig["interval"],
                "shift_score": fig["shift_score"],
            }
        )
        for st in done:
            if served_at is None and seen > plan.drift_before:
                served_at = {
                    "samples_after_change": seen - plan.drift_before,
                    "state": st["state"],
                    "seconds": round(time.time() - t0, 2),
                    "n_traffic": st.get("n_traffic"),
                    "gate_gain": (st.get("gate") or {}).get("estimated_gain"),
                    "gate_gain_raw": (st.get("gate") or {}).get("estimated_gain_raw"),
                    "gate_gain_bias_on_sources": (st.get("gate") or {}).get("gain_bias_on_sources"),
                    "gate_gain_correction": cfg.gate.gain_correction,
                    # the new domain's samples after this point, before and after the run
                    "true_ahead_before": round(_acc(before, x[ahead], y[ahead]), 4)
                    if ahead.start < len(x)
                    else None,
                    "true_ahead_after": true_ahead,
                }
    store.close()
    _plot(timeline, plan.drift_before, plot)
    first = timeline[0]["version"] if timeline else None
    return {
        # the monitor's estimate of the served head against its truth on the same rows,
        # before and after the adapted head began serving
        "monitor_error": {
            when: _errors(
                [r for r in timeline if (r["version"] == first) == (when == "before_swap")]
            )
            for when in ("before_swap", "after_swap")
        },
        "stationary_checks": plan.drift_before // plan.drift_chunk,
        "triggers_before_change": sum(f <= plan.drift_before for f in flags),
        "samples_after_change_until_flagged": next(
            (f - plan.drift_before for f in flags if f > plan.drift_before), None
        ),
        "run_after_flag": served_at,
        "timeline": timeline,
        "last_check": drift.last.get(""),
    }


def _errors(rows: list[dict]) -> dict:
    """Estimate − truth over the checks that have both: checks, MAE, max, bias (fractions)."""
    e = np.array(
        [r["estimate"] - r["true"] for r in rows if None not in (r["estimate"], r["true"])]
    )
    if not len(e):
        return {"checks": 0}
    return {"checks": len(e), "mae": round(float(np.abs(e).mean()), 4),
            "max": round(float(np.abs(e).max()), 4), "bias": round(float(e.mean()), 4)}  # fmt: skip


def load_artifact_current(run: Path):
    from mp2a import versions

    return versions.load_current(run)


def _plot(timeline: list[dict], change: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = [r["seen"] for r in timeline]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    true = [np.nan if r["true"] is None else r["true"] for r in timeline]
    ax.plot(seen, true, "k-", label="true accuracy (window, served version's rows)")
    est = [np.nan if r["estimate"] is None else r["estimate"] for r in timeline]
    low = [np.nan if r["interval"][0] is None else r["interval"][0] for r in timeline]
    high = [np.nan if r["interval"][1] is None else r["interval"][1] for r in timeline]
    ax.plot(seen, est, "b-", label="estimated (no labels)")
    ax.fill_between(seen, low, high, color="b", alpha=0.15, label="90 % interval")
    ax.axvline(change, color="r", ls="--", label="printed → lcd")
    for a, b in itertools.pairwise(timeline):
        if b["version"] != a["version"]:
            ax.axvline(b["seen"], color="g", ls=":", label=f"version {b['version']} served")
    ax.set_xlabel("samples served")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("drift: estimated vs true accuracy of the served head", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _kind(c: dict) -> str:
    """A case by its true gain: gain>=2, loss>=1, small (in between) or harmful."""
    g = c["true_gain"]
    if c["stream"] in HARMFUL or g is None:
        return "harmful"
    return "gain>=2" if g >= 0.02 else "loss>=1" if g <= -0.01 else "small"


def decide(c: dict, rule: str) -> bool:
    """The gate's decision on a recorded case under gain rule `rule` (online/gate.py
    `gain_correction`): the same guards, the plain gain less its source bias or not. A case
    recorded before the rule was (no `serving_adapted`) is adapted unless its base is
    zero-shot."""
    from online import gate

    b, eg = c.get("gain_bias_on_sources"), c.get("estimated_gain")
    iv = c.get("estimated_gain_interval") or [None, None]
    if not c.get("guards_passed") or eg is None or iv[0] is None:
        return False
    undo = b[0] if c.get("gain_corrected") and b is not None else 0.0
    raw, raw_low = eg + undo, iv[0] + undo
    adapted = c.get("serving_adapted", c.get("base") != "zeroshot")
    correct = rule == "sources" or (rule == "auto" and adapted is not False)
    less = b[0] if correct and b is not None else 0.0
    return raw - less >= gate.GateConfig().min_gain and raw_low - less > 0


def _summary(cases: list[dict]) -> dict:
    """Error tables and the gate's confusion against the truth."""
    from online import estimate, gate

    errors: dict[str, list[float]] = {m: [] for m in estimate.all_methods()}
    covered = []
    for c in cases:
        if c["true_serving"] is None:
            continue
        for m, e in c["estimates_serving"].items():
            if e["value"] is not None:
                errors[m].append(e["value"] - c["true_serving"])
        d = c["estimates_serving"][estimate.DEFAULT_METHOD]
        if d["value"] is not None:
            covered.append(d["low"] <= c["true_serving"] <= d["high"])
    table = {
        m: {
            "mae": round(float(np.abs(v).mean()), 4),
            "max": round(float(np.abs(v).max()), 4),
            "bias": round(float(np.mean(v)), 4),
            "cases": len(v),
        }
        for m, v in errors.items()
        if v
    }
    confusion = {
        "gain>=2_accepted": 0,
        "gain>=2_rejected": 0,
        "loss>=1_accepted": 0,
        "loss>=1_rejected": 0,
        "small_accepted": 0,
        "small_rejected": 0,
        "harmful_accepted": 0,
        "harmful_rejected": 0,
    }
    by_rule = {rule: dict.fromkeys(confusion, 0) for rule in gate.GAIN_CORRECTIONS}
    for c in cases:
        kind = _kind(c)
        confusion[f"{kind}_{'accepted' if c['accepted'] else 'rejected'}"] += 1
        # every rule of the gain (online/gate.py gain_correction) on the same figures and
        # guards: measured beside the gate's decision, not part of it
        for rule, tally in by_rule.items():
            tally[f"{kind}_{'accepted' if decide(c, rule) else 'rejected'}"] += 1
    # what a site gets under each rule: the served accuracy's mean change per run
    served = {}
    rows = [c for c in cases if _kind(c) != "harmful"]
    for rule in ("recorded", *gate.GAIN_CORRECTIONS):
        took = [c["accepted"] if rule == "recorded" else decide(c, rule) for c in rows]
        served[rule] = {
            "runs": len(rows),
            "accepted": int(sum(took)),
            "mean_change": round(
                float(np.mean([c["true_gain"] * t for c, t in zip(rows, took, strict=True)])), 4
            )
            if rows
            else None,
        }
    # the mixed stream against its clean stream (lcd), draw by draw: where the clean one gains
    clean = {(c["base"], c["n"], c.get("slice", 0)): c for c in cases if c["stream"] == "lcd"}
    mixed = []
    for c in cases:
        ref = clean.get((c["base"], c["n"], c.get("slice", 0)))
        if c["stream"] != MIXED or ref is None or (ref["true_gain"] or 0) < 0.02:
            continue
        mixed.append(
            {
                "base": c["base"],
                "n": c["n"],
                "slice": c.get("slice", 0),
                "accepted": c["accepted"],
                "gain": c["true_gain"],
                "clean_gain": ref["true_gain"],
                "ratio": round(c["true_gain"] / ref["true_gain"], 3),
            }
        )
    return {
        "estimator_error": table,
        "default_interval_coverage": round(float(np.mean(covered)), 4) if covered else None,
        "gate_confusion": confusion,
        "gate_confusion_by_rule": by_rule,
        "gate_confusion_gain_less_source_bias": by_rule["sources"],
        "mixed_vs_clean": mixed,
        "mixed_vs_clean_mean": _mixed_means(cases),
        "served_change_by_rule": served,
    }


def _mixed_means(cases: list[dict]) -> list[dict]:
    """Per base and size over every draw: the mixed stream's mean true gain against the
    clean lcd stream's (one draw's ratio is mostly the draw's luck)."""
    out = []
    for base, n in sorted({(c["base"], c["n"]) for c in cases if c["stream"] == MIXED}):
        g = {s: [c["true_gain"] for c in cases if (c["stream"], c["base"], c["n"]) == (s, base, n)
                 and c["true_gain"] is not None] for s in (MIXED, "lcd")}  # fmt: skip
        if not g[MIXED] or not g["lcd"]:
            continue
        m, cl = float(np.mean(g[MIXED])), float(np.mean(g["lcd"]))
        acc = [c["accepted"] for c in cases if (c["stream"], c["base"], c["n"]) == (MIXED, base, n)]
        out.append({"base": base, "n": n, "draws": len(g[MIXED]), "mean_gain": round(m, 4),
                    "clean_mean_gain": round(cl, 4), "accepted": int(sum(acc)),
                    "ratio": round(m / cl, 3) if cl > 0 else None})  # fmt: skip
    return out


def run(quick: bool = False, plan: EstimatePlan | None = None, work: Path | None = None) -> dict:
    from online import estimate, worker

    plan = plan or (EstimatePlan.quick() if quick else EstimatePlan())
    t_all = time.time()
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="mp2a-bench-estimate-")) if own else Path(work)
    try:
        streams = _prepare(plan, work)
        cfg = worker.WorkerConfig(min_samples=20)
        if quick:
            cfg = replace(cfg, stages=2, steps_per_stage=5)
        cases = []
        for base in plan.bases:
            for stream in plan.streams:
                x, y = streams[stream]
                for n in plan.sizes:
                    if n > len(x):
                        continue
                    run_dir = work / f"{base}-{_base_domain(stream)}"
                    cands = None if own else work / "cands"
                    for start in slice_starts(n, len(x), plan.slices):
                        row = _case(run_dir, stream, x, y, n, cfg, cands, start)
                        row["base"] = base
                        cases.append(row)
                        log.info(
                            "%s %s %d (slice %d): %s",
                            base,
                            stream,
                            n,
                            row["slice"],
                            {k: row[k] for k in ("true_gain", "accepted", "estimated_gain")},
                        )
        full = plan == EstimatePlan()
        plot = REPO_ROOT / "docs" / "drift.png" if full else work / "drift.png"
        drift = _drift(plan, work / f"{plan.bases[0]}-printed", streams, work, cfg, plot)
        cross = _cross(plan, work, streams, cfg) if plan.cross else None
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    summary = _summary(cases)
    err = summary["estimator_error"].get(estimate.DEFAULT_METHOD, {})
    conf = summary["gate_confusion"]
    targets = {
        "estimate_mae_le_3pts": err.get("mae", 1) <= 0.03,
        "estimate_max_le_7pts": err.get("max", 1) <= 0.07,
        "interval_coverage_ge_90pct": (summary["default_interval_coverage"] or 0) >= 0.9,
        "gate_accepts_every_gain_ge_2pts": conf["gain>=2_rejected"] == 0,
        "gate_rejects_every_loss_ge_1pt": conf["loss>=1_accepted"] == 0,
        "gate_rejects_every_harmful_stream": conf["harmful_accepted"] == 0
        if set(HARMFUL) & set(plan.streams)
        else None,
        "drift_flagged_within_500": (drift["samples_after_change_until_flagged"] or 10**9) <= 500,
        "no_trigger_on_stationary_stream": drift["triggers_before_change"] == 0,
        # None: not measured (a plan without the mixed stream and its clean lcd)
        "mixed_accepted_with_80pct_of_clean_gain": (
            bool(summary["mixed_vs_clean"])
            and all(m["accepted"] and m["ratio"] >= 0.8 for m in summary["mixed_vs_clean"])
        )
        if {MIXED, "lcd"} <= set(plan.streams)
        else None,
    }
    return {
        "bench": "estimate",
        "plan": asdict(plan),
        "default_method": estimate.DEFAULT_METHOD,
        **summary,
        "cases": cases,
        "drift": drift,
        **({"cross_style": cross} if cross is not None else {}),
        "targets": targets,
        "seconds": round(time.time() - t_all, 1),
    }


def markdown(r: dict) -> str:
    """docs/ESTIMATES.md's tables from one run's JSON (`python -m benchmarks.estimate
    --markdown RESULT.json`)."""
    pts = lambda v: "—" if v is None else f"{100 * v:+.1f}"  # noqa: E731
    nn = lambda c: f"{c['n']}" + (f" #{c['slice']}" if c.get("slice") else "")  # noqa: E731
    out = ["## Estimators of the serving head's accuracy", ""]
    out += ["| method | MAE (pts) | max (pts) | bias (pts) | cases |", "|---|---:|---:|---:|---:|"]
    for m, e in sorted(r["estimator_error"].items(), key=lambda kv: kv[1]["mae"]):
        name = f"`{m}`" + (" (default)" if m == r["default_method"] else "")
        out.append(
            f"| {name} | {100 * e['mae']:.1f} | {100 * e['max']:.1f} | {pts(e['bias'])} "
            f"| {e['cases']} |"
        )
    cov = r["default_interval_coverage"]
    out += ["", f"The default method's 90 % interval covers the truth in {100 * cov:.0f} % of "
            "cases. Errors per case (estimate − truth, points):", ""]  # fmt: skip
    methods = list(r["estimator_error"])
    out.append("| base | stream | n | true | " + " | ".join(f"`{m}`" for m in methods) + " |")
    out.append("|---|---|---:|---:|" + "---:|" * len(methods))
    for c in r["cases"]:
        if c["true_serving"] is None:
            continue
        cells = []
        for m in methods:
            v = c["estimates_serving"][m]["value"]
            cells.append("—" if v is None else pts(v - c["true_serving"]))
        out.append(
            f"| {c['base']} | {c['stream']} | {nn(c)} | {100 * c['true_serving']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    out += ["", "## The gate's decisions against the true gain", ""]
    out.append("| base | stream | n | true gain (pts) | the gate's gain [80 % interval] | decision "
               "| plain gain less its source bias | first reason |")  # fmt: skip
    out.append("|---|---|---:|---:|---|---|---:|---|")
    for c in r["cases"]:
        eg, iv = c["estimated_gain"], c["estimated_gain_interval"] or [None, None]
        est = "—" if eg is None else f"{pts(eg)} [{pts(iv[0])}, {pts(iv[1])}]"
        reason = (c["reasons"][0][:80] + "…") if c["reasons"] else ""
        verdict = "accepted" if c["accepted"] else "rejected"
        b = c.get("gain_bias_on_sources")
        raw = c.get("estimated_gain_raw", eg)  # a run before the field: its gate's was plain
        less = "—" if b is None or raw is None else pts(raw - b[0])
        out.append(
            f"| {c['base']} | {c['stream']} | {nn(c)} | {pts(c['true_gain'])} | {est} | "
            f"{verdict} | {less} | {reason} |"
        )
    gc = r["gate_confusion"]
    rules = r.get("gate_confusion_by_rule") or {"recorded": gc}
    out += ["", "The gate against the truth: this run's decisions, and every gain rule on the same "
            "candidates and guards (accepted of all; `auto` is the default):", ""]  # fmt: skip
    out.append("| case | recorded | " + " | ".join(f"`{k}`" for k in rules) + " |")
    out.append("|---|---:|" + "---:|" * len(rules))
    for k, label in (("gain>=2", "gain ≥ 2 pts"), ("small", "within (−1, 2) pts"),
                     ("loss>=1", "loss ≥ 1 pt"), ("harmful", "harmful stream")):  # fmt: skip
        cells = [f"{t[k + '_accepted']} of {t[k + '_accepted'] + t[k + '_rejected']}"
                 for t in (gc, *rules.values())]  # fmt: skip
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    if r.get("served_change_by_rule"):
        out += ["", "What a site gets under each rule: the served accuracy's mean change per run "
                "(the true gain where the rule accepts, 0 where it rejects):", "",
                "| rule | runs | accepted | mean change (pts) |",
                "|---|---:|---:|---:|"]  # fmt: skip
        for k, v in r["served_change_by_rule"].items():
            name = k if k == "recorded" else f"`{k}`"
            out.append(f"| {name} | {v['runs']} | {v['accepted']} | {pts(v['mean_change'])} |")
    if r.get("mixed_vs_clean_mean"):
        out += ["", "Mixed stream against the clean lcd stream, over every draw:", "",
                "| base | n | draws | accepted | mean gain (pts) | clean mean gain (pts) | ratio |",
                "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for m in r["mixed_vs_clean_mean"]:
            ratio = "—" if m["ratio"] is None else f"{m['ratio']:.2f}"
            out.append(
                f"| {m['base']} | {m['n']} | {m['draws']} | {m['accepted']} | "
                f"{pts(m['mean_gain'])} | {pts(m['clean_mean_gain'])} | {ratio} |"
            )
    if r.get("mixed_vs_clean"):
        out += ["", "Mixed stream (lcd with letters) against the clean lcd stream:", ""]
        out += ["| base | n | accepted | gain (pts) | clean gain (pts) | ratio |",
                "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for m in r.get("mixed_vs_clean", []):
        out.append(
            f"| {m['base']} | {nn(m)} | {m['accepted']} | {pts(m['gain'])} | "
            f"{pts(m['clean_gain'])} | {m['ratio']:.2f} |"
        )
    if r.get("cross_style"):
        out += ["", "An adapted head after its site's traffic changed (the mp2a-t head of one "
                "style serving another): the default gate as a scheduled run and as a drift run:",
                "", "| head made for | stream | n | true gain (pts) | scheduled (`auto`) "
                "| drift run (`auto`) | `sources` | `none` |",
                "|---|---|---:|---:|---|---|---|---|"]  # fmt: skip
        for c in r["cross_style"]:
            out.append(
                f"| {c['head_made_for']} | {c['stream']} | {c['n']} | {pts(c['true_gain'])} | "
                f"{c['accepted']} | {c['accepted_as_drift_run']} | {c['accepted_sources']} | "
                f"{c['accepted_none']} |"
            )
    d = r["drift"]
    out += ["", "## Drift run (printed, then lcd; docs/drift.png)", ""]
    if r.get("drift_rerun_note"):
        out += [f"({r['drift_rerun_note']}.)", ""]
    out.append(
        f"{d['stationary_checks']} stationary checks, {d['triggers_before_change']} triggers "
        f"before the change; flagged {d['samples_after_change_until_flagged']} samples after "
        f"it; the run it started: `{json.dumps(d['run_after_flag'])}`."
    )
    if r.get("drift_default_gate"):
        dd = r["drift_default_gate"]
        out.append(
            f"\nUnder `gain_correction="
            f"{(dd['run_after_flag'] or {}).get('gate_gain_correction')!r}` the same run: "
            f"`{json.dumps(dd['run_after_flag'])}`."
        )
    for when, e in (d.get("monitor_error") or {}).items():
        if e.get("checks"):
            out.append(
                f"\nThe monitor's estimate of the served head {when.replace('_', ' ')} (on the "
                f"window's rows that version served): {e['checks']} checks, MAE "
                f"{100 * e['mae']:.1f} pts, max {100 * e['max']:.1f}, bias {100 * e['bias']:+.1f}."
            )
    out += ["", "Targets: " + ", ".join(
        f"{k} {'not measured' if v is None else 'met' if v else 'MISSED'}"
        for k, v in r["targets"].items())]  # fmt: skip
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    # python -m benchmarks.estimate [--quick | --heldout [WORK] | --spread [--heldout] [WORK]
    #                                | --markdown RESULT.json]
    if sys.argv[1:2] == ["--markdown"]:
        print(markdown(json.loads(Path(sys.argv[2]).read_text())), end="")
        sys.exit(0)
    logging.basicConfig(level=logging.INFO)
    if sys.argv[1:2] == ["--spread"]:  # --spread [--heldout] [WORK]
        rest = sys.argv[2:]
        held = "--heldout" in rest
        rest = [a for a in rest if a != "--heldout"]
        keep = Path(rest[0]) if rest else None
        print(json.dumps(run(plan=EstimatePlan.spread(held), work=keep)))
        sys.exit(0)
    if sys.argv[1:2] == ["--heldout"]:
        keep = Path(sys.argv[2]) if len(sys.argv) > 2 else None
        print(json.dumps(run(plan=EstimatePlan.heldout(), work=keep)))
        sys.exit(0)
    print(json.dumps(run(quick="--quick" in sys.argv)))
