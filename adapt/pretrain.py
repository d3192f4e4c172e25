"""Contrastive pretraining of the embedded tiny CLIP (`tiny-digits`) on captioned synthetic digits.

The images are digits rendered with PRETRAIN_FONTS (disjoint from DigitsDA's `printed` faces)
in varied colours, sizes, rotations and backgrounds; captions come from varied templates and
mention the colours when the template does. Because many images in a batch share a class, the
loss is a multi-positive InfoNCE: an image and a caption are a positive pair when the class
matches and every colour the caption names matches the image.

Reproduce the committed checkpoint with `mp2a pretrain-tiny --out DIR` (defaults = the card).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from adapt.glyphs import CLASS_NAMES, PRETRAIN_FONTS, render_glyph

log = logging.getLogger(__name__)

COLOURS = {
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (235, 215, 50),
    "orange": (240, 140, 30),
    "purple": (130, 60, 170),
    "brown": (120, 75, 40),
    "pink": (240, 150, 190),
    "cyan": (60, 200, 210),
}
_NAMES = tuple(COLOURS)

# Templates without colour words match any image of the class.
PLAIN_TEMPLATES = (
    "a photo of the number {c}.",
    "a photo of a {c}.",
    "the digit {c}.",
    "the number {c}.",
    "an image of the digit {c}.",
    "a picture of a {c}.",
    "a blurry photo of the number {c}.",
    "a close-up photo of the digit {c}.",
    "{c}",
    "number {c}",
)
COLOUR_TEMPLATES = (
    "a {fg} {c} on a {bg} background.",
    "the number {c} in {fg} on {bg}.",
    "a photo of a {fg} digit {c}.",
    "a {c} on a {bg} background.",
)


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    pool_size: int = 20000
    seed: int = 0
    threads: int = 2


@dataclass(frozen=True)
class Sample:
    label: int
    fg: int  # index into _NAMES
    bg: int


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _pick_colours(rng: np.random.Generator) -> tuple[int, int]:
    while True:
        fg, bg = rng.integers(len(_NAMES), size=2)
        if abs(_luma(COLOURS[_NAMES[fg]]) - _luma(COLOURS[_NAMES[bg]])) > 60:
            return int(fg), int(bg)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 25) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.integers(-amount, amount + 1, 3), 0, 255)


def _background(bg: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Plain, gradient, noisy or cluttered background around colour `bg`: (S, S, 3) float."""
    img = np.broadcast_to(bg, (size, size, 3)).astype(np.float32).copy()
    kind = rng.random()
    if kind < 0.2:  # linear gradient
        ramp = np.linspace(-1, 1, size, dtype=np.float32)
        g = ramp[None, :] if rng.random() < 0.5 else ramp[:, None]
        img += g[..., None] * rng.uniform(15, 45)
    elif kind < 0.35:  # pixel noise
        img += rng.normal(0, rng.uniform(5, 20), img.shape).astype(np.float32)
    elif kind < 0.5:  # a few straight strokes of another shade
        for _ in range(rng.integers(1, 4)):
            shade = np.clip(bg + rng.integers(-60, 61, 3), 0, 255)
            if rng.random() < 0.5:
                r = int(rng.integers(size))
                img[r : r + int(rng.integers(1, 3)), :] = shade
            else:
                c = int(rng.integers(size))
                img[:, c : c + int(rng.integers(1, 3))] = shade
    return img


def render_sample(s: Sample, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One synthetic training image for `s`."""
    font = PRETRAIN_FONTS[int(rng.integers(len(PRETRAIN_FONTS)))]
    mask = render_glyph(
        str(s.label),
        font,
        size,
        height_frac=float(rng.uniform(0.45, 0.9)),
        rotation=float(rng.uniform(-20, 20)),
        offset=(float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.1, 0.1))),
    )
    m = np.asarray(mask, np.float32)[..., None] / 255.0  # (S, S, 1)
    if rng.random() < 0.25:  # neighbouring digits cut by the frame, as on house numbers
        side = -0.62 if rng.random() < 0.5 else 0.62
        other = render_glyph(str(int(rng.integers(10))), font, size, 0.7, 0.0, (side, 0.0))
        m = np.maximum(m, np.asarray(other, np.float32)[..., None] / 255.0)
    fg = _jitter(COLOURS[_NAMES[s.fg]], rng)
    bg = _background(_jitter(COLOURS[_NAMES[s.bg]], rng), size, rng)
    img = np.clip(bg * (1 - m) + fg * m, 0, 255).astype(np.uint8)
    out = Image.fromarray(img)
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    return out


def caption(s: Sample, rng: np.random.Generator) -> tuple[str, bool, bool]:
    """A caption for `s` and whether it names the foreground / background colour."""
    c = CLASS_NAMES[s.label]
    if rng.random() < 0.6:
        return PLAIN_TEMPLATES[int(rng.integers(len(PLAIN_TEMPLATES)))].format(c=c), False, False
    t = COLOUR_TEMPLATES[int(rng.integers(len(COLOUR_TEMPLATES)))]
    return t.format(c=c, fg=_NAMES[s.fg], bg=_NAMES[s.bg]), "{fg}" in t, "{bg}" in t


def positives(samples: list[Sample], names_fg: np.ndarray, names_bg: np.ndarray) -> torch.Tensor:
    """(B, B) 0/1 matrix: image i is a positive for caption j."""
    lab = np.array([s.label for s in samples])
    fg = np.array([s.fg for s in samples])
    bg = np.array([s.bg for s in samples])
    ok = lab[:, None] == lab[None, :]
    ok &= ~names_fg[None, :] | (fg[:, None] == fg[None, :])
    ok &= ~names_bg[None, :] | (bg[:, None] == bg[None, :])
    return torch.from_numpy(ok.astype(np.float32))


def multi_positive_clip_loss(
    img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    logits = scale * img @ txt.T  # (B, B)
    t_i = pos / pos.sum(1, keepdim=True)
    t_t = pos.T / pos.T.sum(1, keepdim=True)
    li = -(t_i * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(t_t * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (li + lt) / 2


def _make_pool(cfg: PretrainConfig, size: int) -> tuple[torch.Tensor, list[Sample]]:
    rng = np.random.default_rng([cfg.seed, 1])
    samples, pixels = [], np.empty((cfg.pool_size, size, size, 3), np.uint8)
    for i in range(cfg.pool_size):
        fg, bg = _pick_colours(rng)
        s = Sample(int(rng.integers(10)), fg, bg)
        pixels[i] = np.asarray(render_sample(s, rng, size))
        samples.append(s)
    return torch.from_numpy(pixels), samples


def pretrain(out: Path, cfg: PretrainConfig = PretrainConfig()) -> dict:
    """Train tiny-digits from scratch and write `out/` (config + safetensors + card.json)."""
    import open_clip
    from safetensors.torch import save_file

    from adapt.models import BUILTIN_DIR

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    src = BUILTIN_DIR / "tiny-digits" / "open_clip_config.json"
    config = json.loads(src.read_text())
    model = open_clip.create_model(
        "local-dir:" + str(src.parent), load_weights=False
    )  # random init
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(src.parent))
    pp = config["preprocess_cfg"]
    size = int(pp["size"])
    mean = torch.tensor(pp["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"]).view(1, 3, 1, 1)

    t0 = time.time()
    pool, samples = _make_pool(cfg, size)
    log.info("rendered %d training images in %.1fs", len(samples), time.time() - t0)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng([cfg.seed, 2])
    model.train()
    history = []
    t_train = time.time()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(len(samples), size=cfg.batch_size)
        batch = [samples[i] for i in idx]
        x = pool[idx].permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)
        x = (x - mean) / std
        caps = [caption(s, rng) for s in batch]
        texts = [c[0] for c in caps]
        uniq = sorted(set(texts))  # encode each distinct caption once
        where = torch.tensor([uniq.index(t) for t in texts])
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokenizer(uniq), normalize=True)[where]  # (B, D)
        pos = positives(batch, np.array([c[1] for c in caps]), np.array([c[2] for c in caps]))
        loss = multi_positive_clip_loss(img, txt, pos, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("step %d loss %.4f lr %.2e", step, loss.item(), lr)
            history.append({"step": step, "loss": round(loss.item(), 4)})
    seconds = time.time() - t_train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, out / "open_clip_config.json")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    card = {
        "config": asdict(cfg),
        "render_seconds": round(t_train - t0, 1),
        "train_seconds": round(seconds, 1),
        "final_loss": history[-1]["loss"],
        "history": history,
        "torch": torch.__version__,
    }
    (out / "pretrain.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
