"""Random-weight CLIP and GPT-2 models built locally, for offline tests and speed benchmarks.

They use the real transformers classes and are saved and loaded through the same
`from_pretrained` path that users take with hub ids, so tests cover the real loading code.
Speed does not depend on weight values, so the full-size variants serve the benchmarks.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from prefixcap.config import CONFIG_NAME

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


def build_full_size_model(workdir: str | Path) -> Path:
    """A saved CaptionModel with ClipCap's architecture and random weights (CLIP ViT-B/32, MLP
    mapper with K=10, GPT-2 124M), for speed benchmarks; reused when `workdir` already holds one."""
    from prefixcap.modeling import CaptionModel

    model_dir = Path(workdir) / "model"
    if not (model_dir / CONFIG_NAME).is_file():
        torch.manual_seed(0)
        clip_dir, gpt2_dir = build_components(Path(workdir) / "components", full_size=True)
        CaptionModel.from_components(clip_dir, gpt2_dir).save_pretrained(model_dir)
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
