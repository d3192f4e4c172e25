"""The BentoML prediction service: HTTP routes, decoding, predictor, micro-batching, backends."""
