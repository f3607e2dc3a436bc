"""`--ray [ADDRESS]` for `prefixcap caption` and `prefixcap prepare`: the options, the cluster they
describe, and the caption run on it (the work itself is `prefixcap.jobs.ray` and
`prefixcap.jobs.ray_job`; for prepare, `prefixcap.jobs.ray_prepare`)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from prefixcap.cli.common import bounded, generation_kwargs, report_failure
from prefixcap.errors import UserError
from prefixcap.system.terminal import for_terminal

EPILOG = """\
on a Ray cluster (pip install "prefixcap[ray]"):
  --ray starts a cluster on this machine for the job; --ray auto joins the cluster this machine
  belongs to (ray start), --ray ray://HOST:10001 one elsewhere. Results go into a folder of shards,
  OUT/parts/*.parquet (or .jsonl) and OUT/summary.json; a rerun skips the finished parts. Inputs
  may also be s3:// and gs:// objects, prefixes and globs (images, .tar shards, .parquet files),
  which every node reads itself through pyarrow.
  prefixcap caption 'shards/{0000..0999}.tar' --ray auto --ray-actors 8 --ray-gpus 1 --output out/ --format parquet
"""
PREPARE_EPILOG = """\
on a Ray cluster (pip install "prefixcap[ray]"):
  --ray starts a cluster on this machine for the job; --ray auto joins the cluster this machine
  belongs to (ray start), --ray ray://HOST:10001 one elsewhere. Ray tasks decode the images on any
  node, actors encode them, and this process writes the same feature store as without --ray; a
  rerun keeps the finished shards. Every node must read the dataset's images at the same paths.
  prefixcap prepare coco/dataset_coco.json --out features/coco --ray auto --ray-actors 8 --ray-gpus 1
"""
# auto, local, ray://HOST:PORT, or HOST:PORT of a cluster's head (what `ray start` prints)
_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[A-Za-z0-9.\-\[\]:]+:\d+)$")


def add_ray_arguments(
    parser: argparse.ArgumentParser,
    *,
    work: tuple[str, str] = ("captioning", "captions"),
    writes: str = "Writes shards into --output OUT/ (or --sidecar files)",
) -> None:
    """The --ray options of a command whose actors do `work` (their adjective, and the verb for
    what they do on CPUs) and which `writes` what the help names."""
    actor, verb = work
    group = parser.add_argument_group("Ray cluster (scale out; see README, Scaling out)")
    group.add_argument(
        "--ray", nargs="?", const="local", metavar="ADDRESS",
        help="run the job on a Ray cluster: without ADDRESS one started on this machine for the job "
        "(127.0.0.1 only); auto: the cluster this machine joined with `ray start`; ray://HOST:PORT or "
        f"HOST:PORT: that cluster. {writes}",
    )  # fmt: skip
    group.add_argument(
        "--ray-actors", type=bounded(int, 1), default=1, metavar="N",
        help=f"{actor} actors, each with its own copy of the model (default: 1)",
    )  # fmt: skip
    group.add_argument(
        "--ray-gpus", type=bounded(float, 0), default=0, metavar="G",
        help=f"GPUs per {actor} actor: 1 for one model per GPU, 0.5 for two; 0 {verb} on CPUs (default: 0)",
    )  # fmt: skip
    group.add_argument(
        "--ray-cpus", type=bounded(float, 0), default=1, metavar="C",
        help=f"CPUs reserved per {actor} actor (its threads); actors on CPUs decode their own images, and for GPU "
        "actors decoding tasks take one CPU each from the rest (default: 1)",
    )  # fmt: skip


def cluster_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `RayCluster` settings the --ray options give; refuses an ADDRESS that names no cluster."""
    if not _ADDRESS.match(args.ray):
        raise UserError(
            f"--ray {args.ray}: expected auto, ray://HOST:PORT or HOST:PORT (put a bare --ray after the inputs)"
        )
    return {"address": args.ray, "actors": args.ray_actors, "gpus_per_actor": args.ray_gpus,
            "cpus_per_actor": args.ray_cpus}  # fmt: skip


def run_caption(args: argparse.Namespace) -> int:
    """`prefixcap caption ... --ray`: shards into --output, or --sidecar files."""
    from prefixcap.cli.sidecar import run_sidecars, sidecar_requested
    from prefixcap.jobs.ray import RayCaptioner
    from prefixcap.system.processes import SingleProcess

    cluster = cluster_settings(args)
    if args.rerank:
        raise UserError("--rerank does not run on Ray yet; caption without --ray")
    sidecar = sidecar_requested(args)
    if not sidecar:
        fmt = _check_output(args)
    captioner = RayCaptioner(
        args.model, **cluster, device=args.device, dtype=args.dtype, quantize=args.quantize,
        jpeg_draft=args.jpeg_draft, batch_size=args.batch_size,
    )  # fmt: skip
    try:  # checked once, here, against the model's text side; the actors caption with it
        request = captioner.request(**generation_kwargs(args))
    except ValueError as error:
        raise UserError(str(error)) from None
    with captioner:
        if sidecar:
            return run_sidecars(args, SingleProcess(), load=lambda: (captioner, request))
        return _caption_to_shards(captioner, request, args, fmt)


def _check_output(args: argparse.Namespace) -> str:
    """The shard format; refuses what a Ray job does not write, before any work."""
    from prefixcap.jobs.ray_job import SHARD_FORMATS

    fmt = args.format or "jsonl"
    if fmt not in SHARD_FORMATS:
        raise UserError(f"--ray writes {' or '.join(SHARD_FORMATS)} shards; --format {fmt} is for local jobs")
    if args.output is None:
        raise UserError("--ray writes into a folder: add --output OUT/ (or --sidecar)")
    if args.embed_images:
        raise UserError("--embed-images does not run on Ray yet; caption without --ray")
    return fmt


def _caption_to_shards(captioner, request, args: argparse.Namespace, fmt: str) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from prefixcap.jobs.ray_inputs import expand_ray_inputs
    from prefixcap.jobs.ray_job import caption_to_shards
    from prefixcap.jobs.to_folder import prepare_directory

    sources, missing = expand_ray_inputs(args.paths, image_column=args.image_column)
    for path, reason in missing:
        print(for_terminal(f"error: {path}: {reason}"), file=sys.stderr)
    if not sources:
        raise UserError("no images found in the given paths")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: is a file, but results go to a folder here")
    prepare_directory(output, fmt, sources)
    with tqdm(unit="img", desc="captioned", disable=None, file=sys.stderr) as bar:
        summary = caption_to_shards(
            captioner, sources, output, request, fmt=fmt, part_size=args.part_size, batch_size=args.batch_size,
            input_failures=missing, progress=bar, on_failure=report_failure,
        )  # fmt: skip
    this_run = (
        f"{summary.images_this_run} in this run, at {summary.images_per_second:.2f} images/s on {summary.processes} actor(s)"
        if summary.images_this_run
        else f"none in this run: its {summary.parts} part(s) were written before"
    )
    print(
        f"{summary.captioned} of {summary.images} images captioned ({summary.failed} failed; {this_run}); "
        f"wrote {summary.output}",
        file=sys.stderr,
    )
    return 0
