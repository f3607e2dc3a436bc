"""Captioning on Ray: a real two-node cluster on 127.0.0.1 (Ray's test-cluster utility: a head with
one CPU and a second node with two CPUs, a `captioner` resource and a GPU that exists only as a
Ray resource) and an S3 store on 127.0.0.1
(moto's server); jobs that must give exactly the single-process captions, each image once, also
after a captioning actor is killed with SIGKILL; reruns (nothing to do; everything to do after the model's files change); sidecar files;
the actor class in a plain Ray Data pipeline; `prepare --ray`, which must write the in-process
feature store, resume shard by shard and survive a killed encoding actor; and no Ray process left
behind."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from prefixcap.captioner import Captioner
from prefixcap.cli import main
from prefixcap.data import load_records
from prefixcap.data.synth import make_synthetic_dataset
from prefixcap.inputs.expand import expand_inputs
from prefixcap.jobs.ray_job import caption_to_shards, read_shard
from prefixcap.pipeline.features import BAD_IMAGES, MANIFEST, SHARD_DIR, shard_path
from prefixcap.pipeline.prepare import prepare_features
from prefixcap.testing import COLOURS, colour_image
from tests.helpers_pipeline import prefixcap_command, store_contents, subprocess_env
from tests.test_core_install import core_env, run_core  # noqa: F401 - core_env is a fixture

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

from prefixcap.jobs.ray import PrefixCaptioner, RayCaptioner  # noqa: E402 - needs ray
from prefixcap.jobs.ray_inputs import expand_ray_inputs  # noqa: E402
from prefixcap.jobs.ray_prepare import prepare_on_ray  # noqa: E402
from prefixcap.jobs.ray_units import RayCluster  # noqa: E402

NAMES = list(COLOURS)
OPTIONS = {"max_new_tokens": 8}
SETTINGS = {"dtype": "float32", "batch_size": 2}  # float32 as in the single-process reference, on any CPU


def png(name: str, size: int = 40) -> bytes:
    data = io.BytesIO()
    Image.fromarray(colour_image(name, size)).save(data, "PNG")
    return data.getvalue()


def write_shard(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for index, name in enumerate(names):
            data = png(name)
            member = tarfile.TarInfo(f"sample{index:03d}.png")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def write_parquet(path: Path, names: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [png(name) for name in names], "text": names}), path)
    return path


def reference(model: Path, sources: list) -> dict[str, list[str] | None]:
    """The single-process captions of `sources` (None for an unreadable image), by key."""
    captioner = Captioner.from_pretrained(model, device="cpu", dtype="float32")
    return {
        str(key): None if isinstance(captions, Exception) else list(captions)
        for key, captions in captioner.stream(sources, batch_size=2, workers=0, **OPTIONS)
    }


def shard_records(out: Path, fmt: str) -> list[tuple[str, list[str] | None]]:
    """(path, captions or None) of every record of every part file, in part order."""
    records = []
    for path in sorted((out / "parts").glob(f"part-*.{fmt}")):
        if fmt == "parquet":
            import pyarrow.parquet as pq

            records += [(row["path"], row["captions"]) for row in pq.read_table(path).to_pylist()]
        else:
            records += [(result.path, result.captions) for result in read_shard(path, fmt)]
    return records


def ray_processes(root: psutil.Process) -> dict[int, str]:
    """PID -> command line of every process below `root` (the cluster's, its workers')."""
    found = {}
    for process in root.children(recursive=True):
        try:
            found[process.pid] = " ".join(process.cmdline())
        except psutil.Error:
            continue
    return found


def alive(pids) -> list[int]:
    living = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.append(pid)
        except psutil.NoSuchProcess:
            continue
    return living


def wait_until_gone(pids, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


class LoopbackCluster:
    """A two-node cluster on 127.0.0.1 started in this process, whose processes are all ours."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.temp = tempfile.mkdtemp(prefix="pcray", dir="/tmp")  # short: Ray's socket paths have a limit
        common = {"node_ip_address": "127.0.0.1", "object_store_memory": 150 * 2**20}
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={**common, "num_cpus": 1, "include_dashboard": False, "temp_dir": self.temp},
        )
        # one GPU as a Ray resource only (torch here has no CUDA): actors that ask for it caption on CPU
        self.cluster.add_node(**common, num_cpus=2, num_gpus=1, resources={"captioner": 1})
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address
        self.stopped = False

    def shutdown(self) -> tuple[dict[int, str], list[int]]:
        """Stop every node; returns (the processes there were, those still alive after)."""
        processes = ray_processes(psutil.Process())
        self.cluster.shutdown()
        self.stopped = True
        left = wait_until_gone(processes)
        shutil.rmtree(self.temp, ignore_errors=True)
        return processes, left


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as patch:
        # A loopback-only test cluster: no token to share with the job subprocesses. Ray turns a
        # 127.0.0.1 address into this machine's network address before connecting, except in its
        # single-machine mode (named for Windows and macOS), which drivers here need to reach it.
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        patch.setenv("OMP_NUM_THREADS", "1")  # one thread per worker, as in the single-process reference
        # the S3 test store (moto) takes any credentials; the nodes' workers inherit these
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        test_cluster = LoopbackCluster()
        yield test_cluster
        if not test_cluster.stopped:
            test_cluster.shutdown()


@pytest.fixture(scope="module")
def model(image_dependent_model_dir, tmp_path_factory) -> Path:
    """A copy of the colour model, whose files a test may touch."""
    return Path(shutil.copytree(image_dependent_model_dir, tmp_path_factory.mktemp("ray") / "model"))


@pytest.fixture(scope="module")
def store(cluster):
    """An S3 store on 127.0.0.1 (moto's server), as the URL prefix of a bucket in it."""
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    yield "s3://test-bucket", options
    server.stop()


def upload(store: tuple[str, str], local: Path, files: list[Path]) -> str:
    """Copy `files` to `data/` in the store; returns the prefix's URL."""
    import boto3

    bucket, options = store
    endpoint = options.split("endpoint_override=")[1].split("&")[0]
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
    client.create_bucket(Bucket=bucket.removeprefix("s3://"))
    for file in files:
        client.put_object(
            Bucket=bucket.removeprefix("s3://"), Key=f"data/{file.relative_to(local)}", Body=file.read_bytes()
        )
    return f"{bucket}/data/{options}"


@pytest.fixture(scope="module")
def job(cluster, store, model, tmp_path_factory) -> dict:
    """A folder (with an unreadable image), a Parquet file and a WebDataset shard (and an empty
    one), and an S3 prefix holding two images, a shard and a Parquet file, captioned on the
    cluster through the Python API into Parquet shards; the actor runs on the second node (the
    only one with a `captioner`) and, as it works on CPUs, decodes its own images."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "photos").mkdir()
    for index, name in enumerate(NAMES[:4]):
        (root / "photos" / f"{index}-{name}.png").write_bytes(png(name, 40 + index))
    (root / "photos" / "broken.png").write_bytes(b"not a picture")
    write_parquet(root / "table.parquet", NAMES[4:6])
    write_shard(root / "shard-0.tar", NAMES[6:8])
    write_shard(root / "empty.tar", [])
    # the same kinds of objects in S3, in the order the store lists them
    (root / "s3").mkdir()
    (root / "s3" / "a.png").write_bytes(png(NAMES[7], 33))
    (root / "s3" / "b.png").write_bytes(png(NAMES[0], 34))
    in_store = [root / "s3" / "a.png", root / "s3" / "b.png", write_shard(root / "s3" / "c.tar", NAMES[2:4]),
                write_parquet(root / "s3" / "d.parquet", NAMES[5:6])]  # fmt: skip
    url = upload(store, root / "s3", in_store)
    inputs = [str(root / name) for name in ("photos", "table.parquet", "shard-0.tar", "empty.tar")] + [url]
    sources, missing = expand_ray_inputs(inputs)
    assert not missing
    out = root / "out"
    with RayCaptioner(str(model), address=cluster.address, resources={"captioner": 1}, **SETTINGS) as captioner:
        request = captioner.request(**OPTIONS)
        summary = caption_to_shards(captioner, sources, out, request, fmt="parquet", part_size=2, batch_size=2)
    # the single-process captions: of the same files, read locally (the store's under their store names)
    local, _ = expand_inputs([*inputs[:4], *map(str, in_store)])
    prefix, options = url.split("?")

    def store_name(key: str) -> str:  # /.../s3/c.tar#member -> s3://test-bucket/data/c.tar?OPTIONS#member
        path, mark, member = key.partition("#")
        return f"{prefix}{Path(path).name}?{options}{mark}{member}" if Path(path).parent == root / "s3" else key

    expected = {store_name(str(key)): captions for key, captions in reference(model, local).items()}
    return {"inputs": inputs, "sources": sources, "out": out, "summary": summary, "reference": expected}


def test_two_nodes_caption_every_image_once_as_one_process(job):
    expected = job["reference"]
    good = [captions for captions in expected.values() if captions is not None]
    assert len(good) == 13 and len({tuple(captions) for captions in good}) == 8  # distinct colours, distinct captions
    records = shard_records(job["out"], "parquet")
    assert [path for path, _ in records] == list(expected)  # every image exactly once, in input order
    assert dict(records) == expected
    summary = json.loads((job["out"] / "summary.json").read_text())
    assert (summary["images"], summary["captioned"], summary["failed"]) == (14, 13, 1)
    assert summary["images_this_run"] == 14 and summary["parts_reused"] == 0
    assert [failure["path"] for failure in summary["failures"]] == [str(job["out"].parent / "photos" / "broken.png")]


def test_a_rerun_captions_nothing(job, model, cluster):
    before = {path: path.stat().st_mtime_ns for path in (job["out"] / "parts").iterdir()}
    with RayCaptioner(str(model), address=cluster.address, **SETTINGS) as captioner:
        request = captioner.request(**OPTIONS)
        summary = caption_to_shards(captioner, job["sources"], job["out"], request, fmt="parquet", part_size=2)
        assert not captioner._connected  # nothing to do: no cluster joined, no model loaded
    assert summary.images_this_run == 0 and summary.parts_reused == summary.parts
    assert (summary.images, summary.captioned) == (14, 13)
    assert {path: path.stat().st_mtime_ns for path in (job["out"] / "parts").iterdir()} == before


def test_the_actor_class_in_a_plain_ray_data_pipeline(cluster, model):
    """`map_batches(PrefixCaptioner, ...)` over rows of image bytes: captions, and a failure row."""
    rows = [{"image": png(name), "path": f"{name}.png"} for name in NAMES[:3]] + [{"image": b"junk", "path": "x.png"}]
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        dataset = ray.data.from_items(rows).map_batches(
            PrefixCaptioner, fn_constructor_kwargs={"model": str(model), "dtype": "float32", **OPTIONS},
            compute=ray.data.ActorPoolStrategy(size=1), batch_size=4,
        )  # fmt: skip
        results = {row["path"]: row for row in dataset.take_all()}
    finally:
        ray.shutdown()
    expected = reference(model, [png(name) for name in NAMES[:3]])
    assert [results[f"{name}.png"]["captions"] for name in NAMES[:3]] == list(expected.values())
    assert results["x.png"]["caption"] is None and "not an image" in results["x.png"]["error"]


def test_a_killed_actor_loses_no_image_and_repeats_none(cluster, model, tmp_path):
    """SIGKILL the captioning actor's process mid-run: Ray replaces it and retries its batches;
    the job completes with every image once and the single-process captions."""
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(40):
        (folder / f"{index:02d}.png").write_bytes(png(NAMES[(index * 3) % 8], 36 + index % 5))
    out = tmp_path / "out"
    command = prefixcap_command(
        "caption", folder, "--model", model, "--ray", cluster.address, "--output", f"{out}/", "--part-size", "2",
        "--batch-size", "1", "--max-new-tokens", str(OPTIONS["max_new_tokens"]), "--dtype", "float32",
    )  # fmt: skip
    log = tmp_path / "job.log"
    with open(log, "w") as stderr:
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=subprocess_env())
    try:
        deadline = time.monotonic() + 300
        actors: list[int] = []
        while not (list((out / "parts").glob("part-*")) and actors):
            assert job.poll() is None, f"finished before an actor could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the first part"
            actors = [pid for pid, command in ray_processes(psutil.Process()).items() if "PrefixCaptioner" in command]
            time.sleep(0.05)
        written = len(list((out / "parts").glob("part-*")))
        os.kill(actors[0], signal.SIGKILL)
        assert job.poll() is None and written < 20  # killed mid-run
        assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    assert not alive(actors[:1])
    expected = reference(model, sorted(str(path) for path in folder.iterdir()))
    records = shard_records(out, "jsonl")
    assert sorted(path for path, _ in records) == sorted(expected)
    assert dict(records) == expected


def test_gpu_actors_are_fed_by_decoding_tasks_of_their_own(cluster, model, tmp_path):
    """Actors that ask for a GPU (the second node's, here a Ray resource only: the model runs on
    its CPU) only caption: the images are decoded in a stage of their own, which CPU-only nodes
    can run, while actors that work on CPUs decode their own (the `job`)."""
    folder = tmp_path / "set"
    folder.mkdir()
    for index, name in enumerate(NAMES[:5]):
        (folder / f"{index}.png").write_bytes(png(name, 36 + index))
    (folder / "broken.png").write_bytes(b"not a picture")
    sources, _ = expand_ray_inputs([str(folder)])
    titles: set[str] = set()
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            titles.update(command for command in ray_processes(psutil.Process()).values() if "MapWorker" in command)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with RayCaptioner(str(model), address=cluster.address, gpus_per_actor=1, device="cpu", **SETTINGS) as captioner:
            request = captioner.request(**OPTIONS)
            caption_to_shards(captioner, sources, tmp_path / "out", request, fmt="jsonl", part_size=2)
    finally:
        watching.set()
        watcher.join(timeout=10)
    assert any("MapWorker(MapBatches(PrefixCaptioner))" in title for title in titles), titles  # not fused
    assert not any("decode_units" in title for title in titles), titles
    expected = reference(model, sorted(str(path) for path in folder.iterdir()))
    assert dict(shard_records(tmp_path / "out", "jsonl")) == expected


def test_sidecar_files_on_ray(cluster, model, tmp_path, capsys):
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    images = [folder / "a-red.png", folder / "sub" / "b-blue.png", folder / "sub" / "c-green.png"]
    for image, name in zip(images, ["red", "blue", "green"]):
        image.write_bytes(png(name))
    command = ["caption", str(folder), "--model", str(model), "--sidecar", "--ray", cluster.address, "--max-new-tokens",
               str(OPTIONS["max_new_tokens"]), "--batch-size", "2", "--dtype", "float32"]  # fmt: skip
    assert main(command) == 0
    assert capsys.readouterr().err.strip().endswith("3 written, 0 skipped (caption file exists), 0 failed")
    expected = reference(model, [str(image) for image in images])
    assert len({tuple(captions) for captions in expected.values()}) == 3
    for image in images:
        assert image.with_suffix(".txt").read_text() == expected[str(image)][0] + "\n"
    assert sorted(path.name for path in folder.rglob("*") if path.is_file() and path.suffix != ".png") == [
        "a-red.txt", "b-blue.txt", "c-green.txt",
    ]  # fmt: skip
    stamps = [image.with_suffix(".txt").stat().st_mtime_ns for image in images]
    assert main(command) == 0  # a rerun writes nothing
    assert capsys.readouterr().err.strip().endswith("0 written, 3 skipped (caption file exists), 0 failed")
    assert [image.with_suffix(".txt").stat().st_mtime_ns for image in images] == stamps


def test_changed_model_files_redo_everything_on_a_local_cluster_that_leaves_no_process(job, model, tmp_path):
    """The last test to use `job`: the model saved again (a new modification time) makes a rerun
    caption every image again, on a cluster that `--ray` starts for the job (no address), whose
    processes must all be gone once the command exits. Its one actor holds every CPU of that
    cluster, so decoding must run inside it: a task of its own would wait for a CPU forever."""
    old_parts = {path.name for path in (job["out"] / "parts").iterdir()}
    for file in model.rglob("*.safetensors"):
        os.utime(file, ns=(time.time_ns(), time.time_ns()))
    command = prefixcap_command(
        "caption", *job["inputs"], "--model", model, "--ray", "--output", f"{job['out']}/", "--format", "parquet",
        "--part-size", "2", "--batch-size", "2", "--max-new-tokens", str(OPTIONS["max_new_tokens"]), "--dtype", "float32",
        "--ray-actors", "1", "--ray-cpus", str(os.cpu_count()),
    )  # fmt: skip
    env = {**subprocess_env(), "RAY_AUTH_MODE": "disabled"}
    job_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    seen: dict[int, str] = {}
    try:
        while job_process.poll() is None:
            seen |= ray_processes(psutil.Process(job_process.pid))
            time.sleep(0.1)
        stderr = job_process.stderr.read()
    finally:
        if job_process.poll() is None:
            job_process.kill()
        job_process.stderr.close()
    assert job_process.returncode == 0, stderr[-3000:]
    assert any("raylet" in command for command in seen.values())  # a cluster of its own was started
    assert wait_until_gone(seen) == []
    summary = json.loads((job["out"] / "summary.json").read_text())
    assert summary["images_this_run"] == 14 and summary["parts_reused"] == 0
    parts = {path.name for path in (job["out"] / "parts").iterdir()}
    assert parts.isdisjoint(old_parts) and len(parts) == summary["parts"]  # the old model's parts are gone
    assert dict(shard_records(job["out"], "parquet")) == job["reference"]
    rerun = subprocess.run(command, capture_output=True, env=env, text=True)  # starts no cluster
    assert rerun.returncode == 0 and f"none in this run: its {summary['parts']} part(s) were written" in rerun.stderr


def write_dataset(root: Path, num_images: int) -> Path:
    """A JSON lines caption dataset of `num_images` synthetic 16-pixel images, plus a shard
    member, a missing image and a broken one; returns its file."""
    captions = make_synthetic_dataset(root, num_images=num_images, image_size=16)
    write_shard(root / "pack.tar", NAMES[:1])
    (root / "images" / "broken.png").write_bytes(b"not a picture")
    extra = [("pack.tar#sample000.png", "train"), ("images/missing.png", "val"), ("images/broken.png", "train")]
    with captions.open("a") as out:
        for image, split in extra:
            out.write(json.dumps({"image": image, "caption": f"a caption of {image}", "split": split}) + "\n")
    return captions


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a feature store but the embeddings (whose metadata name their inputs), by name."""
    return {
        str(path.relative_to(store)): path.read_bytes()
        for path in sorted(store.rglob("*"))
        if path.is_file() and path.suffix != ".safetensors"
    }


def assert_same_store(store: Path, expected: Path) -> None:
    """The same records, shard files, bad images and manifest; embeddings equal up to rounding."""
    assert store_files(store) == store_files(expected)
    (records, embeds), (expected_records, expected_embeds) = store_contents(store), store_contents(expected)
    assert records == expected_records
    assert embeds.keys() == expected_embeds.keys()
    for split in expected_embeds:
        torch.testing.assert_close(embeds[split], expected_embeds[split], atol=1e-3, rtol=1e-3)


PREPARE = {"shard_size": 4, "batch_size": 3}


@pytest.fixture(scope="module")
def prepared(cluster, tiny_components, tmp_path_factory) -> dict:
    """A dataset encoded on the cluster through the Python API, the encoding actor on the second
    node (decoding tasks on both), and in one process."""
    root = tmp_path_factory.mktemp("prepare")
    captions = write_dataset(root / "data", num_images=10)
    encoder = tiny_components[0]
    with RayCluster(address=cluster.address, resources={"captioner": 1}) as ray_cluster:
        manifest = prepare_on_ray(ray_cluster, captions, root / "ray", vision_encoder=encoder, **PREPARE)
    prepare_features(captions, root / "local", vision_encoder=encoder, num_workers=0, **PREPARE)
    return {
        "captions": captions,
        "encoder": encoder,
        "ray": root / "ray",
        "local": root / "local",
        "manifest": manifest,
    }


def test_prepare_on_ray_writes_the_in_process_feature_store(prepared):
    local, _ = store_contents(prepared["local"])
    records, embeds = store_contents(prepared["ray"])
    bad = {"images/missing.png", "images/broken.png"}
    assert records == local == [record for record in load_records(prepared["captions"]) if record.image_id not in bad]
    rows = torch.cat(list(embeds.values()))
    assert len({tuple(row.tolist()) for row in rows}) == len(rows) == 11  # distinct images, distinct rows
    assert_same_store(prepared["ray"], prepared["local"])
    manifest = prepared["manifest"]
    assert (manifest.num_records, manifest.num_images, manifest.num_bad, manifest.num_shards) == (13, 11, 2, 4)
    bad = [json.loads(line) for line in (prepared["ray"] / BAD_IMAGES).read_text().splitlines()]
    assert [(entry["image_id"], entry["reason"].split(" (")[0]) for entry in bad] == [
        ("images/missing.png", "no such file"), ("images/broken.png", "not an image, or an unsupported format"),
    ]  # fmt: skip


def test_prepare_on_ray_reruns_only_the_shards_not_written(prepared, cluster, monkeypatch, capsys):
    """A rerun over the finished store sends nothing to the cluster and rewrites nothing; after a
    shard is lost, a rerun encodes that shard's images alone, and the store is whole again."""
    store, units = prepared["ray"], []
    command = ["prepare", str(prepared["captions"]), "--out", str(store), "--vision-encoder", str(prepared["encoder"]),
               "--shard-size", "4", "--batch-size", "3", "--ray", cluster.address]  # fmt: skip
    stamps = {path.name: path.stat().st_mtime_ns for path in (store / SHARD_DIR).iterdir()}

    def nothing_to_do(self, *args, **kwargs):
        raise AssertionError("a finished store sent work to the cluster")

    monkeypatch.setattr(RayCluster, "map_units", nothing_to_do)
    assert main(command) == 0
    assert "4 finished shards kept" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in (store / SHARD_DIR).iterdir()} == stamps
    monkeypatch.undo()

    map_units = RayCluster.map_units

    def counted(self, work, **kwargs):
        work = list(work)
        units.extend(work)
        return map_units(self, work, **kwargs)

    monkeypatch.setattr(RayCluster, "map_units", counted)
    shard_path(store, 1, ".safetensors").unlink()
    assert main(command) == 0
    assert "3 finished shards kept" in capsys.readouterr().err
    shard = load_records(prepared["captions"])[4:8]
    assert [image for unit in units for image in unit] == [record.image for record in shard]
    rewritten = {
        path.name for path in (store / SHARD_DIR).iterdir() if path.stat().st_mtime_ns != stamps.get(path.name)
    }
    assert rewritten == {"000001.safetensors", "000001.jsonl"}
    assert (store / MANIFEST).exists()
    assert_same_store(store, prepared["local"])


def test_prepare_on_ray_survives_a_killed_encoding_actor(cluster, tiny_components, tmp_path):
    """SIGKILL the encoding actor's process mid-run (from a thread, while this process drives the
    job): Ray replaces it and retries its batches; the store holds every image once, as the
    in-process store does."""
    captions = write_dataset(tmp_path / "data", num_images=30)
    out, killed = tmp_path / "ray", {}

    def kill_the_actor_after_the_first_shard() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            actors = [pid for pid, command in ray_processes(psutil.Process()).items() if "PrefixEncoder" in command]
            written = len(list(out.glob(f"{SHARD_DIR}/*.safetensors")))
            if actors and written:
                os.kill(actors[0], signal.SIGKILL)
                killed.update(pid=actors[0], written=written, finished=(out / MANIFEST).exists())
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_actor_after_the_first_shard, daemon=True)
    killer.start()
    with RayCluster(address=cluster.address) as ray_cluster:
        prepare_on_ray(ray_cluster, captions, out, vision_encoder=tiny_components[0], shard_size=2, batch_size=1)
    killer.join(timeout=10)
    assert killed and killed["written"] < 17 and not killed["finished"]  # mid-run (33 images in 17 shards)
    assert not alive([killed["pid"]])
    prepare_features(captions, tmp_path / "local", vision_encoder=tiny_components[0], shard_size=2, num_workers=0)
    assert_same_store(out, tmp_path / "local")


def test_shutdown_leaves_no_ray_process(cluster):
    processes, left = cluster.shutdown()
    assert any("gcs_server" in command for command in processes.values())
    assert any("raylet" in command for command in processes.values())
    assert left == []


def test_without_ray_the_flag_names_the_extra(core_env, tmp_path):  # noqa: F811 - the fixture
    result = run_core(core_env, "-m", "prefixcap", "caption", str(tmp_path), "--ray", "--output", f"{tmp_path}/out/")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == 'error: Ray jobs (--ray) needs ray[data], pandas, pyarrow: pip install "prefixcap[ray]"'
    )


def test_without_ray_prepare_names_the_extra_before_reading_the_dataset(tmp_path, monkeypatch, capsys):
    """The same line from `prepare --ray` (here with the extra's packages hidden from the import
    system), before the dataset, which does not exist, is looked at."""
    find_spec, hidden = importlib.util.find_spec, {"ray", "pandas", "pyarrow"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else find_spec(name, *a))
    assert main(["prepare", str(tmp_path / "nothing.jsonl"), "--out", str(tmp_path / "out"), "--ray"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == 'error: Ray jobs (--ray) needs ray[data], pandas, pyarrow: pip install "prefixcap[ray]"'
    )
