"""`prefixcap prepare` and the feature store: every format, bad images, correct rows, resume after
SIGKILL, and two processes writing the same store as one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixcap.cli import main
from prefixcap.data import load_records
from prefixcap.data.synth import make_synthetic_dataset
from prefixcap.errors import UserError
from prefixcap.inputs.images import load_image
from prefixcap.model.config import CaptionConfig
from prefixcap.model.encoders import load_image_processor
from prefixcap.pipeline.features import BAD_IMAGES, MANIFEST, FeatureStore, shard_path
from prefixcap.pipeline.prepare import prepare_features
from tests.helpers_data import DATASET, WRITERS, write_images
from tests.helpers_pipeline import kill_when, run_prefixcap, store_contents


def write_coco(root: Path) -> Path:
    """The official COCO layout: annotations/captions_train2014.json with images in train2014/."""
    names = [name for name, _, _ in DATASET]
    write_images(root / "train2014", [f"COCO_train2014_{name}" for name in names])
    document = {
        "images": [{"id": i, "file_name": f"COCO_train2014_{name}.png"} for i, name in enumerate(names)],
        "annotations": [
            {"image_id": i, "caption": caption} for i, (_, _, captions) in enumerate(DATASET) for caption in captions
        ],
    }
    (root / "annotations").mkdir()
    path = root / "annotations" / "captions_train2014.json"
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("format", sorted([*WRITERS, "coco"]))
def test_every_dataset_format_prepares(tmp_path: Path, tiny_components, format: str) -> None:
    data = write_coco(tmp_path) if format == "coco" else WRITERS[format](tmp_path)

    assert (
        main(
            [
                "prepare",
                str(data),
                "--out",
                str(tmp_path / "features"),
                "--vision-encoder",
                str(tiny_components[0]),
                "--workers",
                "0",
            ]
        )
        == 0
    )

    store = FeatureStore(tmp_path / "features")
    assert store.records() == load_records(data)  # every record, in dataset order, with its captions
    assert store.embeddings().shape == (len(DATASET), store.embed_dim)
    assert store.manifest.num_bad == 0


def test_store_rows_are_the_encoder_embeddings_of_their_images(tmp_path: Path, tiny_components) -> None:
    captions = make_synthetic_dataset(tmp_path / "synth", num_images=30, image_size=16)

    manifest = prepare_features(
        captions, tmp_path / "features", vision_encoder=tiny_components[0], shard_size=7, batch_size=4, num_workers=2
    )

    store = FeatureStore(tmp_path / "features")
    assert (manifest.num_shards, manifest.num_images, manifest.embed_dim) == (5, 30, 24)
    assert manifest.encoder == str(tiny_components[0].resolve())
    from transformers import CLIPModel  # the reference: Hugging Face's own CLIP

    encoder = CLIPModel.from_pretrained(tiny_components[0])
    processor = load_image_processor(tiny_components[0])
    assert manifest.preprocessing["crop_size"] == processor.crop_size
    for split in ("train", "val", "test"):
        records = store.records(split)
        pixels = processor([load_image(record.image) for record in records], return_tensors="pt").pixel_values
        with torch.no_grad():
            expected = encoder.visual_projection(encoder.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(store.embeddings(split).float(), expected, atol=2e-3, rtol=2e-3)  # fp16 storage


@pytest.mark.timeout(120)  # a FIFO used to block open() until a writer came
def test_bad_images_are_skipped_and_listed_with_reasons(tmp_path: Path, tiny_components) -> None:
    write_images(tmp_path / "img", ["good"])
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    os.mkfifo(tmp_path / "img" / "fifo.png")
    (tmp_path / "img" / "zero.png").symlink_to("/dev/zero")
    names = ["good", "broken", "missing", "fifo", "zero"]
    lines = [{"image": f"img/{name}.png", "caption": f"a {name} image"} for name in names]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    manifest = prepare_features(
        tmp_path / "data.jsonl", tmp_path / "features", vision_encoder=tiny_components[0], num_workers=0,
        allow_outside_root=True,  # (zero.png leads outside)
    )  # fmt: skip

    assert (manifest.num_records, manifest.num_images, manifest.num_bad) == (5, 1, 4)
    assert [record.captions for record in FeatureStore(tmp_path / "features").records()] == [("a good image",)]
    bad = [json.loads(line) for line in (tmp_path / "features" / BAD_IMAGES).read_text().splitlines()]
    assert [entry["image_id"] for entry in bad] == [f"img/{name}.png" for name in names[1:]]
    assert [entry["reason"].split(" (")[0] for entry in bad] == [
        "corrupt or truncated image", "no such file", "not a regular file", "not a regular file"
    ]  # fmt: skip


def test_rerun_keeps_finished_shards_and_redoes_changed_ones(tmp_path: Path, tiny_components) -> None:
    captions = make_synthetic_dataset(tmp_path / "synth", num_images=20, image_size=16)
    options = {"vision_encoder": tiny_components[0], "shard_size": 8, "num_workers": 0}
    prepare_features(captions, tmp_path / "features", **options)
    written = {i: shard_path(tmp_path / "features", i, ".safetensors").stat().st_mtime_ns for i in range(3)}

    lines = captions.read_text().splitlines()
    lines[10] = lines[10].replace("shape", "thing")  # a caption of shard 1 changes
    captions.write_text("\n".join(lines) + "\n")
    prepare_features(captions, tmp_path / "features", **options)

    rewritten = {i: shard_path(tmp_path / "features", i, ".safetensors").stat().st_mtime_ns for i in range(3)}
    assert [rewritten[i] == written[i] for i in range(3)] == [True, False, True]
    assert "thing" in FeatureStore(tmp_path / "features").records()[10].captions[0]


def test_rerun_redoes_shards_when_the_encoder_folder_changes(tmp_path: Path, tiny_components) -> None:
    """The store's shards name the encoder folder's files too: weights saved again at the same path
    are not mistaken for the ones the shards were encoded with (the old store is then replaced
    only with --overwrite, as any store of other data)."""
    captions = make_synthetic_dataset(tmp_path / "synth", num_images=10, image_size=16)
    encoder = tmp_path / "clip"
    shutil.copytree(tiny_components[0], encoder)
    prepare_features(captions, tmp_path / "features", vision_encoder=encoder, num_workers=0)
    before = FeatureStore(tmp_path / "features").embeddings("train")
    weights = load_file(encoder / "model.safetensors")
    save_file(
        {name: -tensor for name, tensor in weights.items()}, encoder / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(UserError, match="pass --overwrite"):  # none of its shards is this encoder's
        prepare_features(captions, tmp_path / "features", vision_encoder=encoder, num_workers=0)
    prepare_features(captions, tmp_path / "features", vision_encoder=encoder, num_workers=0, overwrite=True)
    after = FeatureStore(tmp_path / "features").embeddings("train")
    assert not torch.allclose(before, after)
    fresh = tmp_path / "fresh"
    prepare_features(captions, fresh, vision_encoder=encoder, num_workers=0)
    assert torch.equal(after, FeatureStore(fresh).embeddings("train"))


def test_feature_store_checks_the_model_encoder(tmp_path: Path, tiny_components) -> None:
    captions = make_synthetic_dataset(tmp_path / "synth", num_images=10, image_size=16)
    prepare_features(captions, tmp_path / "features", vision_encoder=tiny_components[0], num_workers=0)
    store = FeatureStore(tmp_path / "features")
    matching = CaptionConfig(vision_encoder=str(tiny_components[0]), embed_dim=24)

    store.check_encoder(matching, load_image_processor(tiny_components[0]))
    with pytest.raises(UserError, match="24-d, but the model's mapper expects 512-d"):
        store.check_encoder(CaptionConfig(vision_encoder=str(tiny_components[0]), embed_dim=512))
    with pytest.raises(UserError, match="but the model uses 'openai/clip-vit-base-patch32'"):
        store.check_encoder(CaptionConfig(embed_dim=24))
    with pytest.raises(UserError, match="no images in split 'nope'"):
        store.records("nope")
    with pytest.raises(UserError, match="not a finished feature store"):
        FeatureStore(tmp_path / "synth")


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_store(tmp_path: Path, tiny_components, one_thread) -> None:
    captions = make_synthetic_dataset(tmp_path / "synth", num_images=240, image_size=16)
    features = tmp_path / "killed"
    args = [
        "prepare",
        captions,
        "--out",
        features,
        "--vision-encoder",
        tiny_components[0],
        "--shard-size",
        "10",
        "--batch-size",
        "5",
        "--workers",
        "0",
    ]

    kill_when(args, ready=lambda: shard_path(features, 0, ".safetensors").exists())
    survivors = {path.name: path.stat().st_mtime_ns for path in (features / "shards").glob("*.safetensors")}
    assert not (features / MANIFEST).exists() and 1 <= len(survivors) < 24
    prepare_features(captions, features, vision_encoder=tiny_components[0], shard_size=10, num_workers=0)  # the rerun
    prepare_features(
        captions, tmp_path / "uninterrupted", vision_encoder=tiny_components[0], shard_size=10, num_workers=0
    )

    assert all(
        shard_path(features, int(name[:6]), ".safetensors").stat().st_mtime_ns == mtime
        for name, mtime in survivors.items()
    )
    (records, embeds), (expected_records, expected_embeds) = (
        store_contents(features),
        store_contents(tmp_path / "uninterrupted"),
    )
    assert records == expected_records == load_records(captions)  # nothing missing, nothing twice
    assert all(torch.equal(embeds[split], expected_embeds[split]) for split in expected_embeds)


@pytest.mark.slow
def test_two_processes_write_the_same_store_as_one(tmp_path: Path, tiny_components, one_thread) -> None:
    captions = make_synthetic_dataset(tmp_path / "synth", num_images=50, image_size=16)
    args = ["prepare", captions, "--vision-encoder", tiny_components[0], "--shard-size", "8", "--workers", "0"]

    run_prefixcap(*args, "--out", tmp_path / "two", processes=2)
    prepare_features(captions, tmp_path / "one", vision_encoder=tiny_components[0], shard_size=8, num_workers=0)

    (records, embeds), (expected_records, expected_embeds) = (
        store_contents(tmp_path / "two"),
        store_contents(tmp_path / "one"),
    )
    assert records == expected_records
    assert all(torch.equal(embeds[split], expected_embeds[split]) for split in expected_embeds)
    manifest = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert manifest == json.loads((tmp_path / "one" / MANIFEST).read_text())
