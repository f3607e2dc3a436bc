"""`prefixcap caption` inputs and outputs under hostile or unlucky conditions:
file names that look like shell commands, outputs that are inputs, names that are not UTF-8,
models retrained in place, unwritable outputs, symlink loops, unreadable folders, interrupts."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file, save_file

from prefixcap import CaptionModel
from prefixcap.cli import main
from prefixcap.data import load_records, read_image_bytes
from prefixcap.inputs.expand import expand_inputs
from prefixcap.inputs.sources import LocalPath, RemoteShard
from prefixcap.jobs.plan import plan_parts
from prefixcap.jobs.writers import RecordWriter
from prefixcap.model.fingerprint import model_fingerprint

PWNED_JPG = "pipe:touch PWNED;cat ok.jpg;.jpg"  # a shell command as a file name
PWNED_TAR = "pipe:touch PWNED;cat ok.tar;.tar"
NOT_UTF8 = os.fsdecode(b"bad\xff.jpg")  # a name Python holds with a surrogate escape


def save_image(path: Path, seed: int = 0) -> Path:
    Image.new("RGB", (40 + seed, 36), ((seed * 67) % 256, 90, 200)).save(path, "JPEG")
    return path


def image_bytes(seed: int) -> bytes:
    from io import BytesIO

    data = BytesIO()
    Image.new("RGB", (30 + seed, 30), (seed * 40 % 256, 20, 90)).save(data, "PNG")
    return data.getvalue()


@pytest.fixture
def caption(tiny_model_dir):
    """`prefixcap caption ARGS` in this process, with the tiny model and quick settings."""

    def run(*args) -> int:
        common = ["--model", str(tiny_model_dir), "--max-new-tokens", "3", "--batch-size", "2", "--workers", "0",
                  "--dtype", "float32"]  # fmt: skip
        return main(["caption", *common, *map(str, args)])

    return run


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: output problems must be found before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("prefixcap.cli.caption.load_captioner_and_request", refuse)


def leftovers(folder: Path) -> list[str]:
    """Temporary files an atomic write would leave behind."""
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp"))


# ---------------------------------------------------------------------- names that look like commands
def test_file_named_like_a_pipe_command_is_opened_as_a_file_from_the_shell(tiny_model_dir, tmp_path):
    """A shell command as a file name, through the real command line: `prefixcap caption .` in a folder
    holding a file named `pipe:touch PWNED;...`."""
    save_image(tmp_path / "ok.jpg")
    shutil.copy(tmp_path / "ok.jpg", tmp_path / PWNED_JPG)
    result = subprocess.run(
        [sys.executable, "-m", "prefixcap", "caption", ".", "--model", str(tiny_model_dir), "--max-new-tokens", "3"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert not (tmp_path / "PWNED").exists()
    assert result.returncode == 0, result.stderr
    assert sorted(line.split("\t")[0] for line in result.stdout.splitlines()) == sorted(["ok.jpg", PWNED_JPG])


def test_expand_paths_marks_every_name_found_on_disk_as_a_local_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_image(tmp_path / "ok.jpg")
    shutil.copy("ok.jpg", PWNED_JPG)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / PWNED_TAR).write_bytes(b"")
    for pattern in [".", "*.jpg", "**/*.jpg", "shards/*.tar", "./*", PWNED_JPG]:
        sources, problems = expand_inputs([pattern])
        assert sources and all(type(source) is LocalPath for source in sources), pattern
        assert not problems
    # Only a name the user typed, that is no existing path, is a command or URL.
    typed = ["pipe:cat missing.tar", "https://example.com/shard-{000..001}.tar"]
    sources, _ = expand_inputs(typed)
    assert [type(source) for source in sources] == [RemoteShard] * 3
    assert not (tmp_path / "PWNED").exists()


def test_shard_named_like_a_pipe_command_is_read_as_a_file(caption, tmp_path, monkeypatch, capsys):
    """A tar file found by a glob, and the sharded (folder output) job."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / PWNED_TAR)) as writer:
        for seed in range(2):
            writer.write({"__key__": f"sample{seed}", "png": image_bytes(seed)})
    save_image(tmp_path / "ok.jpg")
    shutil.copy(tmp_path / "ok.jpg", tmp_path / PWNED_JPG)

    assert caption("shards/*.tar", "*.jpg") == 0
    names = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    shard = f"shards/{PWNED_TAR}"
    assert names == [f"{shard}#sample0.png", f"{shard}#sample1.png", "ok.jpg", PWNED_JPG]
    assert caption("shards/*.tar", "*.jpg", "--output", "out/") == 0
    assert len((tmp_path / "out" / "captions.jsonl").read_text().splitlines()) == 4
    assert not (tmp_path / "PWNED").exists()
    # the plan keeps the kind decided where the name was found
    (part,) = plan_parts([LocalPath(shard)], part_size=10)
    assert part.is_shard and type(part.sources[0]) is LocalPath


def test_dataset_record_naming_a_pipe_command_reads_a_file(tmp_path, monkeypatch):
    """Dataset files (here JSONL) name images that `prepare` and `evaluate` read: never a shell."""
    monkeypatch.chdir(tmp_path)
    save_image(tmp_path / "ok.jpg")
    shutil.copy("ok.jpg", PWNED_JPG)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": PWNED_JPG, "caption": "a photo"}) + "\n")
    (record,) = load_records("captions.jsonl")
    assert read_image_bytes(record.image) == (tmp_path / "ok.jpg").read_bytes()
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------- an output that is an input
def test_an_output_that_is_an_input_is_refused(caption, tmp_path, no_model_load, capsys):
    victim = save_image(tmp_path / "victim.jpg")
    original = victim.read_bytes()
    (tmp_path / "link.jpg").symlink_to(victim)
    for inputs, output in [
        ([victim], victim),  # named directly
        ([tmp_path], tmp_path / "victim.jpg"),  # found in a folder
        ([tmp_path / "*.jpg"], tmp_path / "." / "link.jpg"),  # by a glob, written through a link
    ]:
        assert caption(*inputs, "--output", output) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: {output}: is also an input; writing it would destroy that input"
        )
    assert victim.read_bytes() == original


# ---------------------------------------------------------------------- names that break formats
@pytest.fixture
def awkward_names(tmp_path) -> Path:
    """Images whose names are not UTF-8, or hold a tab, a newline or a backslash."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed, name in enumerate(["a.jpg", NOT_UTF8, "tab\tname.jpg", "new\nline.jpg", "back\\slash.jpg"]):
        save_image(folder / name, seed)
    return folder


def test_awkward_names_in_every_format(caption, awkward_names, tmp_path):
    import pyarrow.parquet as pq

    names = sorted(str(path) for path in awkward_names.iterdir())
    escaped = {  # as text, CSV and Parquet write them: valid UTF-8, surrogates as \udcNN
        str(awkward_names / NOT_UTF8): str(awkward_names / "bad\\udcff.jpg"),
        str(awkward_names / "tab\tname.jpg"): str(awkward_names / "tab\tname.jpg"),
    }
    for fmt in ["text", "jsonl", "csv", "parquet"]:
        output = tmp_path / f"out.{fmt}"
        assert caption(awkward_names, "--format", fmt, "--output", output) == 0
        if fmt == "jsonl":
            paths = [json.loads(line)["path"] for line in output.read_text().splitlines()]
            assert paths == names
        elif fmt == "text":
            fields = [line.split("\t") for line in output.read_text(encoding="utf-8").split("\n")[:-1]]
            assert all(len(line) == 2 for line in fields)  # one line per image, whatever its name
            assert [path for path, _ in fields] == [
                name.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\udcff", "\\udcff")
                for name in names
            ]
        elif fmt == "csv":
            with open(output, encoding="utf-8", newline="") as file:
                rows = list(csv.reader(file))
            assert [row[0] for row in rows[1:]] == [escaped.get(name, name) for name in names]
        else:
            rows = pq.read_table(output).to_pylist()
            assert [row["path"] for row in rows] == [escaped.get(name, name) for name in names]
    # Folder output merges into every format, also on a rerun that reuses the parts.
    for fmt in ["csv", "parquet", "text"]:
        assert caption(awkward_names, "--format", fmt, "--output", f"{tmp_path / 'folder'}/") == 0
    summary = json.loads((tmp_path / "folder" / "summary.json").read_text())
    assert summary["captioned"] == len(names) and summary["parts_reused"] == summary["parts"]


# ---------------------------------------------------------------------- a model retrained in place
def test_folder_resume_redoes_the_parts_of_a_changed_model(caption, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(3):
        save_image(photos / f"img{seed}.jpg", seed)
    args = [photos, "--model", model, "--output", f"{tmp_path / 'out'}/", "--part-size", "2"]
    assert caption(*args) == 0
    assert caption(*args) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["parts_reused"] == 2

    # Training saves a new checkpoint at the same path.
    weights = load_file(model / "mapper.safetensors")
    save_file({name: tensor * -3.0 for name, tensor in weights.items()}, model / "mapper.safetensors")
    assert caption(*args) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["parts_reused"] == 0
    assert caption(photos, "--model", model, "--format", "jsonl", "--output", tmp_path / "fresh.jsonl") == 0
    assert (tmp_path / "out" / "captions.jsonl").read_text() == (tmp_path / "fresh.jsonl").read_text()


def test_model_fingerprint_follows_the_files(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first
    config = model / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1))
    assert model_fingerprint(model) != first


def test_model_fingerprint_covers_the_folders_a_model_refers_to(caption, tiny_components, example_images, tmp_path):
    """A model saved with references (a frozen encoder and decoder kept in their own folders, as a
    LoRA model keeps its base decoder) reads those folders too: a rerun after one of them changed
    redoes the work instead of reusing parts made with the old weights."""
    clip, gpt2 = (tmp_path / "clip", tmp_path / "gpt2")
    shutil.copytree(tiny_components[0], clip)
    shutil.copytree(tiny_components[1], gpt2)
    model = tmp_path / "model"
    torch.manual_seed(0)
    CaptionModel.from_components(clip, gpt2, prefix_length=4, freeze_decoder=True).save_pretrained(
        model, save_frozen=False
    )
    assert not (model / "decoder").exists() and not (model / "vision_encoder").exists()
    first = model_fingerprint(model)
    for folder in (gpt2, clip):
        weights = folder / "model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
        assert model_fingerprint(model) != first
        first = model_fingerprint(model)

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in example_images[:2]:
        shutil.copy(path, photos)
    args = [photos, "--model", model, "--output", f"{tmp_path / 'out'}/", "--max-new-tokens", "4", "--workers", "0"]
    assert caption(*args) == 0
    state = {name: tensor * 3 for name, tensor in load_file(gpt2 / "model.safetensors").items()}
    save_file(state, gpt2 / "model.safetensors", metadata={"format": "pt"})  # the base decoder is retrained
    assert caption(*args) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["parts_reused"] == 0


# ---------------------------------------------------------------------- outputs that cannot be written
def test_an_unwritable_output_fails_before_the_model_loads(caption, tmp_path, no_model_load, capsys):
    image = save_image(tmp_path / "a.jpg")
    assert caption(image, "--output", tmp_path / "missing" / "out.txt") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {tmp_path / 'missing'}: cannot create files here (No such file or directory)"
    )
    if os.geteuid() == 0:  # root writes through permissions: use a file system that takes no files
        read_only = Path("/sys")
        if not read_only.is_dir():
            pytest.skip("needs /sys when run as root")
    else:
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
    for output in [read_only / "out.txt", f"{read_only / 'folder'}/"]:
        assert caption(image, "--output", output) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {read_only}") and "cannot" in err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line_and_leaves_no_file(caption, tmp_path, monkeypatch, capsys):
    image = save_image(tmp_path / "a.jpg")
    for fmt in ["text", "parquet"]:
        assert caption(image, "--format", fmt, "--output", "/dev/full") == 2
        assert capsys.readouterr().err.splitlines() == ["error: /dev/full: cannot write (No space left on device)"]

    # A regular file on a full disk: the error at write time removes the temporary.
    def full(self, path, captions):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(RecordWriter, "_write", full)
    output = tmp_path / "out" / "captions.csv"
    output.parent.mkdir()
    assert caption(image, "--format", "csv", "--output", output) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {output}: cannot write (No space left on device)"]
    assert list(output.parent.iterdir()) == []
    assert caption(image, "--format", "csv", "--output", f"{tmp_path / 'folder'}/") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {tmp_path / 'folder' / 'captions.csv'}: cannot write (No space left on device)"
    )
    assert not (tmp_path / "folder" / "captions.csv").exists() and not leftovers(tmp_path / "folder")


# ---------------------------------------------------------------------- symlink loops
@pytest.fixture
def looped(tmp_path) -> Path:
    """photos/ with a loop (sub/up -> ..), a second way into sub/ (again -> sub) and a link to a
    folder outside (ext -> ../other)."""
    photos, other = tmp_path / "photos", tmp_path / "other"
    (photos / "sub").mkdir(parents=True)
    other.mkdir()
    for seed, path in enumerate([photos / "a.jpg", photos / "sub" / "b.jpg", other / "c.jpg"]):
        save_image(path, seed)
    (photos / "sub" / "up").symlink_to("..")
    (photos / "again").symlink_to("sub")
    (photos / "ext").symlink_to("../other")
    (photos / "sub" / "b-link.jpg").symlink_to("b.jpg")
    return photos


def test_symlink_loops_give_each_image_once(looped):
    for patterns in [[f"{looped}/**/*.jpg"], [str(looped)], [f"{looped}/**"], [str(looped), f"{looped}/*/*.jpg"]]:
        sources, problems = expand_inputs(patterns)
        assert sorted(os.path.realpath(source) for source in sources) == sorted(
            os.path.realpath(looped / name) for name in ["a.jpg", "sub/b.jpg", "ext/c.jpg"]
        ), patterns
        assert not problems


# ---------------------------------------------------------------------- unreadable folders
def test_an_unreadable_subfolder_is_a_failure(caption, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    (photos / "private").mkdir(parents=True)
    save_image(photos / "a.jpg")
    save_image(photos / "private" / "b.jpg")
    scandir = os.scandir

    def denied(path="."):  # root reads whatever the permissions say: deny this folder here
        if Path(path) == photos / "private":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    expected = f"error: {photos / 'private'}: cannot read this folder (Permission denied)"
    for patterns in [[photos], [f"{photos}/**/*.jpg"], [f"{photos}/*/*.jpg", photos / "a.jpg"]]:
        assert caption(*patterns) == 1
        assert expected in capsys.readouterr().err.splitlines()
    assert caption(photos, "--output", f"{tmp_path / 'out'}/") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["captioned"] == 1 and summary["failures"] == [
        {"path": str(photos / "private"), "error": "cannot read this folder (Permission denied)"}
    ]


# ---------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv", "parquet"])
def test_an_interrupt_leaves_no_partial_output(caption, tmp_path, monkeypatch, fmt):
    images = [save_image(tmp_path / f"img{seed}.jpg", seed) for seed in range(3)]
    write = RecordWriter.write

    def interrupted(self, path, captions):
        write(self, path, captions)
        raise KeyboardInterrupt

    monkeypatch.setattr(RecordWriter, "write", interrupted)
    output = tmp_path / "out" / f"captions.{fmt}"
    output.parent.mkdir()
    assert caption(*images, "--format", fmt, "--output", output) == 130
    assert list(output.parent.iterdir()) == []
    output.write_text("an older result")  # not ours to remove
    assert caption(*images, "--format", fmt, "--output", output) == 130
    assert output.read_text() == "an older result" and not leftovers(output.parent)
