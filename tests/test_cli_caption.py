"""`prefixcap caption` from the shell: input expansion, output formats, and bad files."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from prefixcap import Captioner
from prefixcap.cli import main
from prefixcap.inputs.expand import expand_inputs
from tests.reference import captions_one_by_one


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prefixcap", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, example_images):
    folder = tmp_path_factory.mktemp("images")
    shutil.copy(example_images[0], folder / "img1.jpg")
    shutil.copy(example_images[1], folder / "img2.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a complete jpeg")
    return folder


def test_good_and_bad_files(image_dependent_model_dir, image_dir):
    paths = [image_dir / "img1.jpg", image_dir / "broken.jpg", image_dir / "img2.jpg"]
    result = run_cli("caption", "--model", image_dependent_model_dir, *paths, "--max-new-tokens", "6")
    assert result.returncode == 1
    captioner = Captioner.from_pretrained(image_dependent_model_dir)
    expected = captions_one_by_one(captioner, [paths[0], paths[2]], max_new_tokens=6)
    assert result.stdout.splitlines() == [f"{paths[0]}\t{expected[0][0]}", f"{paths[2]}\t{expected[1][0]}"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in errors if "broken.jpg" in line] and len(errors) == 1
    assert "Traceback" not in result.stderr


def test_jpeg_draft_decodes_at_reduced_scale(image_dependent_model_dir, image_dir, monkeypatch, capsys):
    """--jpeg-draft makes PIL decode the JPEG at a reduced scale that still covers the model's
    32-pixel input (1/8 of 320 pixels); without it the JPEG is decoded whole."""
    from PIL import JpegImagePlugin

    decoded, draft = [], JpegImagePlugin.JpegImageFile.draft

    def recording(self, mode, size):
        result = draft(self, mode, size)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording)
    image = image_dir / "img1.jpg"
    args = ["caption", str(image), "--model", str(image_dependent_model_dir), "--max-new-tokens", "4", "--workers", "0"]
    assert main(args) == 0 and decoded == []
    assert capsys.readouterr().out.startswith(f"{image}\t")
    assert main([*args, "--jpeg-draft"]) == 0
    assert decoded == [(40, 40)]  # 320 x 320 at 1/8
    assert capsys.readouterr().out.startswith(f"{image}\t")


def test_jsonl_and_csv_with_several_captions(image_dependent_model_dir, image_dir, tmp_path):
    good = [image_dir / "img1.jpg", image_dir / "img2.jpg"]
    args = ["--model", image_dependent_model_dir, "--num-captions", "3", "--max-new-tokens", "5"]
    captioner = Captioner.from_pretrained(image_dependent_model_dir)
    expected = captions_one_by_one(captioner, good, num_return_sequences=3, max_new_tokens=5)
    result = run_cli("caption", *good, *args, "--format", "jsonl", "--output", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert records == [
        {"path": str(path), "caption": captions[0], "captions": captions} for path, captions in zip(good, expected)
    ]
    result = run_cli("caption", *good, *args, "--format", "csv")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows == [["path", "caption", "caption_2", "caption_3"]] + [
        [str(path), *captions] for path, captions in zip(good, expected)
    ]


def test_folders_and_globs_expand_to_images_only(image_dir, tmp_path):
    (image_dir / "notes.txt").write_text("not an image")
    paths, missing = expand_inputs([str(image_dir), str(image_dir / "img*.jpg"), str(tmp_path / "nothing-*.png")])
    assert paths == [str(image_dir / name) for name in ("broken.jpg", "img1.jpg", "img2.jpg")]
    assert missing == [(str(tmp_path / "nothing-*.png"), "no match")]


def test_bad_options_and_missing_model_are_one_line_errors(tiny_model_dir, image_dir, tmp_path):
    result = run_cli("caption", image_dir / "img1.jpg", "--model", tiny_model_dir, "--top-p", "1.5", "--do-sample")
    assert result.returncode == 2 and result.stderr.strip() == "error: top_p must be in (0, 1], got 1.5"
    result = run_cli("caption", image_dir / "img1.jpg", "--model", tmp_path / "no-model")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "no-model" in result.stderr


def test_captions_longer_than_the_decoder_are_refused_up_front(tiny_model_dir, image_dir):
    result = run_cli("caption", image_dir / "img1.jpg", "--model", tiny_model_dir, "--max-new-tokens", "500")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: max_new_tokens must be <= 92: the decoder has 96 positions and the prefix takes 4"
    )


def test_control_characters_in_names_are_escaped_on_a_terminal(
    tiny_model_dir, example_images, tmp_path, monkeypatch, capsys
):
    """File names are data: escape sequences in them (clear screen, a window title) are escaped in
    error lines always, and in text records when those go to a terminal; a file or pipe gets the
    name as it is (with the text format's own escapes)."""
    from prefixcap.cli import main

    folder = tmp_path / "set"
    folder.mkdir()
    evil = "\x1b[2J\x1b]0;owned\x07"
    shutil.copy(example_images[0], folder / f"{evil}.jpg")
    (folder / f"{evil} broken.jpg").write_bytes(b"not an image")
    args = ["caption", str(folder), "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--workers", "0"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "\x1b" not in err and "\\x1b[2J\\x1b]0;owned\\x07 broken.jpg" in err
    assert out.startswith(str(folder / f"{evil}.jpg") + "\t")  # not a terminal: the record as it is

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert main(args) == 1
    shown = sys.stdout.getvalue()
    assert "\x1b" not in shown and "\x07" not in shown and shown.startswith(f"{folder}/\\x1b[2J")


@pytest.mark.timeout(120)  # a FIFO used to block open() until a writer came, in every reader
def test_special_files_are_one_failure_line_each(tiny_model_dir, image_dir, tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    inputs = [tmp_path / "fifo.jpg", image_dir / "img1.jpg", tmp_path / "zero.jpg"]
    args = ["caption", *map(str, inputs), "--model", str(tiny_model_dir), "--workers", "0", "--max-new-tokens", "4"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(image_dir / "img1.jpg")]
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path / 'fifo.jpg'}: not a regular file (a FIFO)",
        f"error: {tmp_path / 'zero.jpg'}: not a regular file (a character device)",
    ]
