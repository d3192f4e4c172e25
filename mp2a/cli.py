"""The `mp2a` command line. `main(argv)` is callable from tests and returns the exit code.

Heavy packages (torch, open_clip, bentoml) are imported inside the sub-commands that need
them, so `mp2a --help` and the core stay light.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mp2a.errors import Mp2aError

log = logging.getLogger("mp2a")


def split_list(text: str) -> list[str]:
    """A comma-separated list as users type it: `amazon, dslr` is `amazon,dslr`."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _cmd_data_digits(args: argparse.Namespace) -> int:
    from adapt.digits import build_digits

    domains = split_list(args.domains) if args.domains else None
    meta = build_digits(
        Path(args.out),
        seed=args.seed,
        per_class=args.per_class,
        progress=not args.quiet,
        domains=domains,
    )
    counts = {d: v["count"] for d, v in meta["domains"].items()}
    print(json.dumps({"out": args.out, "counts": counts}))
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from adapt.features import default_cache_dir
    from adapt.progressive import FitConfig
    from adapt.run import AdaptRequest, adapt

    sources = tuple(split_list(args.sources)) if args.sources else None
    cache = None if args.no_cache else Path(args.cache_dir or default_cache_dir())
    metrics = adapt(
        AdaptRequest(
            data=Path(args.data),
            target=args.target,
            out=Path(args.out),
            method=args.method,
            sources=sources,
            model=args.model,
            pretrained=args.pretrained,
            seed=args.seed,
            template=args.template,
            fit=FitConfig(
                stages=args.stages,
                r0=args.r0,
                schedule=args.schedule,
                steps_per_stage=args.steps_per_stage,
                agreement_weight=args.agreement,
            ),
            cache_dir=cache,
            progress=not args.quiet,
            force=args.force,
        )
    )
    acc = metrics["target_accuracy"]
    summary = {k: metrics[k] for k in ("method", "target", "target_accuracy", "seconds")}
    print(json.dumps(summary))
    if acc is not None and not args.quiet:
        print(
            f"{metrics['method']} on {metrics['target']}: {100 * acc:.1f}% top-1", file=sys.stderr
        )
    return 0


def _cmd_pretrain_tiny(args: argparse.Namespace) -> int:
    from adapt.pretrain import PretrainConfig, pretrain

    card = pretrain(Path(args.out), PretrainConfig(steps=args.steps, seed=args.seed))
    print(json.dumps({k: card[k] for k in ("train_seconds", "final_loss")}))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from export.run import export

    report = export(
        Path(args.run), args.format, data=Path(args.data) if args.data else None, n=args.n
    )
    print(json.dumps(report))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from serving.launch import serve

    return serve(
        Path(args.run),
        port=args.port,
        host=args.host,
        backend=args.backend,
        precision=args.precision,
        hub=args.hub,
        site=args.site,
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "adapt":
        from benchmarks.adapt import run

        result = run(quick=args.quick)
    elif args.what == "export":
        from benchmarks.export import run as run_export

        result = run_export(quick=args.quick)
    elif args.what == "serving":
        from benchmarks.serving import run as run_serving

        photos = Path(args.photos) if args.photos else None
        if photos is not None and not photos.is_dir():
            raise Mp2aError(f"--photos {args.photos}: not a folder; give an ImageFolder root")
        models = tuple(args.models.split(",")) if args.models else None
        unknown = [m for m in models or () if m not in ("tiny-digits", "ViT-B-16")]
        if unknown:
            raise Mp2aError(f"--models {args.models}: choose from tiny-digits, ViT-B-16")
        result = run_serving(quick=args.quick, photos=photos, peers=args.peers, models=models)
    elif args.what == "edge":
        from benchmarks.edge import run as run_edge

        result = run_edge(quick=args.quick, work=Path(args.work) if args.work else None)
    elif args.what == "estimate":
        from benchmarks.estimate import run as run_estimate

        result = run_estimate(quick=args.quick, work=Path(args.work) if args.work else None)
    elif args.what == "fleet" and args.replicas is not None:
        from benchmarks.fleet_scale import run as run_scale

        if args.replicas < 1:
            raise Mp2aError(f"--replicas {args.replicas}: give 1 or more replicas")
        work = Path(args.work) if args.work else None
        result = run_scale(args.replicas, quick=args.quick, work=work)
    elif args.what == "fleet":
        from benchmarks.fleet import run as run_fleet

        result = run_fleet(quick=args.quick, work=Path(args.work) if args.work else None)
    else:
        import dataclasses

        from benchmarks.online import OnlinePlan
        from benchmarks.online import run as run_online

        plan = OnlinePlan.quick() if args.quick else OnlinePlan()
        if not 0 <= (args.source_margin or 0) <= 1:
            raise Mp2aError("--source-margin must be in 0..1")
        if args.method not in (None, "mp2a", "mp2a-t"):
            raise Mp2aError(f"--method {args.method!r}: choose mp2a-t or mp2a")
        plan = dataclasses.replace(plan, method=args.method, source_margin=args.source_margin)
        result = run_online(plan=plan, work=Path(args.work) if args.work else None)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


class _HelpWithDefaults(argparse.HelpFormatter):
    """`--help` shows each option's default, where it has a value worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mp2a", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser(
        "data", help="build a benchmark dataset", formatter_class=_HelpWithDefaults
    )
    data_sub = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    dg = data_sub.add_parser(
        "digits",
        help="DigitsDA: printed, handwritten, textured, street",
        formatter_class=_HelpWithDefaults,
    )
    dg.add_argument("--out", required=True, help="output folder DIR/<domain>/<class>/*.png")
    dg.add_argument("--seed", type=int, default=0, help="random seed")
    dg.add_argument("--per-class", type=int, default=100, help="images per class and domain")
    dg.add_argument("--domains", help="comma-separated subset (default: all four)")
    dg.add_argument("--quiet", action="store_true")
    dg.set_defaults(func=_cmd_data_digits)

    ad = sub.add_parser(
        "adapt",
        help="adapt to a target domain and write an artifact",
        formatter_class=_HelpWithDefaults,
    )
    ad.add_argument("--data", required=True, help="ImageFolder root: DIR/<domain>/<class>/*")
    ad.add_argument("--target", required=True, help="target domain (its labels: evaluation only)")
    ad.add_argument("--sources", help="comma-separated source domains (default: all others)")
    ad.add_argument(
        "--method",
        default="mp2a",
        help="zeroshot, transductive, source-only, oneshot, mp2a or mp2a-t",
    )
    ad.add_argument(
        "--model", default="tiny-digits", help="tiny-digits, an open_clip name, or a model folder"
    )
    ad.add_argument("--pretrained", help="open_clip tag, checkpoint file, or 'random'")
    ad.add_argument(
        "--template",
        help="hand prompt with {} for the class name (default: the data's meta.json "
        "prompt_template, else 'a photo of a {}.')",
    )
    ad.add_argument("--seed", type=int, default=0, help="random seed")
    ad.add_argument("--stages", type=int, default=5, help="progressive stages T")
    ad.add_argument("--r0", type=float, default=0.2, help="first stage's selected fraction")
    ad.add_argument("--schedule", default="linear", help="r_t growth: linear, cosine or exp")
    ad.add_argument("--steps-per-stage", type=int, default=100, help="training steps per stage")
    ad.add_argument("--agreement", type=float, default=1.0, help="L1 agreement loss weight")
    ad.add_argument("--out", required=True, help="artifact folder to write")
    ad.add_argument(
        "--cache-dir", help="feature cache (default: $MP2A_CACHE_DIR or ~/.cache/mp2a/features)"
    )
    ad.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    ad.add_argument("--quiet", action="store_true", help="no progress bars")
    ad.add_argument(
        "--force",
        action="store_true",
        help="replace an --out run holding online state (its traffic.sqlite and versions/)",
    )
    ad.set_defaults(func=_cmd_adapt)

    ex = sub.add_parser(
        "export",
        help="export the image encoder, with a parity report",
        formatter_class=_HelpWithDefaults,
    )
    ex.add_argument("run", help="artifact folder (from mp2a adapt)")
    ex.add_argument("--format", required=True, help="onnx, onnx-int8 or tensorrt")
    ex.add_argument("--data", help="dataset holding the target images (default: from metrics)")
    ex.add_argument("--n", type=int, default=512, help="parity images")
    ex.set_defaults(func=_cmd_export)

    sv = sub.add_parser(
        "serve", help="serve an artifact over HTTP (BentoML)", formatter_class=_HelpWithDefaults
    )
    sv.add_argument("run", help="artifact folder (from mp2a adapt)")
    sv.add_argument("--port", type=int, default=3000, help="TCP port, 1-65535")
    sv.add_argument("--host", default="0.0.0.0", help="address to bind (0.0.0.0: all)")
    sv.add_argument("--backend", default="ort", help="ort (exported encoder) or torch")
    sv.add_argument("--precision", default="fp32", help="ort encoder: fp32 or int8")
    sv.add_argument("--hub", help="an edge: the hub's URL (with --site and MP2A_EDGE_TOKEN)")
    sv.add_argument("--site", help="an edge: this site's name on the hub")
    sv.set_defaults(func=_cmd_serve)

    bn = sub.add_parser(
        "bench",
        help="benchmarks; figures as one JSON object on stdout",
        formatter_class=_HelpWithDefaults,
    )
    bn.add_argument(
        "what", choices=["adapt", "export", "serving", "online", "fleet", "edge", "estimate"]
    )
    bn.add_argument("--json", action="store_true", help="compact JSON (one line)")
    bn.add_argument("--quick", action="store_true", help="small models only")
    bn.add_argument("--method", help="online: the worker's method, mp2a-t (default) or mp2a")
    bn.add_argument(
        "--source-margin", type=float, help="online: the gate's source-accuracy margin (0.05)"
    )
    bn.add_argument(
        "--work", help="online, fleet, edge, estimate: keep the work folder (online: reuse it)"
    )
    bn.add_argument("--photos", help="serving: an ImageFolder of camera photos (dslr, webcam)")
    bn.add_argument(
        "--peers", action="store_true", help="serving: LitServe and plain BentoML side by side"
    )
    bn.add_argument("--models", help="serving: tiny-digits (default), ViT-B-16, comma-separated")
    bn.add_argument(
        "--replicas",
        type=int,
        help="fleet: N light replica processes (state client, store writer, watcher, worker "
        "loop; no model) directly, through PgBouncer, and through PgBouncer without LISTEN",
    )
    bn.set_defaults(func=_cmd_bench)

    pt = sub.add_parser(
        "pretrain-tiny",
        help="re-train the embedded tiny CLIP from scratch",
        formatter_class=_HelpWithDefaults,
    )
    pt.add_argument("--out", required=True, help="model folder to write")
    pt.add_argument("--steps", type=int, default=1500, help="training steps")
    pt.add_argument("--seed", type=int, default=0, help="random seed")
    pt.set_defaults(func=_cmd_pretrain_tiny)
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (tests swap it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_OWN_LOGGERS = ("mp2a", "adapt", "export", "serving")


def _setup_logging(verbose: bool) -> None:
    """Our warnings on stderr; third-party chatter (download retries...) only with -v."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(lambda r: r.name.split(".")[0] in _OWN_LOGGERS)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except Mp2aError as e:
        print(f"mp2a: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mp2a: interrupted", file=sys.stderr)
        return 130
