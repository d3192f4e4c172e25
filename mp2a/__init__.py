"""mp2a core: artifact format, classification head, preprocessing spec, errors and CLI.

This package imports neither torch nor bentoml at module import, so an edge server can load
an artifact and run ONNX Runtime without the training stack.
"""

__version__ = "0.1.0"
