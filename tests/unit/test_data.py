import numpy as np
import pytest
from PIL import Image

from adapt.data import has_splits, open_dataset, read_domain
from mp2a.errors import DataError


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_imagefolder_classes_and_labels(tmp_path):
    for dom in ("art", "real"):
        for cls in ("alarm_clock", "bike"):
            for i in range(2):
                _img(tmp_path / dom / cls / f"{i}.jpg")
    (tmp_path / "real" / "bike" / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path)
    assert ds.domains == ["art", "real"]
    assert ds.classes == ["alarm clock", "bike"]
    d = read_domain(ds, "real")
    assert len(d.files) == 4 and d.labels.tolist() == [0, 0, 1, 1] and d.labeled


def test_domainnet_split_lists(tmp_path):
    for cls in ("aircraft_carrier", "zebra"):
        for i in range(3):
            _img(tmp_path / "clipart" / cls / f"clipart_{i}.jpg")
    (tmp_path / "clipart_train.txt").write_text(
        "clipart/aircraft_carrier/clipart_0.jpg 0\n"
        "clipart/zebra/clipart_1.jpg 344\n"
        "\n"
        "clipart/zebra/clipart_2.jpg 344\n"
    )
    (tmp_path / "clipart_test.txt").write_text("clipart/aircraft_carrier/clipart_2.jpg 0\n")
    ds = open_dataset(tmp_path)
    assert has_splits(ds, "clipart")
    tr = read_domain(ds, "clipart", "train")
    assert [p.name for p in tr.files] == ["clipart_0.jpg", "clipart_1.jpg", "clipart_2.jpg"]
    # labels come from the class folder (DomainNet's ids index its full 345-class list)
    assert tr.labels.tolist() == [0, 1, 1]
    te = read_domain(ds, "clipart", "test")
    assert te.labels.tolist() == [0] and te.files[0].parent.name == "aircraft_carrier"
    assert len(read_domain(ds, "clipart").files) == 6  # no split: every image

    (tmp_path / "clipart_test.txt").write_text("just_a_file.jpg 3\n")
    with pytest.raises(DataError, match=r"clipart_test.txt:1: expected"):
        read_domain(ds, "clipart", "test")


def test_meta_json_sets_class_order_and_template(tmp_path):
    for cls in ("one", "zero"):
        _img(tmp_path / "a" / cls / "0.png")
    (tmp_path / "meta.json").write_text(
        '{"classes": ["zero", "one"], "prompt_template": "a photo of the number {}."}'
    )
    ds = open_dataset(tmp_path)
    assert ds.classes == ["zero", "one"]
    assert ds.prompt_template == "a photo of the number {}."
    assert np.array_equal(read_domain(ds, "a").labels, [0, 1])


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no domain folders"):
        open_dataset(tmp_path / "empty")
    _img(tmp_path / "d" / "x" / "cls" / "0.png")
    (tmp_path / "d" / "y" / "cls").mkdir(parents=True)
    ds = open_dataset(tmp_path / "d")
    with pytest.raises(DataError, match="holds no images"):
        read_domain(ds, "y")
    with pytest.raises(DataError, match="unknown domain 'z'"):
        read_domain(ds, "z")


def test_tiff_is_skipped_offline_as_online_with_a_warning(tmp_path, caplog):
    """The server refuses TIFF uploads; training leaves TIFF out too, and says so."""
    _img(tmp_path / "a" / "cat" / "0.png")
    (tmp_path / "a" / "cat").joinpath("1.tif").write_bytes(b"II*\x00")
    ds = open_dataset(tmp_path)
    with caplog.at_level("WARNING", logger="adapt.data"):
        d = read_domain(ds, "a")
    assert [p.name for p in d.files] == ["0.png"]
    assert "skipped 1 TIFF image(s)" in caplog.text and "convert them to PNG" in caplog.text
