"""Caption datastores: the CLIP space they share with caption models, search equal to brute force,
self-exclusion, `add`, atomic writes, and one-line refusals (another encoder, a damaged or
foreign store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefixcap import CaptionModel
from prefixcap.errors import UserError
from prefixcap.retrieval import (
    CaptionEncoder,
    Datastore,
    IndexSettings,
    add_to_datastore,
    build_datastore,
)
from prefixcap.retrieval.index import all_vectors, build_index, measure_recall, write_index
from prefixcap.retrieval.store import CAPTIONS_FILE, INDEX_FILE, MANIFEST, _file_entry

pytest.importorskip("faiss")  # the retrieval extra

WORDS = "red green blue dog cat horse beach car food table grass ball man woman tree sky".split()


def write_captions(path: Path, images: int, *, per_image: int = 3, seed: int = 0, name: str = "img") -> Path:
    """A JSON-lines caption file of `images` images with random distinct captions; the first
    three quarters of the images are train, the rest val."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as file:
        for i in range(images):
            captions = [f"{' '.join(rng.choice(WORDS, 6))} {name}{i}x{j}" for j in range(per_image)]
            split = "train" if i < images * 3 // 4 else "val"
            file.write(json.dumps({"image": f"{name}{i}.jpg", "captions": captions, "split": split}) + "\n")
    return path


def clip_text_features(clip_dir: Path, captions: list[str]) -> np.ndarray:
    """Normalised projected text features from transformers' own CLIPModel, as a reference."""
    from transformers import AutoTokenizer, CLIPModel

    model, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        inputs = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        features = model.get_text_features(**inputs)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return F.normalize(features, dim=-1).numpy()


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int, banned: list[np.ndarray] | None = None):
    """(rows [q, k], scores [q, k]) of exact cosine search in NumPy, `banned[i]` rows left out for query i."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries @ vectors.T
    if banned is not None:
        for row, rows in enumerate(banned):
            scores[row, rows] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def random_store(tmp_path: Path, settings: IndexSettings, *, images: int = 400, per_image: int = 5, dim: int = 16):
    """A Datastore over clustered random unit vectors (for search tests that need no CLIP)."""
    from prefixcap.retrieval.encoder import PROBE_IMAGES, PROBE_TEXTS, EncoderRecord

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, dim))
    vectors = centres[rng.integers(0, 20, images * per_image)] + 0.5 * rng.standard_normal((images * per_image, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    groups = [(f"i{i}", [f"c{i}.{j}" for j in range(per_image)]) for i in range(images)]
    probe = np.eye(dim, dtype=np.float32)
    record = EncoderRecord("random", dim, (32, 32), probe[:PROBE_IMAGES], probe[: len(PROBE_TEXTS)])
    resolved = settings.resolved(len(vectors))
    return Datastore(tmp_path / "ds", record, resolved, build_index(vectors, resolved), groups), vectors


@pytest.fixture(scope="module")
def caption_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_captions(tmp_path_factory.mktemp("captions") / "captions.jsonl", 60)


@pytest.fixture(scope="module")
def flat_store(tiny_components, caption_file, tmp_path_factory) -> Datastore:
    return build_datastore(caption_file, tmp_path_factory.mktemp("stores") / "flat", encoder=tiny_components[0])


@pytest.fixture(scope="module")
def other_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prefixcap.testing import build_clip

    return build_clip(tmp_path_factory.mktemp("other-clip"), seed=1)


# ---------------------------------------------------------------------- the shared CLIP space
def test_captions_and_model_images_share_clips_space(tiny_components, tiny_model_dir, example_images) -> None:
    """A caption model's image embeddings, normalised, against the store's caption embeddings give
    CLIP's own image-text cosines (CLIPModel's logits / logit scale)."""
    from transformers import AutoTokenizer, CLIPModel

    clip_dir = tiny_components[0]
    captions = ["a dog on a beach.", "two cats.", "a red car"]
    text = CaptionEncoder.from_pretrained(clip_dir, device="cpu").embed(captions)
    assert np.allclose(text, clip_text_features(clip_dir, captions), atol=1e-5)
    model = CaptionModel.from_pretrained(tiny_model_dir)  # its own saved vision tower, not clip_dir
    pixels = torch.stack([model.preprocessor.load_pixels(path) for path in example_images[:3]])
    image = F.normalize(model.encode_pixels(pixels), dim=-1).numpy()
    clip, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        output = clip(**tokenizer(captions, padding=True, return_tensors="pt"),
                      pixel_values=model.preprocessor.normalize(pixels))  # fmt: skip
    expected = (output.logits_per_image / clip.logit_scale.exp()).detach().numpy()
    assert np.allclose(image @ text.T, expected, atol=1e-5)


def test_the_store_holds_each_caption_at_its_row(flat_store, tiny_components) -> None:
    assert (len(flat_store), flat_store.num_images) == (180, 60)
    expected = clip_text_features(tiny_components[0], flat_store.captions)
    assert np.allclose(all_vectors(flat_store.index), expected, atol=1e-5)
    assert flat_store.image_ids[flat_store.image_of_row[4]] == "img1.jpg" and flat_store.captions[4].endswith("img1x1")


# ---------------------------------------------------------------------- search
def test_exact_search_equals_numpy_brute_force(flat_store, tiny_components) -> None:
    vectors = clip_text_features(tiny_components[0], flat_store.captions)
    queries = torch.randn(12, vectors.shape[1], generator=torch.Generator().manual_seed(0)) * 3  # any scale
    rows, scores = brute_force(vectors, queries.numpy(), 5)
    results = flat_store.search(queries, 5)
    assert len(results) == 12
    for result, row, score in zip(results, rows, scores):
        assert result.captions == tuple(flat_store.captions[r] for r in row)
        assert result.image_ids == tuple(flat_store.image_ids[flat_store.image_of_row[r]] for r in row)
        assert np.allclose(result.scores, score, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_search_recall_against_brute_force(tmp_path, kind) -> None:
    store, vectors = random_store(tmp_path, IndexSettings(kind))
    queries = vectors[::7] + 0.1 * np.random.default_rng(2).standard_normal(vectors[::7].shape).astype(np.float32)
    rows, _ = brute_force(vectors, queries, 10)
    results = store.search(queries, 10)
    found = [{store.captions.index(c) for c in result.captions} for result in results]
    recall = np.mean([len(set(row) & hits) / 10 for row, hits in zip(rows, found)])
    assert 0.9 <= recall  # the defaults search enough of a small store
    for result in results:  # scores are the true cosines, best first
        assert list(result.scores) == sorted(result.scores, reverse=True)


def test_measured_recall_is_brute_force_recall(tmp_path) -> None:
    """A weak IVF index (1 of 40 lists searched): the recall the store reports is the share of the
    exact top 10 it finds, with every vector as a query."""
    store, vectors = random_store(tmp_path, IndexSettings("ivf", nlist=40, nprobe=1))
    measured = measure_recall(store.index, queries=len(vectors), k=10)
    rows, _ = brute_force(vectors, vectors, 10)
    found = store.index.search(vectors, 10)[1]
    expected = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, found)])
    assert measured == {"k": 10, "queries": len(vectors), "recall": pytest.approx(expected, abs=1e-3)}
    assert 0.2 < measured["recall"] < 0.95  # really approximate


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_self_exclusion_drops_only_the_images_own_captions(tmp_path, kind) -> None:
    store, vectors = random_store(tmp_path, IndexSettings(kind))
    queries = vectors[[0, 5, 10, 15, 400]]  # the first captions of images 0, 1, 2, 3 and 80
    own = ["i0", "i1", None, "i3", "not in the store"]
    banned = [np.arange(5 * i, 5 * i + 5) if image else [] for i, image in zip([0, 1, 2, 3, 80], own)]
    banned = [rows if own[q] in store.image_ids else [] for q, rows in enumerate(banned)]
    rows, scores = brute_force(vectors, queries, 4, banned)
    results = store.search(queries, 4, exclude=own)
    for query, result in enumerate(results):
        assert own[query] not in result.image_ids and len(result.captions) == 4
        if kind == "flat":
            assert result.captions == tuple(store.captions[r] for r in rows[query])
    unexcluded = store.search(queries, 4)
    assert unexcluded[0].image_ids[0] == "i0" and unexcluded[4].image_ids[0] == "i80"  # the precondition


def test_exclusion_of_an_image_with_more_captions_than_k(tmp_path) -> None:
    store, vectors = random_store(tmp_path, IndexSettings("flat"), per_image=8)
    result = store.search(vectors[:1], 2, exclude=["i0"])[0]
    assert len(result.captions) == 2 and "i0" not in result.image_ids


def test_search_refuses_embeddings_of_another_width(flat_store) -> None:
    with pytest.raises(UserError, match="24-d CLIP embeddings"):
        flat_store.search(torch.randn(2, 512), 4)


# ---------------------------------------------------------------------- add, reload, atomic writes
def test_add_then_search_equals_one_build(tiny_components, caption_file, tmp_path) -> None:
    more = write_captions(tmp_path / "more.jsonl", 20, seed=5, name="new")
    store = build_datastore(caption_file, tmp_path / "ds", encoder=tiny_components[0])
    added = add_to_datastore(tmp_path / "ds", more)
    reloaded = Datastore.load(tmp_path / "ds")
    assert (len(reloaded), reloaded.num_images) == (len(store) + 60, 80)
    assert [source["source"] for source in reloaded.sources] == [str(caption_file), str(more)]
    both = tmp_path / "both.jsonl"
    both.write_text(caption_file.read_text() + more.read_text())
    together = build_datastore(both, tmp_path / "together", encoder=tiny_components[0])
    assert reloaded.captions == together.captions and reloaded.image_ids == together.image_ids
    queries = torch.randn(8, 24, generator=torch.Generator().manual_seed(3))
    assert reloaded.search(queries, 5) == together.search(queries, 5) == added.search(queries, 5)
    new_caption = CaptionEncoder.from_pretrained(tiny_components[0], device="cpu").embed([reloaded.captions[-1]])
    assert reloaded.search(new_caption, 1)[0].image_ids == ("new19.jpg",)


def test_add_keeps_an_approximate_store_approximate(tiny_components, caption_file, tmp_path) -> None:
    store = build_datastore(caption_file, tmp_path / "ds", encoder=tiny_components[0], index=IndexSettings("hnsw"))
    assert store.recall is not None and store.recall["queries"] == 180
    added = add_to_datastore(tmp_path / "ds", write_captions(tmp_path / "more.jsonl", 10, name="new"))
    reloaded = Datastore.load(tmp_path / "ds")
    assert reloaded.settings == store.settings and reloaded.recall == added.recall and added.recall["queries"] == 210


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_a_reloaded_store_searches_as_built(tiny_components, caption_file, flat_store, tmp_path, kind) -> None:
    """An approximate store's search settings come back with it: an IVF store searching all its
    lists finds what exact search finds, after a reload too."""
    settings = IndexSettings("ivf", nlist=4, nprobe=4) if kind == "ivf" else IndexSettings("hnsw", ef_search=200)
    build_datastore(caption_file, tmp_path / "ds", encoder=tiny_components[0], index=settings)
    reloaded = Datastore.load(tmp_path / "ds")
    assert reloaded.settings == settings.resolved(len(reloaded))
    if kind == "ivf":
        queries = torch.randn(30, 24, generator=torch.Generator().manual_seed(4))
        assert reloaded.search(queries, 10) == flat_store.search(queries, 10)
    setting = "nprobe" if kind == "ivf" else "ef_search"
    _edit_manifest(lambda m: m["index"].update({setting: 3}))(tmp_path / "ds")
    with pytest.raises(UserError, match=f"has {setting} {getattr(settings, setting)}, the manifest says 3"):
        Datastore.load(tmp_path / "ds")


def test_a_failed_add_leaves_the_store_as_it_was(tiny_components, caption_file, tmp_path, monkeypatch) -> None:
    build_datastore(caption_file, tmp_path / "ds", encoder=tiny_components[0])
    before = {path.name: path.read_bytes() for path in (tmp_path / "ds").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("prefixcap.retrieval.store._file_entry", fail)  # after the index and captions are written
    with pytest.raises(OSError, match="disk full"):
        add_to_datastore(tmp_path / "ds", write_captions(tmp_path / "more.jsonl", 5, name="new"))
    assert {path.name: path.read_bytes() for path in (tmp_path / "ds").iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ds", "more.jsonl"]  # no staging left
    assert len(Datastore.load(tmp_path / "ds")) == 180


def test_splits_choose_the_captions(tiny_components, caption_file, tmp_path) -> None:
    store = build_datastore(caption_file, tmp_path / "ds", encoder=tiny_components[0], splits=["train"])
    assert store.num_images == 45 and store.sources[0]["splits"] == {"train": 45}


# ---------------------------------------------------------------------- refusals
def test_a_model_with_another_clip_is_refused(flat_store, tiny_model_dir, tiny_components, other_clip) -> None:
    same = CaptionModel.from_pretrained(tiny_model_dir)
    flat_store.check_model(same)  # its saved vision tower is the store's CLIP, under another name
    flat_store.check_model(CaptionModel.from_pretrained(tiny_model_dir, dtype=torch.bfloat16))
    other = CaptionModel.from_components(other_clip, tiny_components[1], prefix_length=4)
    with pytest.raises(UserError) as error:
        flat_store.check_model(other)
    message = str(error.value)
    assert "\n" not in message and str(other_clip) in message and "embeds images differently" in message


def test_a_model_with_a_non_clip_encoder_is_refused(flat_store, tiny_components, tmp_path) -> None:
    from prefixcap.testing import build_dinov2

    dinov2 = build_dinov2(tmp_path / "dinov2")
    model = CaptionModel.from_components(dinov2, tiny_components[1], prefix_length=4)
    with pytest.raises(UserError, match="is a dinov2 tower, not a CLIP"):
        flat_store.check_model(model)


def test_add_with_another_clip_is_refused(flat_store, other_clip, tmp_path) -> None:
    more = write_captions(tmp_path / "more.jsonl", 5, name="new")
    with pytest.raises(UserError, match="is another CLIP"):
        add_to_datastore(flat_store.path, more, encoder=other_clip)


def test_add_refuses_images_already_in_the_store(flat_store, caption_file) -> None:
    with pytest.raises(UserError, match="'img0.jpg' is in the datastore"):
        add_to_datastore(flat_store.path, caption_file)


def test_build_refuses_an_encoder_without_a_text_tower(caption_file, tiny_components, tmp_path) -> None:
    with pytest.raises(UserError, match="needs a full CLIP"):
        build_datastore(caption_file, tmp_path / "ds", encoder=tiny_components[1])  # GPT-2
    assert not (tmp_path / "ds").exists()


def test_build_refuses_a_folder_that_is_not_a_store(caption_file, tiny_components, tmp_path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a prefixcap datastore"):
        build_datastore(caption_file, tmp_path / "ds", encoder=tiny_components[0])
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"


def _flip_byte(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def _edit_manifest(edit):
    def apply(store: Path) -> None:
        manifest = json.loads((store / MANIFEST).read_text())
        edit(manifest)
        (store / MANIFEST).write_text(json.dumps(manifest))

    return apply


def _replace_with_link(name: str):
    def apply(store: Path) -> None:
        target = store.parent / f"elsewhere-{name}"
        (store / name).rename(target)
        (store / name).symlink_to(target)

    return apply


DAMAGE = {
    "index bytes": (lambda store: _flip_byte(store / INDEX_FILE), "index.faiss: checksum mismatch"),
    "captions bytes": (lambda store: _flip_byte(store / CAPTIONS_FILE), "captions.json: checksum mismatch"),
    "truncated index": (
        lambda store: (store / INDEX_FILE).write_bytes((store / INDEX_FILE).read_bytes()[:-8]),
        "the manifest says",
    ),
    "missing captions": (lambda store: (store / CAPTIONS_FILE).unlink(), "captions.json: missing"),
    "manifest not JSON": (lambda store: (store / MANIFEST).write_text("{"), "not a prefixcap datastore manifest"),
    "foreign manifest": (lambda store: (store / MANIFEST).write_text('{"format": "x"}'), "not a prefixcap datastore"),
    "newer format": (_edit_manifest(lambda m: m.update(format_version=2)), "datastore format 2"),
    "unknown field": (_edit_manifest(lambda m: m.update(extra=1)), "damaged manifest"),
    "wrong count": (_edit_manifest(lambda m: m.update(num_captions=181)), "the manifest disagrees"),
    "bad probe": (_edit_manifest(lambda m: m["encoder"]["image_probe"][0].__setitem__(0, "x")), "image_probe"),
    "bad index kind": (_edit_manifest(lambda m: m["index"].update(kind="lsh")), "unknown index kind"),
    "ivf settings on flat": (_edit_manifest(lambda m: m["index"].update(nprobe=4)), "does not apply"),
    "linked captions": (_replace_with_link(CAPTIONS_FILE), "a datastore holds no links"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_is_refused_in_one_line(flat_store, tmp_path, damage) -> None:
    store = tmp_path / "ds"
    shutil.copytree(flat_store.path, store)
    harm, expected = DAMAGE[damage]
    harm(store)
    with pytest.raises(UserError) as error:
        Datastore.load(store)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("other", ["fewer vectors", "another kind"])
def test_an_index_that_disagrees_with_its_manifest_is_refused(flat_store, tmp_path, other) -> None:
    """A consistent-looking store (checksums recomputed) whose index is not what the manifest
    says: FAISS's own header is checked against the manifest."""
    store = tmp_path / "ds"
    shutil.copytree(flat_store.path, store)
    if other == "fewer vectors":
        index, expected = build_index(np.eye(30, 24, dtype=np.float32), IndexSettings("flat")), "holds 30 24-d vectors"
    else:
        vectors = all_vectors(flat_store.index)
        index, expected = build_index(vectors, IndexSettings("hnsw").resolved(180)), "not the flat inner-product index"
    write_index(index, store / INDEX_FILE)
    _edit_manifest(lambda m: m["files"].update({INDEX_FILE: _file_entry(store / INDEX_FILE)}))(store)
    with pytest.raises(UserError, match=expected):
        Datastore.load(store)


def test_a_folder_without_a_manifest_is_not_a_store(tmp_path) -> None:
    with pytest.raises(UserError, match="not a prefixcap datastore"):
        Datastore.load(tmp_path)
