"""DigitsDA generator: layout, meta, determinism, font hygiene, domain looks, argument checks."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapt import digits
from adapt.glyphs import CLASS_NAMES, PRETRAIN_FONTS, PRINTED_FONTS
from mp2a.errors import DataError

pytestmark = pytest.mark.unit

SIZE = 16
PER_CLASS = 2


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load(root: Path, domain: str, cls: str, i: int) -> np.ndarray:
    return np.asarray(Image.open(root / domain / cls / f"{i:04d}.png"), dtype=np.float32)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("digits")
    meta = digits.build_digits(root, seed=0, per_class=PER_CLASS, image_size=SIZE, workers=1)
    return root, meta


class _GlyphSpy:
    """Wraps render_glyph and records (text, font, offset) of every call."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, text, font, canvas, height_frac, rotation=0.0, offset=(0.0, 0.0)):
        self.calls.append((text, font, offset))
        return self.real(text, font, canvas, height_frac, rotation, offset)


def test_layout(tree: tuple[Path, dict]) -> None:
    root, _ = tree
    assert sorted(p.name for p in root.iterdir()) == sorted([*digits.DOMAINS, "meta.json"])
    for domain in digits.DOMAINS:
        assert sorted(p.name for p in (root / domain).iterdir()) == sorted(CLASS_NAMES)
        for cls in CLASS_NAMES:
            files = sorted(p.name for p in (root / domain / cls).iterdir())
            assert files == [f"{i:04d}.png" for i in range(PER_CLASS)]
            for f in files:
                with Image.open(root / domain / cls / f) as img:
                    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (SIZE, SIZE))


def test_meta(tree: tuple[Path, dict]) -> None:
    root, meta = tree
    assert json.loads((root / "meta.json").read_text()) == meta
    assert meta["name"] == "DigitsDA"
    assert (meta["seed"], meta["per_class"], meta["image_size"]) == (0, PER_CLASS, SIZE)
    assert meta["classes"] == list(CLASS_NAMES)
    assert meta["prompt_template"] == digits.PROMPT_TEMPLATE == "a photo of the number {}."
    assert list(meta["domains"]) == list(digits.DOMAINS)
    for entry in meta["domains"].values():
        assert entry["count"] == PER_CLASS * 10
        assert isinstance(entry["source"], str) and entry["source"]
    hw = meta["domains"]["handwritten"]
    assert hw["reused_with_jitter"] == 0
    assert sum(hw["available_per_class"]) == 1797  # the whole UCI set
    assert meta["domains"]["printed"]["fonts"] == list(PRINTED_FONTS)
    assert not set(meta["domains"]["printed"]["fonts"]) & set(PRETRAIN_FONTS)


def test_same_seed_is_byte_identical_and_parallel_safe(
    tree: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = tree
    digits.build_digits(tmp_path, seed=0, per_class=PER_CLASS, image_size=SIZE, workers=2)
    assert _hashes(tmp_path) == _hashes(root)


def test_a_domain_subset_is_the_same_images(tree: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tree
    meta = digits.build_digits(
        tmp_path, seed=0, per_class=PER_CLASS, image_size=SIZE, workers=1, domains=["street"]
    )
    assert list(meta["domains"]) == ["street"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "street"]
    full = {k: v for k, v in _hashes(root).items() if k.startswith("street/")}
    assert {k: v for k, v in _hashes(tmp_path).items() if k != "meta.json"} == full
    with pytest.raises(DataError, match=r"unknown DigitsDA domain.*'streets'"):
        digits.build_digits(tmp_path / "x", per_class=1, domains=["streets"])
    assert not (tmp_path / "x").exists()


def test_other_seed_changes_every_domain(tree: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tree
    digits.build_digits(tmp_path, seed=1, per_class=PER_CLASS, image_size=SIZE, workers=1)
    a, b = _hashes(root), _hashes(tmp_path)
    assert a.keys() == b.keys()
    for domain in digits.DOMAINS:
        pngs = [k for k in a if k.startswith(domain + "/")]
        assert sum(a[k] != b[k] for k in pngs) == len(pngs), domain


def test_printed_uses_all_printed_fonts_and_no_pretrain_font(monkeypatch) -> None:
    spy = _GlyphSpy(digits.render_glyph)
    monkeypatch.setattr(digits, "render_glyph", spy)
    rng = np.random.default_rng(0)
    for i in range(300):
        digits._RENDERERS["printed"](rng, i % 10, SIZE)
    fonts = {font for _, font, _ in spy.calls}
    assert fonts == set(PRINTED_FONTS)
    assert not fonts & set(PRETRAIN_FONTS)


def test_domain_signatures(tree: tuple[Path, dict]) -> None:
    root, _ = tree
    for cls in CLASS_NAMES:
        for i in range(PER_CLASS):
            printed = _load(root, "printed", cls, i)
            corners = printed[[0, 0, -1, -1], [0, -1, 0, -1]]  # (4, 3)
            assert np.ptp(corners, axis=0).max() <= 1, "printed background must be plain"
            hand = _load(root, "handwritten", cls, i)
            assert hand[[0, 0, -1, -1], [0, -1, 0, -1]].mean() > 180, "light paper"
            assert hand.mean(axis=2).min() < 120, "dark ink"
    # the ink must contrast with the background: the digit is there
    assert all(_load(root, "printed", c, 0).std() > 20 for c in CLASS_NAMES)


def test_textured_is_mnist_m_blend(monkeypatch) -> None:
    monkeypatch.setattr(digits, "_texture_crop", lambda rng, size: np.full((size, size, 3), 200.0))
    img = np.asarray(digits._render_textured(np.random.default_rng(0), 8, 32)).astype(int)
    # |200 - mask*255|: background stays 200, full ink becomes 55, edges dip towards 0
    assert img.max() == 200
    assert (img == 200).mean() > 0.3 and (img == 55).mean() > 0.05
    assert (img[..., 0] == img[..., 1]).all()


def test_street_has_cut_off_neighbours(monkeypatch) -> None:
    spy = _GlyphSpy(digits.render_glyph)
    monkeypatch.setattr(digits, "render_glyph", spy)
    rng = np.random.default_rng(0)
    masks = np.stack([digits._street_mask(rng, i % 10, 32)[..., 0] for i in range(50)])
    ink = masks > 0.5  # (50, 32, 32)
    assert ink[:, :, 12:20].any(axis=(1, 2)).all()  # the centre digit, always
    left, right = ink[:, :, :2].any(axis=(1, 2)), ink[:, :, -2:].any(axis=(1, 2))
    # usually, not always, a neighbour on each side, cut by the image edge
    assert 0.5 < left.mean() < 1 and 0.5 < right.mean() < 1
    assert {font for _, font, _ in spy.calls} <= set(digits.STREET_FONTS)


def test_handwritten_reuses_with_jitter_when_short(monkeypatch, tmp_path: Path, caplog) -> None:
    few = tuple(s[:3] for s in digits._uci_digits())
    monkeypatch.setattr(digits, "_uci_digits", lambda: few)
    with caplog.at_level(logging.WARNING, logger="adapt.digits"):
        meta = digits.build_digits(tmp_path, per_class=4, image_size=SIZE, workers=1)
    hw = meta["domains"]["handwritten"]
    assert hw["available_per_class"] == [3] * 10
    assert hw["reused_with_jitter"] == 10
    assert "reused" in caplog.text
    for cls in CLASS_NAMES:
        imgs = [_load(tmp_path, "handwritten", cls, i) for i in range(4)]
        assert all(np.abs(imgs[3] - im).mean() > 1 for im in imgs[:3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_class": 0}, "per_class"),
        ({"image_size": 15}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_args(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        digits.build_digits(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_refuses_foreign_folder_and_file(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        digits.build_digits(tmp_path, per_class=1, image_size=SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]
    with pytest.raises(DataError, match="not a folder"):
        digits.build_digits(tmp_path / "precious.txt", per_class=1, image_size=SIZE)


def test_overwrites_digits_tree_cleanly(tmp_path: Path) -> None:
    digits.build_digits(tmp_path, per_class=2, image_size=SIZE, workers=1)
    (tmp_path / "printed" / "zero" / "stale.png").write_bytes(b"x")
    meta = digits.build_digits(tmp_path, per_class=1, image_size=SIZE, workers=1)
    assert meta["per_class"] == 1
    pngs = sorted(tmp_path.rglob("*.png"))
    assert len(pngs) == 4 * 10 and {p.name for p in pngs} == {"0000.png"}


def test_contact_sheet(tree: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tree
    out = tmp_path / "sheet" / "digits.png"
    digits.contact_sheet(root, out, per_domain=12)
    with Image.open(out) as img:
        assert img.mode == "RGB"
        assert img.height >= 4 * 2 * SIZE  # one row per domain, tiles scaled x2
        assert img.width >= 12 * 2 * SIZE
    with pytest.raises(DataError, match="not a DigitsDA tree"):
        digits.contact_sheet(tmp_path / "sheet", tmp_path / "x.png")


def test_shift_styles_are_built_only_when_asked_and_deterministically(tmp_path: Path) -> None:
    """lcd and dotmatrix: extra domains beside the four, byte-identical per seed, and adding
    them leaves the four DigitsDA domains unchanged."""
    from adapt.shift import SHIFT_DOMAINS

    assert not set(SHIFT_DOMAINS) & set(digits.DOMAINS)
    a = tmp_path / "a"
    meta = digits.build_digits(
        a, per_class=3, image_size=32, workers=1, domains=[*digits.DOMAINS[:1], *SHIFT_DOMAINS]
    )
    assert list(meta["domains"]) == ["printed", "lcd", "dotmatrix"]
    assert "seven-segment" in meta["domains"]["lcd"]["source"]
    b = tmp_path / "b"
    digits.build_digits(b, per_class=3, image_size=32, workers=1, domains=list(SHIFT_DOMAINS))
    ha, hb = _hashes(a), _hashes(b)
    for k, v in hb.items():
        if k != "meta.json":
            assert ha[k] == v, k
    only_printed = tmp_path / "c"
    digits.build_digits(only_printed, per_class=3, image_size=32, workers=1, domains=["printed"])
    hc = _hashes(only_printed)
    assert all(ha[k] == v for k, v in hc.items() if k.startswith("printed/"))
    for domain in SHIFT_DOMAINS:
        img = _load(a, domain, "eight", 0)
        assert img.shape == (32, 32, 3) and img.std() > 10  # a drawn glyph, not a blank


def test_seven_segment_and_dot_matrix_glyphs_are_the_digit_shapes() -> None:
    """The segment and dot tables: 8 lights everything, 1 the fewest; each digit distinct."""
    from adapt.shift import DOTS, SEGMENTS

    assert SEGMENTS[8] == ("abcdefg",) and SEGMENTS[1] == ("bc",)
    firsts = {v[0] for v in SEGMENTS.values()}
    assert len(firsts) == 10
    assert len({rows for rows in DOTS.values()}) == 10
    assert all(len(rows) == 7 and all(len(r) == 5 for r in rows) for rows in DOTS.values())


def test_harmful_streams_are_deterministic_images_outside_the_label_set() -> None:
    import io

    from adapt.shift import LETTERS, harmful_stream

    assert not set(LETTERS) & set("0123456789OoIlSZBgq")
    for kind in ("letters", "noise"):
        a, b = harmful_stream(kind, 5, seed=1), harmful_stream(kind, 5, seed=1)
        assert a == b and harmful_stream(kind, 5, seed=2) != a
        for png in a:
            im = Image.open(io.BytesIO(png))
            assert im.size == (32, 32) and im.mode == "RGB"
    with pytest.raises(ValueError, match="unknown harmful stream 'cats'"):
        harmful_stream("cats", 1)
