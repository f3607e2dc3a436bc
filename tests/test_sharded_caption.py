"""Sharded captioning: the work plan, WebDataset input, folder output, and 2-process jobs that must
give exactly the single-process results, also after one process is killed and the job rerun."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from prefixcap.captioner import Captioner
from prefixcap.cli import main
from prefixcap.inputs.loader import ImageLoader
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.inputs.sources import read_shard
from prefixcap.jobs.plan import plan_parts
from prefixcap.jobs.writers import Result
from prefixcap.pipeline.loop import in_order
from tests.helpers_pipeline import prefixcap_command, subprocess_env

CAPTION = ["caption", "--max-new-tokens", "5", "--batch-size", "2"]


def make_image(seed: int) -> Image.Image:
    """A small image whose colours and width depend on `seed`, so that images differ."""
    colour = ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256)
    image = Image.new("RGB", (40 + seed, 36), colour)
    ImageDraw.Draw(image).ellipse((4, 4, 24, 30), fill=(255 - colour[0], colour[2], 90))
    return image


def save_image(path: Path, seed: int) -> Path:
    make_image(seed).save(path)
    return path


def make_shard(path: Path, seeds: list[int], *, with_text_only_sample: bool = False) -> Path:
    """A WebDataset shard of `key.png` + `key.txt` samples."""
    with wds.TarWriter(str(path)) as writer:
        for seed in seeds:
            data = io.BytesIO()
            make_image(seed).save(data, "PNG")
            writer.write({"__key__": f"sample{seed:03d}", "png": data.getvalue(), "txt": "a photo"})
        if with_text_only_sample:
            writer.write({"__key__": "textonly", "txt": "no image here"})
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A folder of 10 images and a broken one, and two shards (one with a sample lacking an image)."""
    root = tmp_path_factory.mktemp("sharded")
    folder = root / "photos"
    folder.mkdir()
    for seed in range(10):
        save_image(folder / f"img{seed:02d}.jpg", seed)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    shards = [
        make_shard(root / "shard-000.tar", [1, 2, 3], with_text_only_sample=True),
        make_shard(root / "shard-001.tar", [4, 5]),
    ]
    return {"folder": folder, "shards": shards}


def launch(log: Path, *args, processes: int = 2) -> subprocess.Popen:
    """`accelerate launch` with CPU processes, its stderr going to `log` (a pipe nobody reads
    could fill up and stall the job)."""
    with open(log, "w") as stderr:
        command = prefixcap_command(*args, processes=processes)
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=subprocess_env())


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ---------------------------------------------------------------------- the plan
def test_plan_cuts_files_into_parts_and_keeps_each_shard_whole():
    sources = ["a.jpg", "b.jpg", "c.jpg", "s1.tar", "pipe:cat s2.tar", "d.jpg", "e.jpg", "f.jpg", "g.jpg"]
    parts = plan_parts(sources, part_size=2, settings={"model": "m"})
    assert [part.sources for part in parts] == [
        ("a.jpg", "b.jpg"), ("c.jpg",), ("s1.tar",), ("pipe:cat s2.tar",), ("d.jpg", "e.jpg"), ("f.jpg", "g.jpg"),
    ]  # fmt: skip
    assert [part.is_shard for part in parts] == [False, False, True, True, False, False]
    assert [part.index for part in parts] == list(range(6))
    # Names are stable, unique, and change with the settings or the images of the part.
    assert [p.filename for p in plan_parts(sources, part_size=2, settings={"model": "m"})] == [
        p.filename for p in parts
    ]
    assert len({part.filename for part in parts}) == 6
    other = plan_parts(sources, part_size=2, settings={"model": "other"})
    assert not {p.filename for p in other} & {p.filename for p in parts}
    changed = plan_parts(["a.jpg", "x.jpg", *sources[2:]], part_size=2, settings={"model": "m"})
    assert [p.filename == q.filename for p, q in zip(changed, parts)] == [False, True, True, True, True, True]


# ---------------------------------------------------------------------- WebDataset input
def test_read_shard_from_a_file_and_a_pipe(inputs):
    shard = str(inputs["shards"][0])
    for spec in (shard, f"pipe:cat {shard}"):
        items = list(read_shard(spec))
        assert [name for name, _ in items] == [
            f"{spec}#sample001.png",
            f"{spec}#sample002.png",
            f"{spec}#sample003.png",
            f"{spec}#textonly",
        ]
        assert [Image.open(io.BytesIO(data)).size for _, data in items[:3]] == [(41, 36), (42, 36), (43, 36)]
        assert items[3][1] == "no image in this sample (has: txt)"


def test_unreadable_shards_become_error_records(tiny_model_dir, inputs, tmp_path):
    with tarfile.open(inputs["shards"][0]) as tar:
        cut = tar.getmember("sample003.png").offset_data + 10  # inside the third image
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(inputs["shards"][0].read_bytes()[:cut])
    captioner = Captioner.from_pretrained(tiny_model_dir)
    specs = [str(truncated), f"pipe:cat {tmp_path / 'missing.tar'}", str(inputs["shards"][1])]
    parts = plan_parts(specs, part_size=10)
    units = captioner.caption_units([part.sources for part in parts], batch_size=2, workers=2, max_new_tokens=3)
    results = [Result.of(path, outcome) for path, outcome in in_order(units)]
    errors = {result.path: result.error for result in results if result.error}
    assert results[0].path == f"{truncated}#sample001.png" and results[0].captions  # complete before the damage
    assert errors[str(truncated)] == "cannot read this shard (ReadError: unexpected end of data)"
    assert errors[specs[1]] == "cannot read this shard (the command exited with status 1)"
    assert [result.path for result in results[-2:]] == [f"{specs[2]}#sample004.png", f"{specs[2]}#sample005.png"]
    assert all(result.captions for result in results[-2:])


def test_workers_deliver_whole_parts_in_batches_that_never_mix_parts(tiny_model_dir, inputs):
    captioner = Captioner.from_pretrained(tiny_model_dir)
    images = sorted(str(path) for path in inputs["folder"].glob("img*.jpg"))
    parts = plan_parts(images, part_size=3)
    loader = ImageLoader(captioner.model.preprocessor)
    seen: dict[int, list[str]] = {}  # part -> its images, in the order they arrived
    finished: set[int] = set()
    for batch in loader.batches([part.sources for part in parts], batch_size=2, workers=2, processes=True):
        assert batch.unit not in finished, "a batch arrived after its part's last batch"
        assert batch.pixels.shape[0] == len(batch.keys) <= 2
        seen.setdefault(batch.unit, []).extend(batch.keys)
        if batch.last:
            finished.add(batch.unit)
    assert finished == {part.index for part in parts}
    assert [seen[part.index] for part in parts] == [list(part.sources) for part in parts]


def test_captioner_jpeg_draft_reaches_the_decoding_workers(tiny_model_dir, inputs, monkeypatch):
    requested = []
    load_pixels = ImagePreprocessor.load_pixels

    def recording(self, source, **kwargs):
        requested.append(kwargs["jpeg_draft"])
        return load_pixels(self, source, **kwargs)

    monkeypatch.setattr(ImagePreprocessor, "load_pixels", recording)  # in-process workers (0) see it
    images = sorted(str(path) for path in inputs["folder"].glob("img*.jpg"))[:2]
    for jpeg_draft in (False, True):
        captioner = Captioner.from_pretrained(tiny_model_dir, jpeg_draft=jpeg_draft)
        parts = plan_parts(images, part_size=2)
        results = captioner.caption_units([part.sources for part in parts], batch_size=2, workers=0, max_new_tokens=2)
        assert sum(len(part_results) for _, part_results in results) == 2
    assert requested == [False, False, True, True]


# ---------------------------------------------------------------------- folder output, one process
def test_folder_output_equals_a_plain_run_in_every_format(tiny_model_dir, inputs, tmp_path):
    import pyarrow.parquet as pq

    sources = [str(inputs["folder"]), *map(str, inputs["shards"]), str(tmp_path / "nothing.jpg")]
    common = [*CAPTION, "--model", str(tiny_model_dir), *sources]
    assert main([*common, "--format", "jsonl", "--output", str(tmp_path / "plain.jsonl")]) == 1
    plain = read_lines(tmp_path / "plain.jsonl")
    assert main([*common, "--output", f"{tmp_path / 'out'}/", "--part-size", "4"]) == 0
    assert read_lines(tmp_path / "out" / "captions.jsonl") == plain
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["images"], summary["captioned"], summary["failed"]) == (len(plain) + 2, len(plain), 2)
    assert {f["path"] for f in summary["failures"]} == {
        str(tmp_path / "nothing.jpg"), str(inputs["folder"] / "broken.jpg"), f"{inputs['shards'][0]}#textonly",
    }  # fmt: skip
    # The parts are reused: another format is a merge only.
    assert main([*common, "--output", str(tmp_path / "out"), "--part-size", "4", "--format", "parquet"]) == 0
    table = pq.read_table(tmp_path / "out" / "captions.parquet").to_pylist()
    assert [json.dumps(row) for row in table] == plain
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["parts_reused"] == summary["parts"]


def test_parquet_needs_an_output(tiny_model_dir, inputs, capsys):
    assert main([*CAPTION, "--model", str(tiny_model_dir), str(inputs["folder"]), "--format", "parquet"]) == 2
    assert capsys.readouterr().err.strip() == "error: parquet output needs --output FILE or --output FOLDER/"


# ---------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_give_the_single_process_results(tiny_model_dir, inputs, tmp_path):
    shards = [str(inputs["shards"][0]), f"pipe:cat {inputs['shards'][1]}"]
    common = [*CAPTION, "--model", tiny_model_dir, inputs["folder"], *shards]
    assert main([*map(str, common), "--format", "jsonl", "--output", str(tmp_path / "one.jsonl")]) == 1
    log = tmp_path / "launch.log"
    job = launch(log, *common, "--output", tmp_path / "out", "--part-size", "3", "--workers", "2")
    assert job.wait(timeout=240) == 0, log.read_text()
    stderr = log.read_text()
    lines = read_lines(tmp_path / "out" / "captions.jsonl")
    assert lines == read_lines(tmp_path / "one.jsonl")
    paths = [json.loads(line)["path"] for line in lines]
    assert len(paths) == len(set(paths)) == 10 + 3 + 2
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["parts"] == len(
        list((tmp_path / "out" / "parts").glob("part-*.jsonl"))
    )
    assert "rank 0: " in stderr and "rank 1: " in stderr  # both processes did work


@pytest.mark.slow
def test_resume_after_one_process_is_killed(tiny_model_dir, tmp_path):
    """Rank 1 owns parts 1, 3 and 5. Part 3 is a `pipe:` shard whose command waits for a file that
    does not exist yet: rank 1 is then certainly stuck halfway, with part 1 written, when the test
    kills it. (Local files cannot stall a reader: a FIFO is refused unopened.)"""
    images = [save_image(tmp_path / f"img{i:02d}.jpg", i) for i in range(12)]
    shard, go = make_shard(tmp_path / "late.tar", [12]), tmp_path / "go"
    stalled = f"pipe:while [ ! -e {go} ]; do sleep 0.05; done; cat {shard}"
    out, parts = tmp_path / "out", tmp_path / "out" / "parts"
    common = [*CAPTION, "--model", tiny_model_dir, *images[:6], stalled, *images[6:]]
    sharded = [*common, "--output", out, "--part-size", "2", "--workers", "0"]
    log = tmp_path / "launch.log"
    job, family = launch(log, *sharded), []
    try:
        part_1 = _wait_for(lambda: list(parts.glob("part-000001-*.jsonl")), job, log)
        family = psutil.Process(job.pid).children(recursive=True)
        next(p for p in family if p.environ().get("RANK") == "1" and "prefixcap" in p.cmdline()).kill()
        job.wait(timeout=120)
    finally:  # nothing left behind; only processes this test started (the waiting command ends with `go`)
        go.touch()
        if job.poll() is None:
            job.kill()
        for process in family:
            if process.is_running():
                process.kill()
    assert job.returncode != 0 and not (out / "captions.jsonl").exists()
    finished = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in parts.glob("part-*.jsonl")}
    assert part_1[0] in finished and not list(parts.glob("part-000003-*.jsonl"))

    assert main([*map(str, common), "--format", "jsonl", "--output", str(tmp_path / "one.jsonl")]) == 0
    job = launch(log, *sharded)
    assert job.wait(timeout=240) == 0, log.read_text()
    lines = read_lines(out / "captions.jsonl")
    assert lines == read_lines(tmp_path / "one.jsonl")
    assert len({json.loads(line)["path"] for line in lines}) == len(lines) == 13
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in finished} == finished  # not redone
    assert json.loads((out / "summary.json").read_text())["parts_reused"] == len(finished)


def _wait_for(condition, job: subprocess.Popen, log: Path, timeout: float = 180):
    """Poll `condition` until it returns something true; fail if the job ends first."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if job.poll() is not None:
            pytest.fail(f"the job ended early:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.05)
    return found
