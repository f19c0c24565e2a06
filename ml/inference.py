"""Which runtime and numeric precision serve CLIP, decided from the settings and from what the hardware has.

Pure decisions, no model loading: the service calls `plan()` at startup (so an impossible choice stops it
with the reason) and again when it loads the model, and the catalog keys its vectors by the plan's
`embedding_model`, so vectors of a reduced precision are never mixed silently with fp32 ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Runtime = Literal["onnx", "torch"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]
RuntimeSetting = Literal["auto", "onnx", "torch"]
PrecisionSetting = Literal["auto", "fp32", "bf16", "int8"]
# Why int8 is refused: it is measured by the bench, not offered (docs/performance.md).
INT8_REFUSED = (
    "INFERENCE_PRECISION=int8 is not offered: ONNX Runtime's dynamic int8 quantization missed the fidelity bound "
    "(lowest centered cosine 0.98 against fp32) on the test models, so its vectors cannot stand in for fp32 ones "
    "(see docs/performance.md); use fp32 or, on a CPU with AVX512_BF16 or AMX, bf16"
)

# What `auto` picks on a CPU, from the bench (docs/performance.md): ONNX Runtime fp32 is faster than PyTorch
# fp32 on the CPUs measured (image and text tower), and its vectors are PyTorch's to 1e-6.
AUTO_CPU_RUNTIME: Runtime = "onnx"
# fp32 on every CPU: bf16 holds its bound in the tests but changes the vectors (a re-embedding), so it is a
# choice to make, not a default.
AUTO_CPU_PRECISION: Precision = "fp32"


class InferenceConfigError(ValueError):
    """A runtime or precision the settings ask for that this machine or model cannot provide."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (`avx512_bf16`, `amx_bf16`, `avx512_vnni`, ...); empty
    where they cannot be read (not Linux), which makes every reduced precision unavailable rather than guessed."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_bf16(flags: frozenset[str]) -> bool:
    """Native bf16 matrix instructions: AVX512_BF16 or AMX (without them torch emulates bf16, slower than fp32)."""
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class InferencePlan:
    """What serves CLIP: a runtime, a precision, a device, and the key its vectors carry in the catalog."""

    runtime: Runtime
    precision: Precision
    device: str
    # The catalog's model key: the model name, with the precision after a `#` when it is not full precision.
    embedding_model: str


def embedding_key(model_name: str, precision: Precision) -> str:
    """fp32 vectors of every runtime are one model's (they agree to 1e-6, see the fidelity tests); CUDA's fp16 is
    the service's historic default there and keeps the plain name. bf16 and int8 vectors are another model's, so
    switching precision re-embeds, as switching CLIP_MODEL_NAME does."""
    return model_name if precision in ("fp32", "fp16") else f"{model_name}#{precision}"


def key_precision(key: str) -> Precision:
    """The precision a catalog key names (the inverse of embedding_key): fp32 when it carries none."""
    _, marker, suffix = key.rpartition("#")
    if marker and suffix == "bf16":
        return "bf16"
    if marker and suffix == "int8":
        return "int8"
    return "fp32"


def plan(
    model_name: str,
    device: str,
    runtime: RuntimeSetting = "auto",
    precision: PrecisionSetting = "auto",
    flags: frozenset[str] | None = None,
) -> InferencePlan:
    """The runtime and precision for `device` (already resolved: cpu, cuda or mps); InferenceConfigError when an
    explicit choice cannot run here, with the reason."""
    flags = cpu_flags() if flags is None else flags
    if device != "cpu":
        if runtime == "onnx":
            raise InferenceConfigError(
                f"INFERENCE_RUNTIME=onnx runs on the CPU only, and CLIP runs on {device}: set CLIP_DEVICE=cpu "
                "or INFERENCE_RUNTIME=torch (or auto)"
            )
        if precision == "int8":
            raise InferenceConfigError(INT8_REFUSED)
        if precision == "bf16" and device == "mps":
            raise InferenceConfigError("INFERENCE_PRECISION=bf16 is not supported on mps")
        chosen: Precision = "bf16" if precision == "bf16" else ("fp16" if device == "cuda" else "fp32")
        return InferencePlan("torch", chosen, device, embedding_key(model_name, chosen))
    if precision == "bf16":
        if not has_bf16(flags):
            raise InferenceConfigError(
                "INFERENCE_PRECISION=bf16 needs a CPU with AVX512_BF16 or AMX, and this one has neither "
                "(without them bf16 is emulated, slower than fp32)"
            )
        if runtime == "onnx":
            raise InferenceConfigError(
                "INFERENCE_PRECISION=bf16 runs on PyTorch (ONNX Runtime has no bf16 kernels for the CPU): set "
                "INFERENCE_RUNTIME=torch or auto"
            )
        return InferencePlan("torch", "bf16", device, embedding_key(model_name, "bf16"))
    if precision == "int8":
        raise InferenceConfigError(INT8_REFUSED)
    chosen_runtime: Runtime = AUTO_CPU_RUNTIME if runtime == "auto" else runtime
    chosen_precision: Precision = "fp32" if precision == "fp32" else AUTO_CPU_PRECISION
    return InferencePlan(chosen_runtime, chosen_precision, device, embedding_key(model_name, chosen_precision))
