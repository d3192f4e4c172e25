"""Model references are resolved here, in one place.

tiny-digits                  the embedded tiny CLIP shipped in adapt/models/tiny-digits/
DIR (or local-dir:DIR)       a saved model folder: open_clip_config.json + weights
NAME --pretrained TAG|FILE   any open_clip architecture with a named tag (downloads, so
                             online only) or a local checkpoint file
NAME --pretrained random     random weights (timing benchmarks only)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mp2a.artifact import Backbone, sha256_file
from mp2a.errors import ModelError
from mp2a.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "tiny-digits"


@dataclass
class LoadedModel:
    """A frozen open_clip model with what describes it."""

    model: torch.nn.Module  # open_clip CLIP: encode_image, encode_text, logit_scale
    tokenizer: Callable[[list[str]], torch.Tensor]
    backbone: Backbone
    preprocess: PreprocessSpec

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)


def builtin_models() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "open_clip_config.json").is_file())


def _weights_file(folder: Path) -> Path | None:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    return found[0] if found else None


def _preprocess_spec(model: torch.nn.Module) -> PreprocessSpec:
    cfg = getattr(model.visual, "preprocess_cfg", {})
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, tuple | list) else size
    spec = PreprocessSpec(
        image_size=int(size),
        mean=tuple(cfg.get("mean", PreprocessSpec(1).mean)),  # type: ignore[arg-type]
        std=tuple(cfg.get("std", PreprocessSpec(1).std)),  # type: ignore[arg-type]
        interpolation=str(cfg.get("interpolation", "bicubic")),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
    )
    if spec.resize_mode != "shortest" or spec.interpolation not in ("bicubic", "bilinear"):
        raise ModelError(
            f"preprocessing {spec.resize_mode}/{spec.interpolation} is not supported; "
            "mp2a supports resize_mode 'shortest' with bicubic or bilinear interpolation"
        )
    return spec


def _state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_model(
    name: str = DEFAULT_MODEL, pretrained: str | None = None, device: str = "cpu"
) -> LoadedModel:
    """Resolve a model reference (see module docstring) into a frozen model on `device`."""
    import open_clip

    ref = name[len("local-dir:") :] if name.startswith("local-dir:") else name
    folder = BUILTIN_DIR / ref if ref in builtin_models() else Path(ref)
    try:
        if folder.is_dir():
            if not (folder / "open_clip_config.json").is_file():
                raise ModelError(
                    f"model folder {folder} has no open_clip_config.json; a model folder holds "
                    "open_clip_config.json and its weights (.safetensors)"
                )
            weights = _weights_file(folder)
            if weights is None:
                raise ModelError(f"model folder {folder} has no .safetensors weights")
            model = open_clip.create_model("local-dir:" + str(folder), device=device)
            tokenizer = open_clip.get_tokenizer("local-dir:" + str(folder))
            backbone = Backbone(
                model=ref if ref in builtin_models() else str(folder.resolve()),
                pretrained=None,
                weights_sha256=sha256_file(weights),
                embed_dim=0,
            )
        elif ref in open_clip.list_models():
            if pretrained is None:
                tags = open_clip.list_pretrained_tags_by_model(ref)
                raise ModelError(
                    f"model {ref!r} needs --pretrained: a tag ({', '.join(tags) or 'none known'}), "
                    "a local checkpoint file, or 'random' for random weights"
                )
            is_file = Path(pretrained).is_file()
            model = open_clip.create_model(
                ref, pretrained=None if pretrained == "random" else pretrained, device=device
            )
            tokenizer = open_clip.get_tokenizer(ref)
            if is_file:
                digest = sha256_file(Path(pretrained))
            elif pretrained == "random":  # every random init differs: hash the weights
                digest = _state_sha256(model)
            else:
                digest = f"tag:{pretrained}"
            backbone = Backbone(ref, pretrained, digest, 0)
        else:
            raise ModelError(
                f"unknown model {name!r}. Available: built-in {', '.join(builtin_models())}; "
                "any open_clip name (e.g. ViT-B-16) with --pretrained; or a model folder path"
            )
    except ModelError:
        raise
    except (RuntimeError, OSError, ValueError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        first = first.split(". Last error")[0][:200]
        raise ModelError(
            f"cannot load model {name!r} (pretrained={pretrained!r}): {first}. Offline, "
            "pass a local checkpoint with --pretrained FILE or a model folder with --model DIR"
        ) from e
    model = _freeze(model)
    embed_dim = int(model.text_projection.shape[1])
    backbone = Backbone(backbone.model, backbone.pretrained, backbone.weights_sha256, embed_dim)
    return LoadedModel(model, tokenizer, backbone, _preprocess_spec(model))


def load_backbone(backbone: Backbone, device: str = "cpu") -> LoadedModel:
    """Rebuild the frozen model an artifact was made with, refusing different weights."""
    lm = load_model(backbone.model, backbone.pretrained, device)
    if lm.backbone.weights_sha256 != backbone.weights_sha256:
        raise ModelError(
            f"the weights of {backbone.model!r} here (sha256 {lm.backbone.weights_sha256[:12]}…) "
            f"differ from the artifact's ({backbone.weights_sha256[:12]}…); restore the original "
            "checkpoint or re-run `mp2a adapt`"
        )
    return lm
