"""A user's own data and own mistakes: nothing lost silently, one line (exit 2) per mistake."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from mp2a.artifact import load_artifact
from mp2a.cli import main


def _run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def _img(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)


def _folder(root: Path, layout: dict[str, list[str]]) -> Path:
    for domain, classes in layout.items():
        for k, cls in enumerate(classes):
            for i in range(3):
                _img(root / domain / cls / f"{i}.png", (40 * k, 9 * i, 200 - 40 * k))
    return root


def _adapt(micro_model_dir, data, target, out, *extra):
    return [
        "adapt", "--data", str(data), "--target", target, "--model", str(micro_model_dir),
        "--method", "zeroshot", "--out", str(out), "--no-cache", "--quiet", *extra,
    ]  # fmt: skip


def test_two_folders_of_one_label_are_refused(capsys, tmp_path, micro_model_dir):
    data = _folder(tmp_path / "d", {"a": ["desk_chair", "desk chair"], "b": ["desk_chair"]})
    code, err = _run(capsys, _adapt(micro_model_dir, data, "b", tmp_path / "r"))
    assert code == 2 and err.count("\n") == 0, err
    assert "'desk chair' and 'desk_chair'" in err and "rename or merge" in err
    assert not (tmp_path / "r").exists()


def test_sources_with_spaces_and_missing_classes_warned_by_name(capsys, tmp_path, micro_model_dir):
    """`--sources "a, b"` is a, b; a domain short of classes and a class only the target
    has are named in the log and in metrics.json."""
    data = _folder(
        tmp_path / "d",
        {"a": ["back_pack", "mug"], "b": ["back_pack"], "t": ["back_pack", "mug", "ruler"]},
    )
    out = tmp_path / "r"
    code, err = _run(capsys, _adapt(micro_model_dir, data, "t", out, "--sources", "a, b"))
    assert code == 0, err
    assert "domain 'a' has no images of 1 class(es): 'ruler'" in err
    assert "domain 'b' has no images of 2 class(es): 'mug', 'ruler'" in err
    assert "only the target has (no source domain teaches them): 'ruler'" in err
    metrics = load_artifact(out).metrics()
    assert metrics["sources"] == ["a", "b"]
    assert any("'ruler'" in w for w in metrics["warnings"])


def test_empty_classes_are_named(capsys, tmp_path, micro_model_dir):
    data = _folder(tmp_path / "d", {"a": ["cat", "dog", "owl"], "t": ["cat", "dog", "owl"]})
    out = tmp_path / "r"
    argv = _adapt(micro_model_dir, data, "t", out)
    argv[argv.index("zeroshot")] = "transductive"
    code, err = _run(capsys, argv)
    assert code == 0, err
    empty = load_artifact(out).metrics()["head"]["empty_classes"]
    assert all(c in ("cat", "dog", "owl") for c in empty)


@pytest.mark.parametrize("template", ["a photo", "a {0} of {1}"])
def test_template_without_one_placeholder(
    capsys, tmp_path, digits_small, micro_model_dir, template
):
    argv = _adapt(micro_model_dir, digits_small, "street", tmp_path / "r", "--template", template)
    code, err = _run(capsys, argv)
    assert code == 2 and err.count("\n") == 0, err
    assert f"--template {template!r}" in err and "a photo of a {}." in err


def test_out_holding_traffic_is_refused_unless_forced(capsys, tmp_path, street_run, digits_small,
                                                      micro_model_dir):  # fmt: skip
    run = tmp_path / "served"
    shutil.copytree(street_run, run)
    (run / "traffic.sqlite").write_bytes(b"collected traffic")
    (run / "versions" / "2").mkdir(parents=True)
    argv = _adapt(micro_model_dir, digits_small, "street", run)
    code, err = _run(capsys, argv)
    assert code == 2 and err.count("\n") == 0, err
    assert "traffic.sqlite, versions/" in err and "--force" in err
    assert (run / "traffic.sqlite").read_bytes() == b"collected traffic"
    assert (run / "versions" / "2").is_dir()
    assert load_artifact(run).backbone.model == load_artifact(street_run).backbone.model

    code, err = _run(capsys, [*argv, "--force"])
    assert code == 0, err
    assert "--force: replacing" in err and "removes traffic.sqlite, versions/" in err
    assert not (run / "traffic.sqlite").exists() and not (run / "versions").exists()
    # another backbone: the old export (31 classes fused, another encoder) goes too
    assert not (run / "export").exists()
    assert "export: removed" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("port", ["0", "68935", "-1"])
def test_port_out_of_range(capsys, street_run, port):
    code, err = _run(capsys, ["serve", str(street_run), "--port", port])
    assert code == 2 and err.count("\n") == 0, err
    assert f"--port {port} is not a TCP port; choose one in 1..65535" in err


def test_port_in_use_is_one_line(capsys, street_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _run(capsys, ["serve", str(street_run), "--port", str(port)])
    assert code == 2 and err.count("\n") == 0, err
    assert f"port {port} on 0.0.0.0 is not free" in err and "another --port" in err


@pytest.mark.parametrize(
    ("token", "says"),
    [("x", "shorter than 16"), ("a-long-enough-token-0001\n", "whitespace around it")],
)
def test_bad_admin_token(capsys, monkeypatch, street_run, token, says):
    monkeypatch.setenv("MP2A_ADMIN_TOKEN", token)
    code, err = _run(capsys, ["serve", str(street_run), "--port", str(_free_port())])
    assert code == 2 and err.count("\n") == 0, err
    assert says in err and "MP2A_ADMIN_TOKEN" in err


def test_missing_data_folder_hint_fits_own_data(capsys, tmp_path):
    code, err = _run(capsys, ["adapt", "--data", str(tmp_path / "photos"), "--target", "t",
                              "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2 and err.count("\n") == 0
    assert "DIR/<domain>/<class>/<image>" in err and "Your own data" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    out = capsys.readouterr().out
    assert "(default: mp2a)" in out and "(default: 5)" in out and "(default: 100)" in out
    assert json.dumps(0.2) in out
