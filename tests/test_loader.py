"""The one image loader: threads and processes give the same batches, in order or unit by unit, with
every failure as a structured ImageLoadError; typed names alone open shards; the server's budgeted
decode goes through it."""

from __future__ import annotations

import asyncio
import io
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from prefixcap.errors import ImageLoadError, ImageTooLargeError
from prefixcap.inputs.loader import ImageLoader, chunked, read_image
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.inputs.sources import LocalPath, RemoteShard
from prefixcap.pipeline.loop import group, in_order

PROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40 + seed, 36), ((seed * 67) % 256, (seed * 131) % 256, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def loader() -> ImageLoader:
    return ImageLoader(ImagePreprocessor(CLIPImageProcessorPil(**PROCESSOR)))


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    """Five image files, a shard (two images and a sample without one), a missing and a corrupt file."""
    files = []
    for seed in range(5):
        files.append(tmp_path / f"img{seed}.png")
        files[-1].write_bytes(png(seed))
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for seed in (10, 11):
            add_member(tar, f"s{seed}.png", png(seed))
            add_member(tar, f"s{seed}.txt", b"a caption")
        add_member(tar, "textonly.txt", b"no image here")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    sources = [*files[:2], shard, tmp_path / "missing.png", corrupt, *files[2:]]
    return {"sources": [LocalPath(source) for source in sources], "shard": shard, "files": files}


def flatten(batches) -> list[tuple[int, str, torch.Tensor | ImageLoadError]]:
    """(unit, key, pixels or failure) of every image, in the order the batches came."""
    images = []
    for batch in batches:
        pixels = iter(batch.pixels if batch.pixels is not None else [])
        for position, key in enumerate(batch.keys):
            images.append((batch.unit, key, batch.failures[position] if position in batch.failures else next(pixels)))
    return images


def test_threads_and_processes_give_the_same_images_and_failures(loader, inputs):
    units = list(group(inputs["sources"], 2))
    shard = str(inputs["shard"])
    assert units == [inputs["sources"][:2], [inputs["sources"][2]], inputs["sources"][3:5], inputs["sources"][5:7],
                     inputs["sources"][7:]]  # fmt: skip
    runs = {
        f"{'processes' if processes else 'threads'}, {workers} workers": flatten(
            loader.batches(units, batch_size=2, workers=workers, processes=processes)
        )
        for processes in (False, True)
        for workers in (0, 2)
    }
    reference = runs.pop("threads, 0 workers")
    keys = [str(key) for _, key, _ in reference]
    assert keys == [*map(str, inputs["sources"][:2]), f"{shard}#s10.png", f"{shard}#s11.png", f"{shard}#textonly",
                    *map(str, inputs["sources"][3:])]  # fmt: skip
    failures = {str(key): outcome for _, key, outcome in reference if isinstance(outcome, ImageLoadError)}
    assert {key: failure.reason for key, failure in failures.items()} == {
        f"{shard}#textonly": "no image in this sample (has: txt)",
        str(inputs["sources"][3]): "no such file",
        str(inputs["sources"][4]): failures[str(inputs["sources"][4])].reason,
    }
    assert failures[str(inputs["sources"][4])].reason.startswith(("corrupt or truncated", "not an image"))
    assert all(failure.source == key for key, failure in failures.items())
    member = read_image(f"{shard}#s10.png")  # a plain string naming a member: one image
    assert torch.equal(reference[2][2], loader.preprocessor.pixels(member))
    for name, run in runs.items():
        run = sorted(run, key=lambda image: image[0])  # worker processes interleave units, each in order
        assert [(unit, str(key)) for unit, key, _ in run] == [(unit, str(key)) for unit, key, _ in reference], name
        for (_, key, expected), (_, _, actual) in zip(reference, run):
            if isinstance(expected, ImageLoadError):
                assert type(actual) is type(expected) and str(actual) == str(expected), (name, key)
            else:
                assert actual.dtype == torch.uint8 and torch.equal(actual, expected), (name, key)


def test_threads_keep_input_order_over_a_lazy_stream(loader, inputs):
    """Many small units from a generator: batches come in unit order, at most batch_size each."""
    files = [LocalPath(path) for path in inputs["files"]] * 6
    batches = list(loader.batches(group(iter(files), 3), batch_size=2, workers=4))
    assert [batch.unit for batch in batches] == sorted(batch.unit for batch in batches)
    assert all(len(batch.keys) <= 2 and batch.pixels.shape[0] == len(batch.keys) for batch in batches)
    assert [key for batch in batches for key in batch.keys] == files
    assert [batch.last for batch in batches] == [bool(i % 2) for i in range(20)]  # units of 3: batches of 2 and 1


def test_processes_complete_every_unit_once_and_never_mix_units(loader, inputs):
    units = list(chunked([LocalPath(path) for path in inputs["files"]] * 5, 3)) + [[]]  # an empty unit too
    seen: dict[int, list[str]] = {}
    finished: list[int] = []
    for batch in loader.batches(units, batch_size=2, workers=2, processes=True):
        assert batch.unit not in finished, "a batch arrived after its unit's last batch"
        assert len(batch.keys) <= 2
        seen.setdefault(batch.unit, []).extend(batch.keys)
        if batch.last:
            finished.append(batch.unit)
    assert sorted(finished) == list(range(len(units)))
    assert [seen[index] for index in range(len(units))] == units
    completed = [(unit, seen[unit]) for unit in finished]
    assert list(in_order(completed)) == [key for unit in units for key in unit]


def test_image_load_errors_keep_their_fields_through_pickle():
    for failure in (ImageLoadError("a.jpg", "no such file"), ImageTooLargeError("b.png", "too many pixels")):
        copy = pickle.loads(pickle.dumps(failure))
        assert type(copy) is type(failure) and (copy.source, copy.reason) == (failure.source, failure.reason)
        assert str(copy) == str(failure) == f"{failure.source}: {failure.reason}"


def test_plain_strings_are_single_images_never_shards_or_commands(loader, inputs, tmp_path, monkeypatch):
    """Names read from datasets (plain strings) are files or shard members; only typed names stream
    a shard, and only a RemoteShard reaches webdataset's URL and pipe openers."""
    monkeypatch.chdir(tmp_path)
    shard = str(inputs["shard"])
    plain = ["pipe:touch PWNED", shard, f"{shard}#s11.png"]
    (batch,) = loader.batches([plain], batch_size=4, workers=0)
    assert batch.keys == plain and list(batch.failures) == [0, 1] and batch.pixels.shape[0] == 1
    assert batch.failures[0].reason == "no such file"
    assert batch.failures[1].reason == "not an image, or an unsupported format"
    assert not (tmp_path / "PWNED").exists()
    (streamed,) = loader.batches([[RemoteShard(f"pipe:cat {shard}")]], batch_size=4, workers=0)
    assert streamed.keys[1] == f"pipe:cat {shard}#s11.png" and torch.equal(streamed.pixels[1], batch.pixels[0])


def test_image_processor_refusals_are_load_errors(loader, inputs, monkeypatch):
    def refuse(self, image):
        raise ValueError("unsupported channel layout")

    monkeypatch.setattr(ImagePreprocessor, "pixels", refuse)
    with pytest.raises(ImageLoadError) as refused:
        loader.load(inputs["files"][0].read_bytes(), "upload.png")
    assert (refused.value.source, refused.value.reason) == (
        "upload.png",
        "cannot preprocess (unsupported channel layout)",
    )
    assert isinstance(loader.try_load(inputs["files"][0]), ImageLoadError)


def test_the_servers_budgeted_decode_loads_through_the_loader(loader, inputs):
    """The server's async path: its decoder reads the header, waits for the memory budget, then calls
    `ImageLoader.load` in a worker thread; load failures become 400 answers with the same message."""
    pytest.importorskip("fastapi")
    from prefixcap.serving.errors import APIError
    from prefixcap.serving.image_decoding import ImageDecoder

    data = inputs["files"][0].read_bytes()
    small = ImageLoader(loader.preprocessor, max_pixels=1000)

    async def decode(image_loader: ImageLoader, name: str, image: bytes):
        decoder = ImageDecoder(SimpleNamespace(loader=image_loader), memory_bytes=2**30, workers=2)
        decoder.start()
        try:
            return await decoder.pixels(name, image)
        except APIError as error:
            return error
        finally:
            await decoder.stop()

    assert torch.equal(asyncio.run(decode(loader, "a.png", data)), loader.load(data))
    corrupt = asyncio.run(decode(loader, "b.jpg", b"\xff\xd8\xff\xe0 not a whole jpeg"))
    assert (corrupt.status, corrupt.kind) == (400, "invalid_image")
    assert corrupt.message == str(loader.try_load(b"\xff\xd8\xff\xe0 not a whole jpeg", "b.jpg"))
    too_large = asyncio.run(decode(small, "c.png", data))
    assert (too_large.status, too_large.kind) == (400, "too_many_pixels") and too_large.message.startswith("c.png: ")
