"""`prefixcap caption --sidecar / --sidecar-dir`: one IMAGE.txt per image for image-generator
training sets; existing files under each policy, dry runs, read-only image folders, and resuming
after a killed run."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from prefixcap.captioner import Captioner
from prefixcap.cli import main
from prefixcap.jobs.sidecar import SEPARATOR, plan_sidecars
from prefixcap.testing import COLOURS
from tests.helpers_pipeline import kill_when, run_prefixcap
from tests.reference import assert_distinct

SETTINGS = ["--max-new-tokens", "3", "--batch-size", "2", "--workers", "0", "--dtype", "float32"]  # no dtype notice


def save_images(root: Path) -> dict[str, Path]:
    """A small training set in nested folders, with awkward names and colour modes: relative path -> file.
    Each image has its own colour, which the image-dependent test model names in its caption."""
    images = {
        "plain.jpg": ("RGB", "JPEG", "red"),
        "alpha.png": ("RGBA", "PNG", "green"),
        "sub folder/pal ette.gif": ("P", "GIF", "blue"),
        "sub folder/ünïcode/写真 cmyk.jpg": ("CMYK", "JPEG", "white"),
    }
    paths = {}
    for seed, (name, (mode, fmt, colour)) in enumerate(images.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (40 + 3 * seed, 36), COLOURS[colour])
        (image.quantize(8) if mode == "P" else image.convert(mode)).save(path, fmt)
        paths[name] = path
    return paths


def caption_file(image: Path) -> Path:
    return image.with_suffix(".txt")


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every name below `folder` with its contents (None for folders)."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


@pytest.fixture
def caption(image_dependent_model_dir):
    """`prefixcap caption ARGS` in this process, with a tiny model whose captions depend on the
    image (a caption file holding its neighbour's caption shows) and quick settings."""

    def run(*args) -> int:
        return main(["caption", "--model", str(image_dependent_model_dir), *SETTINGS, *map(str, args)])

    return run


@pytest.fixture(scope="module")
def captioner(image_dependent_model_dir) -> Captioner:
    return Captioner.from_pretrained(image_dependent_model_dir, device="cpu", dtype="float32")  # as SETTINGS


def expected(captioner: Captioner, image: Path) -> str:
    """What the captioner itself says about `image` alone, with the command's settings."""
    return captioner([image], max_new_tokens=3)[0][0]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although no image needed a caption")

    monkeypatch.setattr("prefixcap.cli.caption.load_captioner_and_request", refuse)


def test_every_image_in_nested_folders_gets_its_caption_file(caption, captioner, tmp_path, capsys):
    images = save_images(tmp_path / "set")
    (tmp_path / "set" / "sub folder" / "broken.png").write_bytes(b"\x89PNG not really")
    assert caption(tmp_path / "set", "--sidecar") == 1
    assert_distinct([expected(captioner, image) for image in images.values()])
    for image in images.values():
        assert caption_file(image).read_text(encoding="utf-8") == expected(captioner, image) + "\n"
    assert not caption_file(tmp_path / "set" / "sub folder" / "broken.png").exists()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: {tmp_path / 'set' / 'sub folder' / 'broken.png'}: ")
    assert err[-1] == "4 written, 0 skipped (caption file exists), 1 failed"
    assert not [path for path in (tmp_path / "set").rglob("*") if path.name.endswith(".tmp")]


@pytest.mark.parametrize("policy", ["skip", "overwrite", "append", "prepend"])
def test_an_existing_caption_file_under_each_policy(caption, captioner, tmp_path, capsys, policy):
    images = save_images(tmp_path / "set")
    old, fresh = images["plain.jpg"], images["alpha.png"]
    caption_file(old).write_text("sks person, hand-written\n", encoding="utf-8-sig")  # with a BOM, as Notepad saves
    assert caption(tmp_path / "set", "--sidecar", "--existing", policy) == 0
    new = expected(captioner, old)
    assert (
        caption_file(old).read_text(encoding="utf-8")
        == {
            "skip": "\ufeffsks person, hand-written\n",  # untouched
            "overwrite": f"{new}\n",
            "append": f"sks person, hand-written{SEPARATOR}{new}\n",
            "prepend": f"{new}{SEPARATOR}sks person, hand-written\n",
        }[policy]
    )
    assert caption_file(fresh).read_text(encoding="utf-8") == expected(captioner, fresh) + "\n"
    skipped = 1 if policy == "skip" else 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{4 - skipped} written, {skipped} skipped (caption file exists), 0 failed"
    )
    if policy in ("append", "prepend"):  # on every run, as the README says: a second run joins again
        assert caption(tmp_path / "set", "--sidecar", "--existing", policy) == 0
        twice = {
            "append": f"sks person, hand-written{SEPARATOR}{new}{SEPARATOR}{new}\n",
            "prepend": f"{new}{SEPARATOR}{new}{SEPARATOR}sks person, hand-written\n",
        }[policy]
        assert caption_file(old).read_text(encoding="utf-8") == twice


def test_a_rerun_of_a_finished_folder_loads_no_model(caption, tmp_path, capsys, monkeypatch, no_model_load):
    images = save_images(tmp_path / "set")
    for image in images.values():
        caption_file(image).write_text("done\n")
    assert caption(tmp_path / "set", "--sidecar") == 0
    assert capsys.readouterr().err.splitlines()[-1] == "0 written, 4 skipped (caption file exists), 0 failed"


def test_dry_run_prints_and_changes_nothing(caption, captioner, tmp_path, capsys):
    images = save_images(tmp_path / "set")
    caption_file(images["plain.jpg"]).write_text("old\n")
    before = snapshot(tmp_path)
    assert caption(tmp_path / "set", "--sidecar", "--dry-run") == 0
    assert snapshot(tmp_path) == before
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"skip  {caption_file(images['plain.jpg'])} (exists)"
    alpha = images["alpha.png"]
    assert f"write {caption_file(alpha)}: {expected(captioner, alpha)}" in lines and len(lines) == 4
    assert (
        err.splitlines()[-1]
        == "dry run, no file changed: 3 would be written, 1 skipped (caption file exists), 0 failed"
    )
    assert caption(tmp_path / "set", "--sidecar-dir", tmp_path / "out", "--dry-run") == 0
    assert snapshot(tmp_path) == before  # not even OUT's folders


def test_sidecar_dir_mirrors_a_read_only_image_tree(caption, captioner, tmp_path, monkeypatch, capsys):
    images = save_images(tmp_path / "set")
    (tmp_path / "more" / "deep").mkdir(parents=True)  # a second input folder, mirrored into the same OUT
    images["deep/extra.png"] = tmp_path / "more" / "deep" / "extra.png"
    Image.new("RGB", (30, 30), (1, 2, 3)).save(images["deep/extra.png"])
    before = snapshot(tmp_path / "set")
    assert caption(tmp_path / "set", f"{tmp_path / 'more'}/", "--sidecar-dir", tmp_path / "out") == 0
    assert snapshot(tmp_path / "set") == before  # nothing written into the image tree
    assert_distinct([expected(captioner, image) for image in images.values()])
    for name, image in images.items():
        text = (tmp_path / "out" / name).with_suffix(".txt").read_text(encoding="utf-8")
        assert text == expected(captioner, image) + "\n"
    capsys.readouterr()

    # --sidecar into a folder that takes no files (root ignores permissions, so fake the file system)
    # fails before the model loads, with the way out.
    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(tmp_path / "set"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    real = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr("prefixcap.cli.caption.load_captioner_and_request", lambda *a, **k: pytest.fail("model loaded"))
    assert caption(tmp_path / "set", "--sidecar") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'set'}: cannot create caption files here (Read-only file system); "
        "--sidecar-dir OUT writes them to another folder"
    ]


def test_sidecar_dir_paths_are_relative_to_each_input_folder(tmp_path):
    images = save_images(tmp_path / "set")
    plan = plan_sidecars([str(tmp_path / "set" / "sub folder"), str(tmp_path / "set")], out_dir=tmp_path / "out")
    assert [(sidecar.image, sidecar.path) for sidecar in plan.todo] == [
        (str(images["sub folder/pal ette.gif"]), tmp_path / "out" / "pal ette.txt"),
        (str(images["sub folder/ünïcode/写真 cmyk.jpg"]), tmp_path / "out" / "ünïcode" / "写真 cmyk.txt"),
        (str(images["alpha.png"]), tmp_path / "out" / "alpha.txt"),  # each image once, from where first found
        (str(images["plain.jpg"]), tmp_path / "out" / "plain.txt"),
    ]


def test_temporaries_of_a_killed_run_are_removed_and_no_others(caption, tmp_path):
    images = save_images(tmp_path / "set")
    ours = tmp_path / "set" / ".plain.txt.k3j_x9q2.tmp"  # as atomic_path names them
    theirs = tmp_path / "set" / ".notes.txt.k3j_x9q2.tmp"
    ours.write_text("half a capt")
    theirs.write_text("someone else's")
    assert caption(images["plain.jpg"], "--sidecar") == 0
    assert not ours.exists() and theirs.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sidecar", "--output", "x.txt"], "--sidecar writes one .txt per image; it cannot be combined with --output"),
        (["--sidecar-dir", "out", "--format", "csv"], "--sidecar-dir writes one .txt per image; it cannot be combined with --format"),
        (["--existing", "append"], "--existing applies to caption files: add --sidecar or --sidecar-dir OUT"),
        (["--dry-run"], "--dry-run applies to caption files: add --sidecar or --sidecar-dir OUT"),
        (["{set}/plain.jpg", "--sidecar-dir", "out"], "{set}/plain.jpg: is not a folder; --sidecar-dir mirrors input folders (use --sidecar for files and globs)"),
        (["{set}/shard.tar", "--sidecar"], "{set}/shard.tar: is not an image file that a caption file can sit beside; caption it with --output"),
        (["https://example.com/a.jpg", "--sidecar"], "https://example.com/a.jpg: is a remote input; caption files sit beside local image files only"),
        (["{set}/plain.png", "--sidecar"], "{set}/plain.png: shares the caption file {set}/plain.txt with {set}/plain.jpg; rename one of them"),
        (["{set}/notes.txt", "--sidecar", "--existing", "overwrite"], "{set}/notes.txt: is also an input; writing it would destroy that input"),
    ],
)  # fmt: skip
def test_nonsense_combinations_are_one_line_errors(caption, tmp_path, capsys, no_model_load, args, message):
    folder = tmp_path / "set"
    save_images(folder)
    (folder / "shard.tar").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(folder / "plain.png")
    args = [arg.format(set=folder) for arg in args]
    assert caption(folder / "plain.jpg", *args) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message.format(set=folder)}"]


@pytest.mark.slow
def test_a_killed_run_resumes_with_one_complete_caption_file_per_image(tiny_model_dir, tmp_path, one_thread):
    folder = tmp_path / "set"
    folder.mkdir()
    for seed in range(60):
        colour = (seed * 37 % 256, seed * 11 % 256, 90)
        Image.new("RGB", (32 + seed % 7, 32), colour).save(folder / f"img {seed:03d}.png")
    common = ["--model", tiny_model_dir, "--max-new-tokens", "4", "--workers", "0", "--batch-size", "1"]
    # The reference: every caption file from one uninterrupted run, in this process (one thread and
    # batches of one, as in the killed run, so that the numbers are the same).
    assert main(["caption", str(folder), "--sidecar-dir", str(tmp_path / "ref"), *map(str, common)]) == 0
    reference = {path.name: path.read_text(encoding="utf-8") for path in (tmp_path / "ref").glob("*.txt")}
    assert len(reference) == 60

    args = ["caption", folder, "--sidecar", *common]
    kill_when(args, ready=lambda: any(folder.glob("*.txt")))
    written = {path.name: path.read_text(encoding="utf-8") for path in folder.glob("*.txt")}
    assert 0 < len(written) < 60  # killed mid-run
    assert all(text == reference[name] for name, text in written.items())  # each one complete

    result = run_prefixcap(*args)
    summary = f"{60 - len(written)} written, {len(written)} skipped (caption file exists), 0 failed"
    assert result.stderr.splitlines()[-1] == summary
    assert {path.name: path.read_text(encoding="utf-8") for path in folder.glob("*.txt")} == reference
    leftovers = [path.name for path in folder.iterdir() if path.suffix not in (".png", ".txt")]
    assert leftovers == []  # no temporaries


def test_several_captions_are_written_one_per_line(caption, captioner, tmp_path):
    image = save_images(tmp_path / "set")["alpha.png"]
    assert caption(image, "--sidecar", "--num-captions", "2", "--num-beams", "2") == 0
    (captions,) = captioner([image], max_new_tokens=3, num_return_sequences=2, num_beams=2)
    assert caption_file(image).read_text(encoding="utf-8") == "\n".join(captions) + "\n"


# ------------------------------------------------------------------------ the tree the user named
def test_folder_links_out_of_the_tree_are_not_followed_and_nothing_is_written_there(caption, tmp_path, capsys):
    """A link to a folder outside the input tree (`extra -> ../home`, `a/up2 -> ../..`) would make
    --sidecar write caption files into folders the user never named: such links are not followed
    in sidecar mode, and each is reported."""
    home, data = tmp_path / "home", tmp_path / "ds"
    (home / "docs").mkdir(parents=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(home / "docs" / "report.png")
    (home / "docs" / "report.txt").write_text("notes\n")
    (data / "a").mkdir(parents=True)
    Image.new("RGB", (20, 20), (10, 200, 10)).save(data / "img.png")
    (data / "inside").symlink_to(data / "a")  # a link within the tree is followed
    Image.new("RGB", (20, 20), (10, 10, 200)).save(data / "a" / "deep.png")
    (data / "extra").symlink_to("../home")
    (data / "a" / "up2").symlink_to("../..")
    before = snapshot(home)
    assert caption(data, "--sidecar", "--existing", "overwrite") == 1
    assert snapshot(home) == before  # report.txt still "notes", nothing new
    assert not list(tmp_path.glob("*.txt"))
    assert sorted(str(path.relative_to(data)) for path in data.rglob("*.txt")) == ["a/deep.txt", "img.txt"]
    err = capsys.readouterr().err.splitlines()
    assert f"error: {data / 'extra'}: a link to a folder outside {data}; not followed in sidecar mode" in err
    assert f"error: {data / 'a' / 'up2'}: a link to a folder outside {data}; not followed in sidecar mode" in err
    assert err[-1] == "2 written, 0 skipped (caption file exists), 0 failed"


def test_sidecar_dir_never_writes_outside_out(caption, tmp_path, capsys):
    data, out = tmp_path / "ds", tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(tmp_path / "elsewhere" / "far.png")
    data.mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(data / "near.png")
    (data / "link").symlink_to(tmp_path / "elsewhere")
    assert caption(data, "--sidecar-dir", out) == 1
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.txt")) == ["out/near.txt"]


# ------------------------------------------------------------------------ existing caption files read with care
@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["append", "prepend"])
@pytest.mark.parametrize("kind", ["device", "fifo", "link out", "huge"])
def test_existing_caption_files_are_read_only_when_regular_and_small(caption, tmp_path, capsys, policy, kind):
    """--existing append|prepend read the old text: only a regular file inside the tree, up to a size
    cap. A link (`a.txt -> /dev/zero`, or to a secret elsewhere), a FIFO (it would hang, even in a dry
    run) or a huge file fails that image, and the run goes on."""
    images = save_images(tmp_path / "set")
    target = caption_file(images["plain.jpg"])
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CONTENT")
    if kind == "device":
        target.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "link out":
        target.symlink_to(secret)
    else:
        with open(target, "wb") as file:
            file.truncate(2**31)  # sparse: 2 GiB that take no disk
    for dry_run in (["--dry-run"], []):  # "3 would be written" in the dry run
        assert caption(tmp_path / "set", "--sidecar", "--existing", policy, *dry_run) == 1
        out, err = capsys.readouterr()
        (line,) = [line for line in err.splitlines() if line.startswith(f"error: {images['plain.jpg']}: ")]
        assert str(target) in line
        assert err.splitlines()[-1].endswith("3 written, 0 skipped (caption file exists), 1 failed") or dry_run
        assert "SECRET-CONTENT" not in out
    assert "SECRET-CONTENT" not in "".join(
        path.read_text() for path in (tmp_path / "set").glob("*.txt") if path != target
    )
    assert secret.read_text() == "SECRET-CONTENT"


@pytest.mark.parametrize("policy", ["skip", "overwrite", "append"])
def test_a_folder_named_like_a_caption_file_fails_that_image_only(caption, tmp_path, capsys, policy):
    images = save_images(tmp_path / "set")
    caption_file(images["plain.jpg"]).mkdir()
    assert caption(tmp_path / "set", "--sidecar", "--existing", policy) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"error: {images['plain.jpg']}: {caption_file(images['plain.jpg'])} is not a regular file" in err
    assert err[-1] == "3 written, 0 skipped (caption file exists), 1 failed"
    assert caption_file(images["plain.jpg"]).is_dir()


@pytest.mark.parametrize("policy", ["overwrite", "append"])
def test_a_read_only_caption_file_is_left_alone(caption, tmp_path, capsys, policy):
    images = save_images(tmp_path / "set")
    kept = caption_file(images["plain.jpg"])
    kept.write_text("hand-written\n")
    kept.chmod(0o444)
    shared = caption_file(images["alpha.png"])
    shared.write_text("old\n")
    shared.chmod(0o640)
    assert caption(tmp_path / "set", "--sidecar", "--existing", policy) == 1
    assert kept.read_text() == "hand-written\n" and kept.stat().st_mode & 0o777 == 0o444
    assert shared.read_text() != "old\n" and shared.stat().st_mode & 0o777 == 0o640  # replaced, mode kept
    err = capsys.readouterr().err.splitlines()
    assert f"error: {images['plain.jpg']}: {kept} is read-only; not replaced" in err


def test_control_characters_in_names_never_reach_the_terminal(caption, tmp_path, capsys):
    """A file named with escape sequences (clear screen, a window title) is printed escaped in
    error lines, dry-run lines and summaries."""
    folder = tmp_path / "set"
    save_images(folder)
    evil = folder / "\x1b[2J\x1b]0;owned\x07.png"
    evil.write_bytes(b"not an image")
    assert caption(folder, "--sidecar", "--dry-run") == 1
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "\\x1b[2J\\x1b]0;owned\\x07.png" in err
