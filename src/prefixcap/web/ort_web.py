"""onnxruntime-web for web exports: one pinned npm release, checked against its published integrity.

The export folder carries its own copy of onnxruntime-web (the page never loads code from a CDN).
It comes from the npm tarball of `VERSION`: `npm pack` fetches it at export time (npm's cache makes
later exports offline), or the user passes the tarball (`--ort-web FILE.tgz`, from `npm pack
onnxruntime-web@VERSION` on any machine). Either way its SHA-512 must equal `INTEGRITY`, the
registry's `dist.integrity` for that release, so every export runs exactly the runtime that was tested.
The wasm binaries are 15-29 MB each: shipping them inside the Python package would put them in
every install, export or not.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from prefixcap.errors import UserError

PACKAGE = "onnxruntime-web"
VERSION = "1.31.1"
INTEGRITY = "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw=="
# The bundles an export uses, with the files each loads: WASM (CPU kernels, threads when the page
# is cross-origin isolated) and WebGPU (its build also runs the CPU kernels for ops WebGPU lacks).
BUNDLES = {
    "wasm": ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
    "webgpu": ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm"),
}
MAX_TARBALL_BYTES = 256 * 2**20  # the 1.31.1 tarball is 35 MB
MAX_FILE_BYTES = 64 * 2**20  # its largest file we use is 29 MB
NPM_TIMEOUT_S = 600
NOTICE = f"""\
{PACKAGE} {VERSION} (https://www.npmjs.com/package/{PACKAGE}), the files of its dist/ folder that this
export uses, unchanged. Copyright (c) Microsoft Corporation. Licensed under the MIT License
(https://github.com/microsoft/onnxruntime/blob/main/LICENSE). npm tarball integrity: {INTEGRITY}
"""


def tarball_name() -> str:
    return f"{PACKAGE}-{VERSION}.tgz"


def fetch_tarball(directory: Path) -> Path:
    """`npm pack` the pinned release into `directory` and return the tarball's path (not yet checked)."""
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(
            f"npm is not installed: install Node.js and npm, or pass --ort-web {tarball_name()} "
            f"(made by `npm pack {PACKAGE}@{VERSION}` on a machine with npm)"
        )
    command = [npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(directory), "--prefer-offline"]
    try:
        subprocess.run(command, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=True)
    except subprocess.CalledProcessError as error:
        reason = (error.stderr.strip().splitlines() or [f"exit status {error.returncode}"])[-1]
        raise UserError(f"npm pack {PACKAGE}@{VERSION} failed ({reason}); or pass --ort-web {tarball_name()}") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"npm pack {PACKAGE}@{VERSION} took over {NPM_TIMEOUT_S} s; or pass --ort-web FILE") from None
    return directory / tarball_name()


def check_tarball(path: Path) -> None:
    """Refuse anything but the pinned release's tarball: its SHA-512 must be `INTEGRITY`."""
    if not path.is_file():
        raise UserError(f"{path}: no such file (--ort-web takes the tarball of `npm pack {PACKAGE}@{VERSION}`)")
    if path.stat().st_size > MAX_TARBALL_BYTES:
        raise UserError(f"{path}: larger than {MAX_TARBALL_BYTES // 2**20} MB, not the {PACKAGE} {VERSION} tarball")
    digest = hashlib.sha512()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    if f"sha512-{base64.b64encode(digest.digest()).decode()}" != INTEGRITY:
        raise UserError(f"{path}: not the {PACKAGE} {VERSION} tarball from npm (its SHA-512 differs from {INTEGRITY})")


def install(out_dir: Path, bundles: list[str], tarball: Path | None = None) -> None:
    """Write the files of `bundles` (keys of BUNDLES) and a NOTICE into `out_dir`, from `tarball`
    (None: `npm pack` it), checked first."""
    with tempfile.TemporaryDirectory(prefix="prefixcap-ort-web-") as scratch:
        path = tarball if tarball is not None else fetch_tarball(Path(scratch))
        check_tarball(path)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "r:gz") as archive:
            for name in sorted({file for bundle in bundles for file in BUNDLES[bundle]}):
                member = archive.getmember(f"package/dist/{name}")  # the checked tarball has them all
                if not member.isfile() or member.size > MAX_FILE_BYTES:
                    raise UserError(
                        f"{path}: package/dist/{name} is not a regular file of at most {MAX_FILE_BYTES} bytes"
                    )
                source = archive.extractfile(member)
                assert source is not None  # a regular file
                with source, open(out_dir / name, "wb") as target:
                    shutil.copyfileobj(source, target)
        (out_dir / "NOTICE.txt").write_text(NOTICE)
