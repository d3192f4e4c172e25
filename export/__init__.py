"""Export of the frozen image tower (ONNX fp32/int8, TensorRT) with parity reports."""
