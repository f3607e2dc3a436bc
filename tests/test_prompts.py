"""Caption text: prompts the decoder continues (inference and training), and a prefix and suffix
around each caption, in the model, the Captioner, the CLI and the server; the prompt-conditioned
synthetic task is learnable end to end."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from prefixcap import Captioner, CaptionModel
from prefixcap.cli import main
from prefixcap.data import CaptionRecord, load_records
from prefixcap.engine import backends
from prefixcap.errors import ModelLoadError, UserError
from prefixcap.model.config import CONFIG_NAME, CaptionConfig
from prefixcap.options import TextOptions
from prefixcap.pipeline.features import FeatureStore
from prefixcap.pipeline.prepare import prepare_features
from prefixcap.serving import ServerConfig, create_app
from prefixcap.serving.app import CAPTION_PATH
from prefixcap.testing import build_learnable_components
from prefixcap.training import TrainConfig
from prefixcap.training.data import CaptionTargets, trained_prompt
from prefixcap.training.objective import CaptionLoss
from prefixcap.training.trainer import Trainer
from tests.helpers_engine import hf_generate_only
from tests.reference import naive_greedy, strip_padding

PROMPT = "a photo of"


@pytest.fixture(scope="module")
def captioner(tiny_model_dir: Path) -> Captioner:
    return Captioner.from_pretrained(tiny_model_dir, dtype="float32")  # the losses are compared in fp32


@pytest.fixture(scope="module")
def pixels(captioner: Captioner, example_images: list[Path]) -> torch.Tensor:
    return torch.stack([captioner.preprocess(path) for path in example_images[:3]])


def reference_continuation(model: CaptionModel, pixels: torch.Tensor, prompt: str, max_new_tokens: int) -> list:
    """Greedy tokens after [prefix; prompt embeddings], the whole sequence recomputed at each step."""
    prefix = model.prefix_embeds(model.encode_pixels(pixels))
    prompt_ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    prompt_embeds = model.decoder.get_input_embeddings()(torch.tensor(prompt_ids)).expand(len(prefix), -1, -1)
    return naive_greedy(model.decoder, torch.cat([prefix, prompt_embeds], 1), max_new_tokens, model.stop_token_ids())


# ------------------------------------------------------------------------ inference
@pytest.mark.parametrize("engine", [True, False], ids=["engine", "hf-generate"])
def test_a_prompted_caption_is_the_greedy_continuation_of_prefix_and_prompt(
    captioner: Captioner, pixels: torch.Tensor, engine: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = captioner.model
    if not engine:  # decoders the engine does not support go through HF generate
        monkeypatch.setattr("prefixcap.engine.backends.choose_backend", hf_generate_only)
    expected = reference_continuation(model, pixels, PROMPT, 8)
    ids = model.generate(pixels=pixels, prompt=PROMPT, max_new_tokens=8)
    assert strip_padding(ids, model.stop_token_ids()) == expected
    unprompted = model.generate(pixels=pixels, max_new_tokens=8)
    assert strip_padding(unprompted, model.stop_token_ids()) != expected  # the prompt changed the captions

    captions = model.caption(pixels=pixels, prompt=PROMPT, max_new_tokens=8)
    assert captions == [
        [" ".join(text.split())] for text in model.tokenizer.batch_decode(expected, skip_special_tokens=True)
    ]
    # --keep-prompt: the prompt and its continuation, decoded together
    prompt_ids = model.tokenizer.encode(PROMPT, add_special_tokens=False)
    kept = model.caption(pixels=pixels, prompt=PROMPT, keep_prompt=True, max_new_tokens=8)
    assert kept == [[model.detokenize(torch.tensor([prompt_ids + row]))[0]] for row in expected]
    assert all(texts[0].startswith(PROMPT) for texts in kept)


def test_the_prompt_counts_against_the_decoders_positions(captioner: Captioner) -> None:
    model = captioner.model
    limit = model.max_new_tokens_limit
    assert model.generation_options(max_new_tokens=limit).max_new_tokens == limit
    prompt_length = len(model.prompt_ids(PROMPT))
    with pytest.raises(
        ValueError, match=rf"max_new_tokens must be <= {limit - prompt_length}: .* the prompt {prompt_length}"
    ):
        model.generation_options(prompt=PROMPT, max_new_tokens=limit)
    assert model.generation_options(prompt=PROMPT, max_new_tokens=limit - prompt_length)
    with pytest.raises(ValueError, match=rf"^the prompt is \d+ tokens, .* at most {limit - 1} prompt tokens fit$"):
        model.generation_options(prompt="word " * 200)


def test_one_prompt_per_image_captions_each_image_with_its_own(captioner: Captioner, pixels: torch.Tensor) -> None:
    model = captioner.model
    mixed = model.caption(pixels=pixels, prompt=[PROMPT, "", PROMPT], max_new_tokens=6)
    with_prompt = model.caption(pixels=pixels, prompt=PROMPT, max_new_tokens=6)
    without = model.caption(pixels=pixels, prompt="", max_new_tokens=6)
    assert mixed == [with_prompt[0], without[1], with_prompt[2]]


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "hf-generate"])
@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "num_return_sequences": 2}], ids=["greedy", "beam"])
def test_prompts_of_different_lengths_caption_in_one_batch_as_alone(
    image_dependent_model_dir: Path, engine: bool, options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retrieval gives every image its own prompt: the images are decoded in one batch (one
    backend call, not one per prompt), and each gets the captions it gets alone, prompt kept or not."""
    from prefixcap.testing import COLOURS, colour_image

    model = CaptionModel.from_pretrained(image_dependent_model_dir, device="cpu", dtype=torch.float32).eval()
    if not engine:
        monkeypatch.setattr("prefixcap.engine.backends.choose_backend", hf_generate_only)
    names = list(COLOURS)[:5]
    pixels = torch.stack([torch.from_numpy(colour_image(name)).permute(2, 0, 1) for name in names])
    prompts = [PROMPT, "", None, "a photo of a shape and", "a"]  # None: the model's own
    assert len({len(model.prompt_ids(prompt)) for prompt in prompts}) >= 4

    def alone(**text) -> list[list[str]]:
        return [
            model.caption(pixels=pixels[i : i + 1], prompts=[p], **text, **options)[0] for i, p in enumerate(prompts)
        ]

    expected = alone()
    assert len({captions[0] for captions in expected}) == len(names)  # the images get different captions
    calls = []
    generate = backends.generate
    monkeypatch.setattr(backends, "generate", lambda *args: calls.append(args) or generate(*args))
    assert model.caption(pixels=pixels, prompts=prompts, **options) == expected
    assert len(calls) == 1
    kept = model.caption(pixels=pixels, prompts=prompts, keep_prompt=True, **options)
    assert kept == alone(keep_prompt=True) and kept[3][0].startswith("a photo of a shape and")


def test_prefix_and_suffix_wrap_the_captioners_captions(captioner: Captioner, example_images: list[Path]) -> None:
    images = example_images[:2]
    plain = captioner(images, prompt=PROMPT, num_return_sequences=2)
    wrapped = captioner(images, prompt=PROMPT, num_return_sequences=2, prefix="sks person, ", suffix=" [end]")
    assert wrapped == [[f"sks person, {text} [end]" for text in texts] for texts in plain]
    streamed = [captions for _, captions in captioner.stream(images, workers=0, prefix="<", suffix=">")]
    assert streamed == [[f"<{text}>" for text in texts] for texts in captioner(images)]
    with pytest.raises(ValueError, match="prefix must be a string"):
        captioner(images, prefix=3)


def test_the_cli_prompts_and_wraps(
    tiny_model_dir: Path, captioner: Captioner, example_images: list[Path], capsys: pytest.CaptureFixture
) -> None:
    image = str(example_images[0])
    args = ["caption", image, "--model", str(tiny_model_dir), "--max-new-tokens", "6"]
    assert main([*args, "--prompt", PROMPT, "--keep-prompt", "--prefix", "sks, ", "--suffix", "!"]) == 0
    expected = captioner([image], prompt=PROMPT, keep_prompt=True, max_new_tokens=6)[0][0]
    assert capsys.readouterr().out == f"{image}\tsks, {expected}!\n"
    assert expected.startswith(PROMPT)
    assert main([*args, "--prompt", PROMPT]) == 0
    assert capsys.readouterr().out == f"{image}\t{captioner([image], prompt=PROMPT, max_new_tokens=6)[0][0]}\n"
    assert main([*args[:-2], "--prompt", "word " * 200, "--max-new-tokens", "20"]) == 2
    assert "prompt tokens fit" in capsys.readouterr().err


def test_the_server_takes_prompt_prefix_and_suffix(captioner: Captioner, example_images: list[Path]) -> None:
    app = create_app(captioner, ServerConfig(model_name="tiny", max_batch_size=8))
    data = example_images[0].read_bytes()
    with TestClient(app) as client:
        fields = {"prompt": PROMPT, "keep_prompt": "true", "prefix": "sks, ", "suffix": "!", "max_new_tokens": "6"}
        answer = client.post(CAPTION_PATH, files=[("images", ("a.jpg", data))], data=fields)
        assert answer.status_code == 200, answer.text
        expected = captioner([data], prompt=PROMPT, keep_prompt=True, max_new_tokens=6)[0][0]
        assert answer.json() == [[{"generated_text": f"sks, {expected}!"}]]
        too_long = client.post(CAPTION_PATH, files=[("images", ("a.jpg", data))], data={"suffix": "x" * 1001})
        assert too_long.status_code == 422 and "suffix must be at most 1000 characters" in too_long.text


@pytest.mark.parametrize("name", ["prompt", "prefix", "suffix"])
def test_text_that_is_not_unicode_is_refused_before_any_work(
    name: str, tiny_model_dir: Path, captioner: Captioner, example_images: list[Path], tmp_path: Path, capsys
) -> None:
    """A lone surrogate (a non-UTF-8 byte of a command-line argument, or a JSON \\ud800 escape)
    cannot be written to any output: refused up front, in one line or a 422, not after captioning."""
    with pytest.raises(ValueError, match=f"{name} is not valid Unicode text"):
        TextOptions(**{name: "tag\udcff"})
    image = tmp_path / "a.jpg"
    image.write_bytes(example_images[0].read_bytes())
    args = ["caption", str(image), "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--workers", "0"]
    for output in (["--sidecar"], ["--output", str(tmp_path / "out.csv"), "--format", "csv"]):
        assert main([*args, *output, f"--{name}", "tag\udcff"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and f"{name} is not valid Unicode text" in error
        assert error.count("\n") == 1 and "Traceback" not in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.jpg"]
    app = create_app(captioner, ServerConfig(model_name="tiny", max_batch_size=8))
    encoded = base64.b64encode(image.read_bytes()).decode()
    body = f'{{"images": ["{encoded}"], "{name}": "a\\ud800"}}'  # json.dumps would escape the backslash
    with TestClient(app) as client:
        answer = client.post(CAPTION_PATH, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["kind"] == "invalid_options" and "not valid Unicode text" in answer.text


def test_text_options_split_from_decoding_options() -> None:
    text, rest = TextOptions.split({"prompt": "left:", "num_beams": 2, "suffix": "."})
    assert text == TextOptions(prompt="left:", suffix=".") and rest == {"num_beams": 2}
    assert text.wrap("a red ball") == "a red ball."


def test_evaluation_captions_each_record_after_its_prompt(captioner: Captioner, example_images: list[Path]) -> None:
    from prefixcap.evaluation.generate import caption_records

    prompts = ["left:", None, "left:"]
    records = [
        CaptionRecord(str(i), str(path), ("x",), "test", prompt)
        for i, (path, prompt) in enumerate(zip(example_images, prompts))
    ]
    expected = {
        record.image_id: captioner([record.image], prompt=record.prompt or "", max_new_tokens=5)[0][0]
        for record in records
    }
    embeds = captioner.model.encode_pixels(torch.stack([captioner.preprocess(record.image) for record in records]))
    from_features, _ = caption_records(captioner, records, embeddings=embeds, max_new_tokens=5)
    from_images, _ = caption_records(captioner, records, workers=0, max_new_tokens=5)
    assert list(from_features.items()) == list(expected.items())
    assert from_images == expected
    everyone, _ = caption_records(captioner, records, embeddings=embeds, prompt="", max_new_tokens=5)
    assert everyone["0"] == captioner([records[0].image], prompt="", max_new_tokens=5)[0][0] != expected["0"]


# ------------------------------------------------------------------------ the model's trained prompt
def test_the_trained_prompt_is_the_default_and_old_configs_still_load(
    tiny_model_dir: Path, tmp_path: Path, pixels: torch.Tensor
) -> None:
    values = json.loads((tiny_model_dir / CONFIG_NAME).read_text())
    del values["prompt"]  # a config.json written before prompts existed
    (tmp_path / CONFIG_NAME).write_text(json.dumps(values))
    assert CaptionConfig.load(tmp_path).prompt is None
    for bad in ["", " left:", "a  b", 7]:
        (tmp_path / CONFIG_NAME).write_text(json.dumps({**values, "prompt": bad}))
        with pytest.raises(ModelLoadError, match="prompt must be"):
            CaptionConfig.load(tmp_path)

    model = CaptionModel.from_pretrained(tiny_model_dir)
    explicit = model.caption(pixels=pixels, prompt=PROMPT, max_new_tokens=5)
    model.config.prompt = PROMPT
    assert model.caption(pixels=pixels, max_new_tokens=5) == explicit
    assert model.caption(pixels=pixels, prompt="", max_new_tokens=5) != explicit  # "" turns it off


def test_trained_prompt_is_the_one_all_captions_share() -> None:
    assert trained_prompt(["left:", "left:"]) == "left:"
    assert trained_prompt(["left:", "right:"]) is None
    assert trained_prompt(["", ""]) is None


# ------------------------------------------------------------------------ training with prompts
def test_training_conditions_on_the_prompt_and_learns_the_caption_only(captioner: Captioner) -> None:
    model, tokenizer = captioner.model, captioner.model.tokenizer
    records = [
        CaptionRecord("0", "0.png", ("a red ball",), "train", prompt="left:"),
        CaptionRecord("1", "1.png", ("two dogs on a beach",), "train"),
        CaptionRecord("2", "2.png", ("a blue ball",), "train", prompt="the ball on the right is"),
    ]
    targets = CaptionTargets.build(records, torch.randn(3, model.config.embed_dim), tokenizer)
    batch = targets.batch(np.arange(3))
    eos, caption_lengths = tokenizer.eos_token_id, []
    for row, record in enumerate(records):
        prompt = tokenizer.encode(record.prompt, add_special_tokens=False) if record.prompt else []
        caption = tokenizer.encode((" " if record.prompt else "") + record.captions[0], add_special_tokens=False)
        length = len(prompt) + len(caption) + 1
        caption_lengths.append(len(caption) + 1)
        assert batch["input_ids"][row, :length].tolist() == [*prompt, *caption, eos]
        assert batch["labels"][row].tolist() == [-100] * len(prompt) + [*caption, eos] + [-100] * (
            batch["labels"].shape[1] - length
        )
    assert targets.max_tokens == max(caption_lengths)  # the prompts do not count

    # The loss: cross-entropy of the caption tokens and EOS given image + prompt, computed by hand.
    model.eval()
    with torch.no_grad():
        loss = CaptionLoss(model)(**batch)
        forward = model(**batch).loss
        logits = model.decoder(
            inputs_embeds=model.embed_inputs(batch["input_ids"], image_embeds=batch["image_embeds"])
        ).logits
    k, terms = model.config.prefix_length, []
    for row in range(3):
        for position, label in enumerate(batch["labels"][row].tolist()):
            if label != -100:  # position K-1+t predicts token t
                terms.append(torch.nn.functional.cross_entropy(logits[row, k - 1 + position], torch.tensor(label)))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    torch.testing.assert_close(forward, torch.stack(terms).mean())

    # One prompt for the whole dataset (`train --prompt`) replaces the records' own.
    overridden = CaptionTargets.build(records, torch.randn(3, model.config.embed_dim), tokenizer, prompt="left:")
    left = tokenizer.encode("left:", add_special_tokens=False)
    assert all(row[: len(left)].tolist() == left for row in overridden.ids)


def test_a_prompt_too_long_for_the_decoder_is_refused(captioner: Captioner) -> None:
    record = CaptionRecord("0", "0.png", ("a red ball",), "train", prompt="word " * 200)
    with pytest.raises(UserError, match="leaves no room for a caption"):
        CaptionTargets.build([record], torch.randn(1, 24), captioner.model.tokenizer, limit=60)


# ------------------------------------------------------------------------ datasets and the feature store
def test_readers_and_the_feature_store_keep_prompts(tmp_path: Path, tiny_components, example_images) -> None:
    image = example_images[0]
    rows = [
        {"image": str(image), "caption": "a red ball", "prompt": "  left: ", "split": "train"},
        {"image": str(example_images[1]), "caption": "two dogs", "split": "train"},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "data.csv").write_text(
        f"image,caption,prompt\n{image},a red ball,left:\n{example_images[1]},two dogs,\n"
    )
    root = image.parent  # (where the images are: the rows name them by absolute paths)
    for name in ("data.jsonl", "data.csv"):
        assert [record.prompt for record in load_records(tmp_path / name, images_root=root)] == ["left:", None]

    prepare_features(
        tmp_path / "data.jsonl", tmp_path / "features", vision_encoder=tiny_components[0], num_workers=0,
        images_root=root,
    )  # fmt: skip
    assert [record.prompt for record in FeatureStore(tmp_path / "features").records()] == ["left:", None]
    entries = [
        json.loads(line) for line in (tmp_path / "features" / "shards" / "000000.jsonl").read_text().splitlines()
    ]
    assert "prompt" not in entries[1]  # prompt-less records are stored as before prompts existed

    (tmp_path / "clash.jsonl").write_text(
        json.dumps({"image": "a.png", "caption": "x", "prompt": "left:"})
        + "\n"
        + json.dumps({"image": "a.png", "caption": "y", "prompt": "right:"})
        + "\n"
    )
    with pytest.raises(UserError, match=r"clash.jsonl:2: image .* was given prompt 'left:' before, now 'right:'"):
        load_records(tmp_path / "clash.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x", "prompt": 3}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: prompt must be a string, not int"):
        load_records(tmp_path / "bad.jsonl")


def test_train_prompt_becomes_the_models_default(tmp_path: Path, tiny_components, one_thread) -> None:
    from prefixcap.data.synth import make_synthetic_dataset

    captions = make_synthetic_dataset(tmp_path / "data", num_images=20, image_size=16)
    prepare_features(captions, tmp_path / "features", vision_encoder=tiny_components[0], num_workers=0)
    config = TrainConfig(
        features=str(tmp_path / "features"), out=str(tmp_path / "run"), decoder=str(tiny_components[1]),
        prefix_length=4, epochs=1, batch_size=8, val_images=2, prompt="a  photo of ",
    )  # fmt: skip
    Trainer(config).fit()
    assert CaptionConfig.load(tmp_path / "run" / "best").prompt == "a photo of"


# ------------------------------------------------------------------------ learnability
@pytest.mark.slow
def test_two_balls_learnability_synth_prepare_train_caption(tmp_path: Path, one_thread) -> None:
    """Tiny real models learn to describe the ball the prompt names: held-out captions match."""
    clip, gpt2 = build_learnable_components(tmp_path / "models")
    data = tmp_path / "data"
    assert main(["synth", str(data), "--task", "two-balls", "--num-images", "600", "--image-size", "32"]) == 0
    assert main(["prepare", str(data / "captions.jsonl"), "--out", str(tmp_path / "features"),
                 "--vision-encoder", str(clip), "--workers", "0"]) == 0  # fmt: skip
    assert main(["train", str(tmp_path / "features"), "--decoder", str(gpt2), "--out", str(tmp_path / "run"),
                 "--prefix-length", "4", "--epochs", "30", "--batch-size", "16", "--lr", "3e-3",
                 "--val-images", "60", "--seed", "0"]) == 0  # fmt: skip

    test = [record for record in load_records(data / "captions.jsonl") if record.split == "test"]
    assert {record.prompt for record in test} == {"left:", "right:"}
    captioner = Captioner.from_pretrained(tmp_path / "run" / "best")
    assert captioner.model.config.prompt is None  # two prompts: no single default
    exact = 0
    for record in test:
        exact += captioner([record.image], prompt=record.prompt)[0][0] == record.captions[0]
    assert exact >= 0.9 * len(test), f"{exact}/{len(test)} exact"
