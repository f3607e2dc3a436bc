"""What the hardware runs fast: the default precision per device, and int8 decoding on CPUs.

bf16 halves memory traffic, but only a CPU with bf16 matrix instructions (Intel AMX, or
AVX512-BF16 on Intel Cooper Lake+ and AMD Zen 4+) multiplies in it faster than in fp32; elsewhere
oneDNN emulates bf16 and it is slower than fp32. So `auto` picks bf16 on CUDA and on those CPUs,
fp32 on the others.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from prefixcap.errors import UserError

QUANTIZE_CHOICES = ("int8",)  # PyTorch models (`quantize_int8`) and ONNX exports
# ONNX exports also take int4: 4-bit blockwise weights exist as ONNX Runtime graphs (MatMulNBits), not PyTorch modules
EXPORT_QUANTIZE_CHOICES = ("int8", "int4")


def default_device() -> torch.device:
    """CUDA when PyTorch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[str]:
    """The devices PyTorch can run on here, as `--device` takes them: cpu, then each GPU (cuda:N,
    xpu:N) and Apple's mps."""
    devices = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [f"xpu:{index}" for index in range(xpu.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def parse_device(text: str | torch.device | None) -> torch.device:
    """`text` as a device of this machine (None: `default_device()`). Anything else, a name torch
    does not know ("gpu") or a device this machine lacks ("cuda" without a GPU, "cuda:3" with one),
    is a UserError that lists the devices it has, in one line, before any model loads: torch would
    only fail later, deep in a model's `.to()`."""
    if text is None:
        return default_device()
    devices = available_devices()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        problem = "is not a device name"
    else:
        if device.type == "cpu" or str(device) in devices or (device.index is None and f"{device}:0" in devices):
            return device
        problem = "is not available"
    hint = ""
    if str(text).startswith("cuda") and not torch.cuda.is_available():
        built = "is built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        hint = f" (this PyTorch, {torch.__version__}, {built})"
    raise UserError(f"device {str(text)!r} {problem}: this machine has {', '.join(devices)}{hint}")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from Linux /proc/cpuinfo (empty elsewhere, or when unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16), which make bf16
    matmuls faster than fp32. Reads /proc/cpuinfo on Linux; elsewhere asks PyTorch whether its
    CPU kernels use AMX (`torch.backends.cpu.get_cpu_capability`), and otherwise says no, since a
    wrong yes (slow emulated bf16) costs more than a wrong no."""
    flags = cpu_flags()
    if flags:
        return bool({"amx_bf16", "avx512_bf16"} & flags)
    return "AMX" in torch.backends.cpu.get_cpu_capability().upper()


def auto_dtype(device: torch.device, *, quantize: str | None = None) -> tuple[torch.dtype, str]:
    """The precision `--dtype auto` picks for `device`, and why (for the one line the CLI prints)."""
    if quantize is not None:
        return torch.float32, f"{quantize} weights take float32 activations"
    if device.type == "cuda":
        return torch.bfloat16, "CUDA"
    if device.type != "cpu":
        return torch.float32, f"{device.type}"
    if cpu_has_fast_bf16():
        return torch.bfloat16, "this CPU has AMX or AVX512-BF16"
    return torch.float32, "this CPU has no AMX or AVX512-BF16"


def quantize_int8(decoder: nn.Module) -> nn.Module:
    """Quantize the transformer blocks' linear layers of `decoder` to dynamic int8, in place.

    Weights become int8 (per output channel), activations are quantized per batch on the fly, with
    fp32 outputs: PyTorch's fbgemm/oneDNN int8 kernels (VNNI/AMX where the CPU has them). Llama-family
    projections (q/k/v/o, gate/up/down) are `nn.Linear` already; HF GPT-2's are `Conv1D` layers,
    weights [in, out], which `quantize_dynamic` does not know: they become `nn.Linear` first (weight
    transposed). The LM head (often tied to the token embeddings, which must stay float) stays
    float. The decoding engine calls a quantized projection as a module. CPU only: PyTorch has no
    CUDA kernels for these modules."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1], dtype=child.weight.dtype)
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                linear.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(parent, name, linear)
    quantization = torch.ao.quantization
    blocks = {
        name: quantization.per_channel_dynamic_qconfig
        for name, module in decoder.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head"
    }
    with warnings.catch_warnings():  # torch.ao's deprecation notices (torchao replaces it): not the user's concern
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        return quantization.quantize_dynamic(decoder, blocks, dtype=torch.qint8, inplace=True)
