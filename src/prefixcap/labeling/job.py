"""The label job: inputs -> teacher -> dataset, resumable, with failures listed.

Images already in the dataset are skipped before any model loads. Each label is written as it
arrives (see `labeling.outputs`), so an interrupted run loses only the requests in flight, and a
rerun continues with the images still missing, those that failed included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefixcap.errors import ImageLoadError
from prefixcap.inputs.sources import LocalPath, Source, is_shard, read_shard
from prefixcap.jobs.writers import printable
from prefixcap.labeling.outputs import Label, LabelDataset, image_key, write_failures
from prefixcap.labeling.prompts import PromptTemplate
from prefixcap.labeling.teachers import Failure, LabelItem, Teacher


@dataclass
class LabelPlan:
    """What a run does: the images to label, found lazily in shards, and how many are done already."""

    sources: Sequence[Source]
    done: set[str]
    template: PromptTemplate
    limit: int | None = None
    skipped: int = 0  # images labelled by an earlier run, counted as the items are made
    total: int | None = None  # images to label, when known without reading shards

    def __post_init__(self) -> None:
        if not any(map(is_shard, self.sources)):
            todo = sum(image_key(source, isinstance(source, LocalPath)) not in self.done for source in self.sources)
            self.total = todo if self.limit is None else min(todo, self.limit)

    def items(self) -> Iterator[LabelItem | tuple[str, Failure]]:
        """The items to label in input order; (image, Failure) for a shard's sample without an
        image, and for a shard that cannot be read."""
        made = 0
        for source in self.sources:
            for item in self._source_items(source):
                if isinstance(item, LabelItem) and image_key(item.image, item.is_file) in self.done:
                    self.skipped += 1
                    continue
                if self.limit is not None and made >= self.limit:
                    return
                made += isinstance(item, LabelItem)
                yield item

    def _source_items(self, source: Source) -> Iterator[LabelItem | tuple[str, Failure]]:
        if not is_shard(source):
            is_file = isinstance(source, LocalPath)  # else an image inside a Parquet file
            yield LabelItem(source, self.template.render(source, is_file=is_file), is_file=is_file)
            return
        try:
            for name, data in read_shard(source):
                if isinstance(data, bytes):
                    yield LabelItem(name, self.template.render(name, is_file=False), is_file=False, data=data)
                else:
                    yield name, Failure(data)
        except ImageLoadError as error:
            yield str(source), Failure(error.reason)


@dataclass
class LabelSummary:
    labelled: int = 0
    skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.labelled / self.seconds if self.seconds else 0.0
        return (
            f"{self.labelled} labelled, {self.skipped} skipped (labelled before), {len(self.failures)} failed "
            f"in {self.seconds:.1f} s ({rate:.2f} images/s)"
        )


def run_label_job(
    plan: LabelPlan,
    teacher: Teacher,
    dataset: LabelDataset,
    *,
    progress: Any = None,
    on_failure: Callable[[str, Failure], None] | None = None,
) -> LabelSummary:
    """Label every item of `plan` with `teacher` into `dataset`. The dataset is closed and the
    failures are written even when the run is interrupted or stopped by an error."""
    summary = LabelSummary()
    start = time.perf_counter()

    def items() -> Iterator[LabelItem]:
        for item in plan.items():
            if isinstance(item, LabelItem):
                yield item
            else:
                fail(*item)

    def fail(image: str, failure: Failure) -> None:
        summary.failures.append({"image": printable(image), "error": failure.reason, "attempts": failure.attempts})
        if on_failure is not None:
            on_failure(image, failure)

    dataset.open()
    try:
        for item, outcome in teacher.label(items()):
            if isinstance(outcome, Failure):
                fail(item.image, outcome)
            else:
                dataset.add(Label(item.image, item.is_file, outcome, teacher.description, item.instruction))
                summary.labelled += 1
            if progress is not None:
                progress.update(1)
    finally:
        dataset.close()
        write_failures(dataset.failures_path, summary.failures)
        summary.skipped = plan.skipped
        summary.seconds = time.perf_counter() - start
    return summary
