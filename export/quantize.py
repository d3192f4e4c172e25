"""ONNX Runtime dynamic int8 quantization of the image encoder.

Weights of MatMul/Gemm become int8 (activations are quantized on the fly), which is where a
ViT spends its time. The patch embedding (Conv) and the final projection into the joint
embedding space stay fp32: they are a small share of the FLOPs, and the projection decides the
cosine similarities the head reads, so quantizing it costs the most accuracy per FLOP saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm")


def projection_nodes(model: onnx.ModelProto) -> list[str]:
    """The last MatMul/Gemm before the output: the projection into embedding space."""
    mm = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    return [mm[-1].name] if mm else []


def quantize_int8(src: Path, dst: Path, keep_fp32: list[str] | None = None) -> dict:
    """Write the int8 model to `dst`; returns which nodes were quantized and which were kept."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    exclude = projection_nodes(model) if keep_fp32 is None else keep_fp32
    candidates = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=list(QUANTIZED_OPS),
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=exclude,
    )
    return {
        "quantized_ops": list(QUANTIZED_OPS),
        "quantized_nodes": len([n for n in candidates if n not in exclude]),
        "kept_fp32": exclude,
    }
