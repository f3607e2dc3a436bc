"""A teacher that runs a Hugging Face image-text-to-text model locally (`hf:FOLDER_OR_HUB_ID`):
SmolVLM / Idefics3, Qwen2-VL, LLaVA and the other models `AutoModelForImageTextToText` loads,
and encoder-decoders such as Florence-2.

Images are labelled in batches: each gets the processor's chat template (a user turn holding the
image and the prompt) when the processor has one, else the prompt as it is (Florence-2's task
prompts), and the batch is padded on the left so that every row continues from its last token.
Code from the model's repository runs only with `trust_remote_code`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from prefixcap.errors import ImageLoadError, ModelLoadError
from prefixcap.inputs.loader import chunked
from prefixcap.labeling.teachers import Failure, LabelItem, Outcome, TeacherOptions
from prefixcap.system.hardware import auto_dtype, default_device

DEFAULT_MAX_NEW_TOKENS = 256
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTeacher:
    def __init__(self, target: str, model: Any, processor: Any, options: TeacherOptions, precision: str):
        self.description = f"hf:{target}"
        self.model, self.processor, self.options = model, processor, options
        self.precision = precision  # what --dtype auto chose, and why
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not getattr(model.config, "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # batched generation continues every row from its last token

    @classmethod
    def from_spec(cls, target: str, options: TeacherOptions, *, dry_run: bool = False) -> HFTeacher:
        if dry_run:
            return cls(target, None, None, options, "")  # type: ignore[arg-type]
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        device = torch.device(options.device) if options.device else default_device()
        if options.dtype == "auto":
            dtype, why = auto_dtype(device)
            precision = f"{str(dtype).removeprefix('torch.')} ({why})"
        else:
            dtype, precision = _DTYPES[options.dtype], options.dtype
        remote = options.trust_remote_code
        try:
            processor = AutoProcessor.from_pretrained(target, trust_remote_code=remote)
            try:
                model = AutoModelForImageTextToText.from_pretrained(target, dtype=dtype, trust_remote_code=remote)
            except ValueError:
                if not remote:
                    raise
                model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, trust_remote_code=True)  # Florence-2
        except (OSError, ValueError, KeyError) as error:
            reason = " ".join(str(error).split())[:400]
            hint = (
                "" if remote else "; if its repository ships its own code, add --trust-remote-code (it runs that code)"
            )
            raise ModelLoadError(
                f"cannot load the teacher {target!r} as an image-text-to-text model ({reason}){hint}"
            ) from None
        return cls(target, model.to(device).eval(), processor, options, precision)

    def preview(self, item: LabelItem) -> str:
        return f"{self.description}: the image, then the prompt {item.instruction!r}"

    def estimate(self, count: int) -> str:
        batches = -(-count // self.options.batch_size)
        return f"{count:,} images in {batches:,} batches of up to {self.options.batch_size} on the local model"

    def close(self) -> None:
        self.model = None

    def label(self, items: Iterable[LabelItem]) -> Iterator[tuple[LabelItem, Outcome]]:
        for batch in chunked(items, self.options.batch_size):
            ready, images = [], []
            for item in batch:
                try:
                    images.append(item.load())
                    ready.append(item)
                except ImageLoadError as error:
                    yield item, Failure(error.reason)
            if ready:
                yield from self._label_loaded(ready, images)

    def _label_loaded(self, items: list[LabelItem], images: list[Any]) -> Iterator[tuple[LabelItem, Outcome]]:
        """A batch that fails (an image the processor refuses, memory) is retried image by image,
        so that only the images that fail alone get failure records."""
        try:
            captions: list[Outcome] = list(self._generate(items, images))
        except (ValueError, RuntimeError) as error:
            if len(items) > 1:
                for item, image in zip(items, images):
                    yield from self._label_loaded([item], [image])
                return
            captions = [Failure(f"the teacher failed ({type(error).__name__}: {' '.join(str(error).split())[:300]})")]
        for item, caption in zip(items, captions, strict=True):
            yield item, caption or Failure("the teacher answered with empty text")

    @torch.inference_mode()
    def _generate(self, items: list[LabelItem], images: list[Any]) -> list[str]:
        processor, model = self.processor, self.model
        texts = [self._text(item.instruction) for item in items]
        inputs = processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt")
        inputs = inputs.to(model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        sampling = self.options.temperature > 0
        tokenizer = getattr(processor, "tokenizer", processor)
        output = model.generate(
            **inputs,
            max_new_tokens=self.options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            do_sample=sampling,
            **({"temperature": self.options.temperature} if sampling else {}),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        if not getattr(model.config, "is_encoder_decoder", False):
            output = output[:, inputs["input_ids"].shape[1] :]  # only what the model added
        return [" ".join(text.split()) for text in processor.batch_decode(output, skip_special_tokens=True)]

    def _text(self, instruction: str) -> str:
        """A user turn holding the image and the prompt, in the model's chat template; the bare
        prompt for models without one."""
        if not getattr(self.processor, "chat_template", None):
            return instruction
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)
