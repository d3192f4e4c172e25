"""TensorRT engine for the image encoder: dynamic batch profile, FP16 where it helps.

TensorRT 10 takes precision as builder flags (FP16); TensorRT 11 networks are strongly typed,
so FP16 comes from the ONNX graph's own types and the flag is not used. Both are handled.
`tensorrt` is an optional extra (`pip install mp2a[gpu]`) and needs an NVIDIA GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mp2a.errors import ExportError
from mp2a.runtime import has_nvidia_gpu

log = logging.getLogger(__name__)


def require_gpu() -> None:
    import torch

    if not (has_nvidia_gpu() and torch.cuda.is_available()):
        raise ExportError(
            "--format tensorrt needs a CUDA GPU and the gpu extra (pip install 'mp2a[gpu]'); "
            "no CUDA device is visible here, use --format onnx or onnx-int8"
        )
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise ExportError(
            "--format tensorrt needs the tensorrt package: pip install 'mp2a[gpu]'"
        ) from e


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    image_size: int,
    batch: tuple[int, int, int] = (1, 8, 32),
    fp16: bool = True,
) -> dict:
    """Build and serialise an engine with a (min, opt, max) batch profile."""
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
    used_fp16 = False
    if fp16 and major < 11 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        used_fp16 = True
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    shape = lambda b: (b, 3, image_size, image_size)  # noqa: E731
    profile.set_shape(name, shape(batch[0]), shape(batch[1]), shape(batch[2]))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT engine build failed; run with -v for the builder log")
    engine_path.write_bytes(bytes(serialized))
    return {"tensorrt": trt.__version__, "fp16": used_fp16, "profile": list(batch)}


class TrtEncoder:
    """Runs a serialised engine on torch CUDA tensors: (B, 3, S, S) -> (B, D) numpy."""

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt
        import torch

        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.inp = self.engine.get_tensor_name(0)
        self.out = self.engine.get_tensor_name(1)

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32)).cuda()
        self.context.set_input_shape(self.inp, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.out))
        y = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.inp, x.data_ptr())
        self.context.set_tensor_address(self.out, y.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        return y.cpu().numpy()
