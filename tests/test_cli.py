"""The command line: help for every command, one clear line for every user mistake."""

from __future__ import annotations

import pytest

from cpkp.cli import build_parser, main

COMMANDS = ["train", "test", "predict", "demo", "demo-data", "benchmark", "info"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cpkp" in out
    if command in ("train", "demo-data", "demo", "predict", "benchmark"):
        assert "default" in out


def test_train_help_lists_every_switch_of_the_method(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for switch in (
        "--co-progression",
        "--prototype",
        "--alpha",
        "--gamma",
        "--coreset-ratio",
        "--teacher-grad-via-bottleneck",
        "--fusion",
        "--variant",
    ):
        assert switch in out


def _error(argv, capsys) -> str:
    code = main(argv)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("cpkp: error: ")
    assert "Traceback" not in err
    return err


def test_missing_dataset_root_names_the_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    err = _error(
        [
            "-q",
            "train",
            "--dataset",
            "mvtec",
            "--root",
            str(missing),
            "--category",
            "bottle",
            "--out",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert str(missing) in err


def test_dataset_without_root_says_what_is_needed(tmp_path, capsys):
    err = _error(["-q", "train", "--dataset", "mvtec", "--out", str(tmp_path / "r")], capsys)
    assert "--root" in err and "--category" in err


def test_unknown_config_key_is_refused(tmp_path, capsys):
    err = _error(
        [
            "-q",
            "train",
            "--dataset",
            "folder",
            "--normal",
            str(tmp_path),
            "--set",
            "train.epoch=3",
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert "train.epoch" in err


def test_image_size_rule_is_stated(tmp_path, capsys):
    err = _error(
        [
            "-q",
            "train",
            "--dataset",
            "folder",
            "--normal",
            str(tmp_path),
            "--image-size",
            "250",
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert "multiple of 32" in err


def test_test_and_predict_on_a_missing_run(tmp_path, capsys):
    err = _error(
        [
            "-q",
            "test",
            "--run",
            str(tmp_path / "norun"),
            "--dataset",
            "mvtec",
            "--root",
            str(tmp_path),
            "--category",
            "x",
        ],
        capsys,
    )
    assert "norun" in err or str(tmp_path) in err
    err = _error(
        ["-q", "predict", "--run", str(tmp_path / "norun"), str(tmp_path / "a.png")], capsys
    )
    assert "a.png" in err or "norun" in err


def test_parser_knows_every_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


def test_predict_output_names_stay_unique_when_stems_repeat():
    from pathlib import Path

    from cpkp.cli import _output_names

    paths = [Path("good/000.png"), Path("bad/000.png"), Path("bad/000.jpg"), Path("x/000-2.png")]
    names = _output_names(paths)
    assert [names[str(p)] for p in paths] == ["000", "000-2", "000-3", "000-2-2"]


def test_an_image_given_twice_is_taken_once(tmp_path):
    from PIL import Image

    from cpkp.cli import _expand_inputs

    folder = tmp_path / "parts"
    folder.mkdir()
    for name in ("000.png", "001.png"):
        Image.new("L", (8, 8)).save(folder / name)
    items = [str(folder / "001.png"), str(folder), f"{tmp_path}/parts/../parts/000.png"]
    assert [p.name for p in _expand_inputs(items)] == ["001.png", "000.png"]
