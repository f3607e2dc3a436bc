"""Random-weight image encoders (CLIP, SigLIP, DINOv2) and decoders (GPT-2, the Llama family)
built locally, for offline tests and speed benchmarks.

They use the real transformers classes and are saved and loaded through the same
`from_pretrained` path that users take with hub ids, so tests cover the real loading code.
Speed does not depend on weight values, so the full-size variants serve the benchmarks.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from prefixcap.engine.families import FAMILIES as ENGINE_FAMILIES
from prefixcap.model.config import CONFIG_NAME

# Words the tiny tokenizer learns; chosen to cover the synthetic captions and test sentences.
_CORPUS = [
    "a red shape on a blue background.",
    "a green shape on a yellow background.",
    "a white shape on a black background.",
    "an orange shape on a purple background.",
    "a photo of a cat sitting on a couch.",
    "a man riding a horse on a beach.",
    "two dogs playing with a ball in the grass.",
    "a plate of food with broccoli and rice.",
]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in well under a second, saved GPT-2 style."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    special = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=special, eos_token=special, unk_token=special
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_clip_tokenizer(out_dir: str | Path) -> None:
    """A character-level CLIPTokenizer. BOS and EOS differ (1 and 0), so the text tower pools at
    the EOS token as real CLIP does."""
    from transformers import CLIPTokenizer

    vocab = {"<|endoftext|>": 0, "<|startoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".,'":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32).save_pretrained(out_dir)


def build_clip(out_dir: str | Path, *, full_size: bool = False, seed: int = 0) -> Path:
    """A CLIPModel (both towers, as on the hub) plus its image processor and tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    if full_size:  # openai/clip-vit-base-patch32
        config = CLIPConfig(vision_config={"patch_size": 32}, projection_dim=512)
        image_size = 224
    else:
        tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        text = {**tower, "vocab_size": 400, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 0}
        config = CLIPConfig(
            text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=24
        )
        image_size = 32
    CLIPModel(config).save_pretrained(out_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(out_dir)
    build_clip_tokenizer(out_dir)
    return Path(out_dir)


def build_gpt2(out_dir: str | Path, *, full_size: bool = False, seed: int = 0) -> Path:
    """A GPT2LMHeadModel with a freshly trained tokenizer (GPT-2 124M shapes when full_size)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(out_dir)
    if full_size:
        config = GPT2Config()
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=96)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    return Path(out_dir)


def build_components(root: str | Path, *, full_size: bool = False) -> tuple[Path, Path]:
    """(clip_dir, gpt2_dir) under `root`; loadable with `CaptionModel.from_components`."""
    root = Path(root)
    return build_clip(root / "clip", full_size=full_size), build_gpt2(root / "gpt2", full_size=full_size)


def build_full_size_model(workdir: str | Path, decoder: str = "gpt2", *, decoder_layers: int | None = None) -> Path:
    """A saved CaptionModel with ClipCap's architecture and random weights (CLIP ViT-B/32, MLP
    mapper with K=10, GPT-2 124M), for speed benchmarks; reused when `workdir` already holds one.

    `decoder` picks another `build_decoder` family at full size (`decoder_layers`: fewer layers).
    Those models are saved with a frozen decoder kept as a reference to its component folder,
    so that a 1B-parameter decoder is on disk once."""
    from prefixcap.model.caption_model import CaptionModel

    if decoder == "gpt2" and decoder_layers is not None:
        raise ValueError("decoder_layers applies to Llama-family decoders, not gpt2")
    name = "model" if decoder == "gpt2" else f"model-{decoder}" + (f"-{decoder_layers}" if decoder_layers else "")
    model_dir = Path(workdir) / name
    if not (model_dir / CONFIG_NAME).is_file():
        torch.manual_seed(0)
        if decoder == "gpt2":
            clip_dir, gpt2_dir = build_components(Path(workdir) / "components", full_size=True)
            CaptionModel.from_components(clip_dir, gpt2_dir).save_pretrained(model_dir)
        else:
            components = Path(workdir) / "components"
            clip_dir = build_clip(components / "clip", full_size=True)
            decoder_dir = build_decoder(components / name, decoder, full_size=True, num_layers=decoder_layers)
            model = CaptionModel.from_components(clip_dir, decoder_dir, freeze_decoder=True)
            model.save_pretrained(model_dir, save_frozen=False)
    return model_dir


def build_roberta(out_dir: str | Path, corpus: list[str]) -> Path:
    """A 3-layer RoBERTa with a byte-level BPE tokenizer trained on `corpus` (for BERTScore)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(corpus * 4, vocab_size=300, special_tokens=specials, show_progress=False)
    bpe.save_model(str(out_dir))
    tokenizer = RobertaTokenizer(
        vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"), model_max_length=64
    )
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=70, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    RobertaModel(config).save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------- other image encoders
def build_siglip(out_dir: str | Path, *, full_size: bool = False, seed: int = 0) -> Path:
    """A SiglipModel (both towers, as on the hub) plus its image processor (square resize, no
    crop). No tokenizer: SiglipTokenizer needs sentencepiece, which prefixcap does not install."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    torch.manual_seed(seed)
    ids = {"pad_token_id": 1, "bos_token_id": 1, "eos_token_id": 1}  # within the vocabulary, as the hub's
    if full_size:  # google/siglip-base-patch16-224
        config, image_size = SiglipConfig(text_config=ids), 224
    else:
        tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        text = {**tower, **ids, "vocab_size": 400, "max_position_embeddings": 16}
        vision = {**tower, "image_size": 32, "patch_size": 8}
        config, image_size = SiglipConfig(text_config=text, vision_config=vision), 32
    SiglipModel(config).save_pretrained(out_dir)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return Path(out_dir)


def build_dinov2(out_dir: str | Path, *, full_size: bool = False, registers: int = 0, seed: int = 0) -> Path:
    """A Dinov2Model (Dinov2WithRegistersModel with `registers`) plus its BitImageProcessor
    (shortest-edge resize, centre crop, ImageNet mean and std, as facebook/dinov2-* ship)."""
    from transformers import (
        BitImageProcessorPil,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    torch.manual_seed(seed)
    sizes = {} if full_size else {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_ratio": 2}
    sizes |= {"image_size": 518, "patch_size": 14} if full_size else {"image_size": 32, "patch_size": 8}
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **sizes))
    else:
        model = Dinov2Model(Dinov2Config(**sizes))
    model.save_pretrained(out_dir)
    shortest, crop = (256, 224) if full_size else (36, 32)
    BitImageProcessorPil(
        size={"shortest_edge": shortest}, crop_size={"height": crop, "width": crop},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out_dir)  # fmt: skip
    return Path(out_dir)


# ---------------------------------------------------------------------- decoders: GPT-2 and the Llama family

# Tiny shapes: 2 layers, 4 heads over 2 key/value heads (grouped-query attention), wide random
# weights (initializer_range 0.2) so that greedy outputs vary from step to step.
_TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.2,
}  # fmt: skip
# test decoder -> (its engine family, `prefixcap.engine.families`, which names its transformers class;
# its tiny config; its full-size config: the shapes of a hub model). An engine family without an
# entry here is built with the tiny shape alone.
_DECODERS = {
    "llama": ("llama", {
        "tie_word_embeddings": False, "rope_theta": 10000.0,  # the llama3 scaling acts on 16-d heads at 32
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
    }, {  # Llama 3.2 1B
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    }),
    "smollm2": ("llama", {"tie_word_embeddings": True, "rope_theta": 100000.0}, {
        # SmolLM2 135M
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    }),
    "qwen2": ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1000000.0}, {
        # Qwen2.5 0.5B (q/k/v biases: always, in Qwen2)
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    }),
    "qwen3": ("qwen3", {
        "head_dim": 24, "tie_word_embeddings": False, "rope_theta": 1000000.0,  # head_dim != 64 / 4
    }, {  # Qwen3 0.6B
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
        "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    }),
    "mistral": ("mistral", {
        "tie_word_embeddings": False, "sliding_window": 64,  # half the positions: decodes past it use HF
    }, None),  # no full size: Mistral's smallest model has 7B parameters
}  # fmt: skip
DECODER_FAMILIES = (*ENGINE_FAMILIES, *(name for name in _DECODERS if name not in ENGINE_FAMILIES))


def build_decoder(
    out_dir: str | Path,
    family: str,
    *,
    full_size: bool = False,
    seed: int = 0,
    num_layers: int | None = None,
    **config_overrides: Any,
) -> Path:
    """A random-weight causal LM of `family` (one of `DECODER_FAMILIES`) with the tiny BPE
    tokenizer (`build_tokenizer`), EOS and BOS set to its end-of-text token.

    Tiny by default; `full_size` takes the shapes of GPT-2 124M, Llama 3.2 1B ("llama"), SmolLM2
    135M, Qwen2.5 0.5B or Qwen3 0.6B, vocabulary size included (the tokenizer stays tiny: speed
    depends on the model's shapes only). `num_layers` overrides the layer count of a Llama-family
    decoder (a shallower full-size model for quicker benchmarks). `config_overrides` go to the
    config last (e.g. a narrower `initializer_range` for a model that is to learn)."""
    import transformers

    if family not in DECODER_FAMILIES:
        raise ValueError(f"unknown decoder family {family!r}: choose one of {', '.join(DECODER_FAMILIES)}")
    if family == "gpt2":
        if num_layers is not None:
            raise ValueError("num_layers applies to Llama-family decoders, not gpt2")
        return build_gpt2(out_dir, full_size=full_size, seed=seed)
    engine_family, tiny, full = _DECODERS.get(family, (family, {}, None))
    if full_size and full is None:
        raise ValueError(f"there is no full-size {family} decoder: its smallest model is too large to benchmark")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(out_dir)
    shape = full if full_size else {**_TINY, **tiny, "vocab_size": len(tokenizer)}
    if num_layers is not None:
        shape = {**shape, "num_hidden_layers": num_layers}
    eos = tokenizer.eos_token_id
    model_class = getattr(transformers, ENGINE_FAMILIES[engine_family].model_class)
    config = model_class.config_class(**{**shape, **config_overrides}, bos_token_id=eos, eos_token_id=eos)
    model_class(config).save_pretrained(out_dir)
    return Path(out_dir)


# ---------------------------------------------------------------------- a model whose captions depend on the image
# Plain colours and the caption each one is taught: a different colour word and background per image.
COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "white": (255, 255, 255), "black": (0, 0, 0), "orange": (255, 128, 0), "purple": (128, 0, 128),
}  # fmt: skip


def colour_captions() -> dict[str, str]:
    """The caption `build_image_dependent_model` teaches for each colour of `COLOURS`."""
    names = list(COLOURS)
    return {name: f"a {name} shape on a {names[(i + 3) % len(names)]} background." for i, name in enumerate(names)}


def colour_image(name: str, size: int = 32) -> Any:
    """A `size` x `size` RGB numpy image of one colour of `COLOURS`."""
    import numpy as np

    return np.full((size, size, 3), COLOURS[name], dtype=np.uint8)


def build_image_dependent_model(out_dir: str | Path, *, components: tuple[Path, Path] | None = None) -> Path:
    """A tiny saved CaptionModel (MLP mapper, K=4) whose captions depend on the image: it is taught,
    in about a second on a CPU, to caption each plain colour of `COLOURS` with its own sentence
    (`colour_captions`), so photos too get captions that follow their colours. Untrained tiny models
    say the same thing about every image, which would hide captions going to the wrong image.
    `components` are (clip_dir, gpt2_dir) from `build_components` (built under `out_dir` if None)."""
    from prefixcap.model.caption_model import CaptionModel

    out_dir = Path(out_dir)
    clip_dir, gpt2_dir = components or build_components(out_dir.parent / f"{out_dir.name}-components")
    torch.manual_seed(0)
    model = CaptionModel.from_components(clip_dir, gpt2_dir, mapper="mlp", prefix_length=4)
    captions = colour_captions()
    pixels = torch.stack([torch.from_numpy(colour_image(name)).permute(2, 0, 1) for name in captions])
    tokenizer = model.tokenizer
    token_ids = [tokenizer.encode(text) + [tokenizer.eos_token_id] for text in captions.values()]
    width = max(map(len, token_ids))
    input_ids = torch.full((len(token_ids), width), tokenizer.pad_token_id)
    labels = torch.full((len(token_ids), width), -100)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = labels[row, : len(ids)] = torch.tensor(ids)
    image_embeds = model.encode_pixels(pixels)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels,
                     image_embeds=image_embeds).loss  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------- models that learn the synthetic captions
def build_learnable_components(root: str | Path) -> tuple[Path, Path]:
    """(clip_dir, gpt2_dir) under `root`: tiny models that learn the synthetic captions
    (`prefixcap synth`) within a minute on a CPU, for `prefixcap demo` and the learning tests. A
    random CLIP with 64-d features (a linear probe separates the colour pairs; the 24-d
    `build_clip`'s reaches ~90%), saved with its text tower and tokenizer so that CLIPScore runs
    with it, and a 64-d GPT-2 without dropout."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, GPT2Config, GPT2LMHeadModel

    root = Path(root)
    torch.manual_seed(0)
    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {**tower, "vocab_size": 400, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 0}
    clip_config = CLIPConfig(
        text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=64
    )
    CLIPModel(clip_config).save_pretrained(root / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )
    build_clip_tokenizer(root / "clip")
    tokenizer = build_tokenizer(root / "gpt2")
    gpt2_config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(gpt2_config).save_pretrained(root / "gpt2")
    return root / "clip", root / "gpt2"


def align_clip(clip_dir: str | Path, images: list[str | Path], captions: list[str], *, steps: int = 300) -> Path:
    """Teach a tiny random CLIP (`build_learnable_components`'s) that each image goes with its
    caption, as a real CLIP's pretraining does at scale: its two projections learn, by CLIP's
    contrastive loss over the distinct captions, while the towers stay as they are. Saved in place.
    Retrieval needs this: a random CLIP's image and text embeddings do not share a space."""
    from transformers import AutoTokenizer, CLIPModel

    from prefixcap.inputs.preprocess import ImagePreprocessor
    from prefixcap.model.encoders import load_image_processor

    torch.manual_seed(0)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    preprocessor = ImagePreprocessor(load_image_processor(clip_dir))
    texts = sorted(set(captions))
    with torch.no_grad():
        pixels = torch.stack([preprocessor.load_pixels(path) for path in images])
        vision = model.vision_model(pixel_values=preprocessor.normalize(pixels)).pooler_output
        tokens = AutoTokenizer.from_pretrained(clip_dir)(texts, padding=True, truncation=True, return_tensors="pt")
        text = model.text_model(**tokens).pooler_output
    targets = torch.tensor([texts.index(caption) for caption in captions])
    projections = [model.visual_projection.weight, model.text_projection.weight]
    optimizer = torch.optim.Adam(projections, lr=1e-2)
    for _ in range(steps):
        image_embeds = torch.nn.functional.normalize(vision @ projections[0].T, dim=-1)
        text_embeds = torch.nn.functional.normalize(text @ projections[1].T, dim=-1)
        loss = torch.nn.functional.cross_entropy(20 * image_embeds @ text_embeds.T, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(clip_dir)
    return Path(clip_dir)
