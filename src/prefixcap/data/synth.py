"""A synthetic caption dataset whose captions follow from the pixels, for tests and set-up checks.

Each image is one filled shape on a plain background, captioned "a red shape on a white
background". Only the two colours are named: a randomly initialised CLIP, as used by the tiny test
models, separates global colours almost perfectly but hardly sees shape or position (a linear
probe on its features reaches >= 99% on the colour pair and 60-66% on shape). A model that learned
anything therefore captions held-out images exactly, and one that did not, cannot.

The `two-balls` task checks prompt conditioning: each image holds two balls, one in each half
(from disjoint palettes, see BALL_COLORS), and its record's prompt, "left:" or "right:", says which
to describe ("a red ball"). Only a model that reads the prompt can be right more than about half
the time.

The `wordings` task is one where self-critical training (`train --objective scst`) visibly helps.
The images are the `shapes` ones, but each has REFERENCES_PER_IMAGE references, each drawn from
WORDINGS: the short "a red shape" (40%) or one of three longer wordings that also name the
background (20% each). Cross-entropy learns these frequencies, so greedy decoding starts with the
likeliest first word, "a", and says the short, hedged caption; but most references name the
background, and CIDEr-D prefers the longer consensus (about 5.5 against 4.5 per image). SCST with
the CIDEr-D reward learns it, and held-out CIDEr-D rises.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from prefixcap.system.atomic import write_atomic

# Object and background palettes are disjoint, so each caption names an unambiguous pixel pair.
OBJECT_COLORS = {
    "red": (220, 20, 20),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 0),
}
BACKGROUND_COLORS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "pink": (255, 182, 193),
}
# Smallest bounding-box side (fraction of the image side) at which each shape covers >= 1/4 of the
# image: square s^2, circle pi/4 s^2, triangle s^2/2. Large objects keep colour the dominant feature.
_SHAPE_MIN_SIDE = {"square": 0.52, "circle": 0.6, "triangle": 0.74}  # with a margin for rasterising
_MAX_SIDE = 0.9
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}  # the rest is train
TASKS = ("shapes", "two-balls", "wordings")
# `wordings`: (probability, template) of each reference; only the short one leaves out the background.
WORDINGS = (
    (0.4, "a {obj} shape"),
    (0.2, "{obj} shape on a {bg} background"),
    (0.2, "the {obj} shape is on a {bg} background"),
    (0.2, "there is a {obj} shape on a {bg} background"),
)
REFERENCES_PER_IMAGE = 5
# Each side has its own palette: the tiny random CLIPs of the tests see an image's colours but hardly
# where they are, so this keeps both balls identifiable, and only the prompt says which to describe.
BALL_COLORS = {"left": ("red", "yellow", "purple"), "right": ("green", "blue", "orange")}
SIDES = ("left", "right")
MIN_NUM_IMAGES = len(SPLIT_FRACTIONS) + 1  # one image per split at least
MIN_IMAGE_SIZE = 16
CAPTIONS_FILE = "captions.jsonl"


def caption_for(object_color: str, background_color: str) -> str:
    return f"a {object_color} shape on a {background_color} background"


def make_synthetic_dataset(
    out_dir: str | Path,
    *,
    num_images: int = 600,
    seed: int = 0,
    image_size: int = 64,
    task: str = "shapes",
    pairs: Sequence[tuple[str, str]] | None = None,
) -> Path:
    """Write `num_images` PNGs under `out_dir/images/` and `out_dir/captions.jsonl`; return the latter.

    Every colour pair (and, for `two-balls`, side) appears about equally often, in shuffled order;
    the first 80% of the images are train, then 10% val and 10% test. The same arguments always
    give the same files. `pairs` (shapes and wordings) chooses the (object, background) colour
    pairs, from either palette: a domain of its own, e.g. for retrieval's domain-transfer test.
    """
    if num_images < MIN_NUM_IMAGES:
        raise ValueError(f"num_images must be at least {MIN_NUM_IMAGES}, one per split")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(seed)
    palette = {**OBJECT_COLORS, **BACKGROUND_COLORS}
    unknown = [name for pair in pairs or () for name in pair if name not in palette]
    if unknown or (pairs is not None and (task == "two-balls" or not pairs)):
        raise ValueError(f"pairs: the shapes and wordings tasks take (object, background) names from {sorted(palette)}")
    if task in ("shapes", "wordings"):
        pairs = list(pairs or [(obj, bg) for obj in OBJECT_COLORS for bg in BACKGROUND_COLORS])
    else:  # (left colour, right colour, side the prompt asks for)
        left_colors, right_colors = BALL_COLORS["left"], BALL_COLORS["right"]
        pairs = [(left, right, side) for left in left_colors for right in right_colors for side in SIDES]
    colors = [pairs[i % len(pairs)] for i in range(num_images)]  # balanced colour pairs...
    rng.shuffle(colors)  # ...in random order, so every split sees all of them
    splits = _split_names(num_images)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(num_images - 1)))
    lines = []
    for index, pair in enumerate(tqdm(colors, desc="drawing", unit="img", disable=None)):
        name = f"images/{index:0{digits}d}.png"
        if task == "shapes":
            obj, bg = pair
            _draw(rng, image_size, palette[obj], palette[bg]).save(out_dir / name)
            record = {"image": name, "caption": caption_for(obj, bg)}
        elif task == "wordings":
            obj, bg = pair
            _draw(rng, image_size, palette[obj], palette[bg]).save(out_dir / name)
            record = {"image": name, "captions": wordings_for(rng, obj, bg)}
        else:
            left, right, side = pair
            _draw_balls(rng, image_size, OBJECT_COLORS[left], OBJECT_COLORS[right]).save(out_dir / name)
            record = {"image": name, "prompt": f"{side}:", "caption": f"a {left if side == 'left' else right} ball"}
        lines.append(json.dumps({**record, "split": splits[index]}))
    # The captions file comes last and atomically: if it exists, the whole dataset does.
    write_atomic(out_dir / CAPTIONS_FILE, "\n".join(lines) + "\n")
    return out_dir / CAPTIONS_FILE


def wordings_for(rng: random.Random, object_color: str, background_color: str) -> list[str]:
    """REFERENCES_PER_IMAGE references of one image of the `wordings` task, drawn from WORDINGS."""
    weights, templates = zip(*WORDINGS)
    chosen = rng.choices(templates, weights=weights, k=REFERENCES_PER_IMAGE)
    return [template.format(obj=object_color, bg=background_color) for template in chosen]


def _split_names(num_images: int) -> list[str]:
    counts = {split: max(1, round(num_images * fraction)) for split, fraction in SPLIT_FRACTIONS.items()}
    names = ["train"] * (num_images - sum(counts.values()))
    for split, count in counts.items():
        names += [split] * count
    return names


def _draw_balls(rng: random.Random, size: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    """A ball in each half of a white image, each filling most of its half, slightly jittered."""
    image = Image.new("RGB", (size, size), BACKGROUND_COLORS["white"])
    draw = ImageDraw.Draw(image)
    half = size / 2
    for offset, color in ((0.0, left), (half, right)):
        diameter = half * rng.uniform(0.8, 0.95)
        x = offset + rng.uniform(0, half - diameter)
        y = rng.uniform(0, size - diameter)
        draw.ellipse((x, y, x + diameter, y + diameter), fill=color)
    return image


def _draw(rng: random.Random, size: int, color: tuple[int, int, int], background: tuple[int, int, int]) -> Image.Image:
    """One shape of random kind, size and position, never smaller than a quarter of the image."""
    shape = rng.choice(sorted(_SHAPE_MIN_SIDE))
    side = round(size * rng.uniform(_SHAPE_MIN_SIDE[shape], _MAX_SIDE))
    left, top = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (left, top, left + side - 1, top + side - 1)  # PIL boxes include their last pixel
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([(left, box[3]), (box[2], box[3]), (left + (side - 1) / 2, top)], fill=color)
    return image
