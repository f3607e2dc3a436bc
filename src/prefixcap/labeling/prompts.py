"""What a teacher is asked about each image: a named preset or a template of the user's, with
per-image substitutions.

Templates use Python's `{field}` syntax with three fields only ({{ and }} for literal braces):
`{name}` the image's file name without extension, `{folder}` the name of the folder holding it,
`{existing}` the text of the caption file beside it (`photo.txt` for `photo.jpg`, empty when there
is none), so that a teacher can refine captions a dataset already has.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass

from prefixcap.errors import UserError
from prefixcap.jobs.sidecar import CAPTION_SUFFIX

PRESETS = {
    "short": "Describe this image in one sentence.",
    "detailed": (
        "Describe this image in detail in one paragraph of plain prose: the main subjects, their attributes "
        "and actions, the setting, the lighting and the composition. Do not start with 'The image shows'."
    ),
    "tags": (
        "List tags for this image, separated by commas: the subjects, their attributes, the setting and the "
        "style. Output only the tags."
    ),
    "sd-prompt": (
        "Write a Stable Diffusion prompt that would generate this image: comma-separated phrases for the "
        "subject, its details, the style, the lighting and the composition. Output only the prompt."
    ),
}
DEFAULT_PRESET = "short"
FIELDS = ("name", "folder", "existing")
MAX_EXISTING_BYTES = 64 * 1024  # a caption file larger than this is not a caption


@dataclass(frozen=True)
class PromptTemplate:
    """A checked template; `render(image)` fills it for one image reference."""

    text: str

    @classmethod
    def parse(cls, value: str | None) -> PromptTemplate:
        """A preset name or a template; any field other than FIELDS, or a format spec, conversion,
        attribute or index on one, is a UserError (the template is text, not code)."""
        text = PRESETS.get(value or DEFAULT_PRESET, value or "")
        if not text.strip():
            raise UserError("--prompt is empty; give a preset (" + ", ".join(PRESETS) + ") or a template")
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as error:
            raise UserError(f"--prompt: {error} (write {{{{ and }}}} for literal braces)") from None
        for _, field, spec, conversion in parsed:
            if field is not None and (field not in FIELDS or spec or conversion):
                raise UserError(
                    f"--prompt: unknown field {{{field}}}; a template may use {', '.join(f'{{{f}}}' for f in FIELDS)}"
                )
        return cls(text)

    @property
    def uses_existing(self) -> bool:
        return any(field == "existing" for _, field, _, _ in string.Formatter().parse(self.text))

    def render(self, image: str, *, is_file: bool) -> str:
        """The prompt for `image`: a file (`is_file`), else a reference to an image inside a dataset
        file (`shard.tar#key.jpg`, `data.parquet#row=N`), named by what follows its `#`."""
        container, _, member = (image, "", "") if is_file else image.rpartition("#")
        values = {
            "name": os.path.splitext(os.path.basename(container if is_file else member))[0],
            "folder": os.path.basename(os.path.dirname(os.path.abspath(container))),
            "existing": existing_caption(image) if self.uses_existing and is_file else "",
        }
        return self.text.format_map(values).strip()


def existing_caption(image: str) -> str:
    """The text of the caption file beside an image file (`a.txt` for `a.jpg`), on one line; empty
    when there is none, or when it is not a regular UTF-8 file of at most MAX_EXISTING_BYTES."""
    path = os.path.splitext(image)[0] + CAPTION_SUFFIX
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_EXISTING_BYTES:
            return ""
        with open(path, encoding="utf-8-sig") as file:
            return " ".join(file.read().split())
    except (OSError, UnicodeDecodeError):
        return ""
