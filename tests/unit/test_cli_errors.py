"""Bad input on the command line: exit code 2 and one line saying what is wrong and how to fix."""

import os
import subprocess
import sys

import pytest

from mp2a.cli import main


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_data_dir(capsys, tmp_path):
    code, err = _run(
        capsys, ["adapt", "--data", str(tmp_path / "nope"), "--target", "x", "--out", "o"]
    )
    assert code == 2
    assert err.count("\n") == 0
    assert "does not exist" in err and "mp2a data digits" in err


def test_unknown_domain_lists_available(capsys, tmp_path, digits_small):
    out = tmp_path / "run"
    code, err = _run(
        capsys, ["adapt", "--data", str(digits_small), "--target", "mars", "--out", str(out)]
    )
    assert code == 2 and err.count("\n") == 0
    assert "unknown domain 'mars'" in err
    assert "handwritten, printed, street, textured" in err
    assert not out.exists()


def test_unknown_source_domain(capsys, tmp_path, digits_small):
    code, err = _run(
        capsys,
        [
            "adapt",
            "--data",
            str(digits_small),
            "--target",
            "street",
            "--sources",
            "printed,moon",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert code == 2 and "unknown domain 'moon'" in err


def test_unknown_model(capsys, tmp_path, digits_small):
    code, err = _run(
        capsys,
        [
            "adapt",
            "--data",
            str(digits_small),
            "--target",
            "street",
            "--model",
            "no-such-net",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert code == 2 and err.count("\n") == 0
    assert "unknown model 'no-such-net'" in err and "tiny-digits" in err


def test_open_clip_model_offline_fails_in_one_line(tmp_path, digits_small):
    """A real `mp2a` process on an offline machine: one line on stderr, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mp2a",
            "adapt",
            "--data",
            str(digits_small),
            "--target",
            "street",
            "--model",
            "ViT-B-16",
            "--pretrained",
            "openai",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("mp2a: error: cannot load model 'ViT-B-16'")
    assert "--pretrained FILE" in err


def test_open_clip_model_needs_pretrained(capsys, tmp_path, digits_small):
    code, err = _run(
        capsys,
        [
            "adapt",
            "--data",
            str(digits_small),
            "--target",
            "street",
            "--model",
            "ViT-B-16",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert code == 2 and "needs --pretrained" in err and "openai" in err


def test_unknown_method(capsys, tmp_path, digits_small):
    code, err = _run(
        capsys,
        [
            "adapt",
            "--data",
            str(digits_small),
            "--target",
            "street",
            "--method",
            "magic",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert code == 2 and "unknown method 'magic'" in err


def test_out_is_a_non_artifact_folder(capsys, tmp_path, digits_small, micro_model_dir):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _run(
        capsys,
        [
            "adapt",
            "--data",
            str(digits_small),
            "--target",
            "street",
            "--model",
            str(micro_model_dir),
            "--out",
            str(out),
            "--no-cache",
            "--quiet",
        ],
    )
    assert code == 2 and "not an mp2a artifact" in err
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [["data", "digits", "--out", "X", "--per-class", "0"]])
def test_bad_digits_args(capsys, tmp_path, argv):
    argv = [a.replace("X", str(tmp_path / "d")) for a in argv]
    code, err = _run(capsys, argv)
    assert code == 2 and err.startswith("mp2a: error:")
