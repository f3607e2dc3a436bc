"""Labelling images with a teacher, to train a fast prefixcap student on its captions.

`prefixcap label IMAGES --teacher SPEC --out DATASET` asks a large model, a local Hugging Face
VLM (`teachers`, `hf`) or any OpenAI-compatible endpoint (`endpoint`), about each image with a
prompt (`prompts`), and writes its answers as a caption dataset that `prepare` and `train` read
(`outputs`), resumable and with failures listed (`job`).
"""

from prefixcap.labeling.job import LabelPlan, LabelSummary, run_label_job
from prefixcap.labeling.outputs import OUTPUT_FORMATS, Label, open_dataset
from prefixcap.labeling.prompts import PRESETS, PromptTemplate
from prefixcap.labeling.teachers import KINDS, Failure, LabelItem, Teacher, TeacherOptions, load_teacher

__all__ = [
    "KINDS",
    "OUTPUT_FORMATS",
    "PRESETS",
    "Failure",
    "Label",
    "LabelItem",
    "LabelPlan",
    "LabelSummary",
    "PromptTemplate",
    "Teacher",
    "TeacherOptions",
    "load_teacher",
    "open_dataset",
    "run_label_job",
]
