"""Offline adaptation: model loading, prompt learning, feature cache, DigitsDA, tiny CLIP."""
