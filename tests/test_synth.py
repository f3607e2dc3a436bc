"""The synthetic dataset: deterministic, captions that follow the pixels, usable splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prefixcap.cli import main
from prefixcap.data import load_records, split_records
from prefixcap.data.synth import (
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    REFERENCES_PER_IMAGE,
    WORDINGS,
    make_synthetic_dataset,
)


def read_dataset(out_dir: Path) -> list[tuple[dict, np.ndarray]]:
    lines = (out_dir / "captions.jsonl").read_text().splitlines()
    return [(row, np.asarray(Image.open(out_dir / row["image"]))) for row in map(json.loads, lines)]


def test_same_seed_same_files_other_seed_other_images(tmp_path: Path) -> None:
    first = read_dataset(make_synthetic_dataset(tmp_path / "a", num_images=40, seed=3).parent)
    again = read_dataset(make_synthetic_dataset(tmp_path / "b", num_images=40, seed=3).parent)
    other = read_dataset(make_synthetic_dataset(tmp_path / "c", num_images=40, seed=4).parent)

    assert [row for row, _ in first] == [row for row, _ in again]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(first, again))
    assert [row["caption"] for row, _ in first] != [row["caption"] for row, _ in other]


@pytest.mark.parametrize("image_size", [16, 64])
def test_caption_names_the_only_two_colours_and_the_object_is_large(tmp_path: Path, image_size: int) -> None:
    captions = make_synthetic_dataset(tmp_path, num_images=120, seed=0, image_size=image_size)

    for row, pixels in read_dataset(captions.parent):
        _, object_name, _, _, _, background_name, _ = row["caption"].split()
        assert pixels.shape == (image_size, image_size, 3)
        colours = {tuple(colour) for colour in pixels.reshape(-1, 3)}
        assert colours == {OBJECT_COLORS[object_name], BACKGROUND_COLORS[background_name]}
        assert (pixels == OBJECT_COLORS[object_name]).all(axis=-1).mean() >= 0.25


def test_splits_are_80_10_10_and_train_covers_every_caption(tmp_path: Path) -> None:
    records = load_records(make_synthetic_dataset(tmp_path, num_images=600, seed=1))

    assert Counter(record.split for record in records) == {"train": 480, "val": 60, "test": 60}
    train_captions = Counter(record.captions for record in split_records(records, "train"))
    assert len(train_captions) == len(OBJECT_COLORS) * len(BACKGROUND_COLORS)
    assert min(train_captions.values()) >= 10  # balanced pairs: every caption is learnable
    held_out = {record.captions for record in records if record.split != "train"}
    assert held_out <= set(train_captions)


def test_cli_writes_the_dataset_and_rejects_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path / "out"), "--num-images", "30", "--seed", "5", "--image-size", "32"]) == 0
    assert "wrote 30 images" in capsys.readouterr().out
    rows = read_dataset(tmp_path / "out")
    assert len(rows) == 30 and rows[0][1].shape == (32, 32, 3)

    with pytest.raises(SystemExit) as raised:
        main(["synth", str(tmp_path / "bad"), "--num-images", "0"])
    assert raised.value.code == 2
    assert "--num-images: must be >= 3, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_pairs_choose_a_domain_of_colour_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--pairs` writes only the pairs named, each drawn in its colours (a pixel of each, at least);
    unknown colours, and pairs for the two-balls task, are refused."""
    assert main(["synth", str(tmp_path / "b"), "--num-images", "20", "--image-size", "16",
                 "--pairs", "yellow:red,green:blue"]) == 0  # fmt: skip
    rows = read_dataset(tmp_path / "b")
    assert {row["caption"] for row, _ in rows} == {
        "a yellow shape on a red background", "a green shape on a blue background"
    }  # fmt: skip
    palette = {**OBJECT_COLORS, **BACKGROUND_COLORS}
    for row, pixels in rows:
        obj, bg = row["caption"].split()[1], row["caption"].split()[5]
        colours = {tuple(pixel) for pixel in pixels.reshape(-1, 3)}
        assert palette[obj] in colours and palette[bg] in colours
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(["synth", str(tmp_path / "bad"), "--pairs", "red:teal"])
    assert raised.value.code == 2 and "--pairs: want OBJ:BG pairs" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "bad"), "--pairs", "red:blue", "--task", "two-balls"]) == 2
    assert "error: --pairs: the two-balls task" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_wordings_task_gives_each_image_differently_worded_references_of_its_colours(tmp_path: Path) -> None:
    records = load_records(make_synthetic_dataset(tmp_path, num_images=200, seed=2, task="wordings"))
    templates = [template for _, template in WORDINGS]
    short = 0
    for record in records:
        assert len(record.captions) == REFERENCES_PER_IMAGE
        pixels = np.asarray(Image.open(record.image))
        obj = next(name for name, colour in OBJECT_COLORS.items() if (pixels == colour).all(axis=-1).any())
        bg = next(name for name, colour in BACKGROUND_COLORS.items() if (pixels == colour).all(axis=-1).any())
        assert set(record.captions) <= {template.format(obj=obj, bg=bg) for template in templates}
        short += sum(caption == templates[0].format(obj=obj, bg=bg) for caption in record.captions)
    assert 0.3 < short / (len(records) * REFERENCES_PER_IMAGE) < 0.5  # the short wording: 40%, the likeliest one
