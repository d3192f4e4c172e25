"""The same encoder and head as a plain BentoML service, written as BentoML's docs teach:
a `@bentoml.service` class that loads the model in `__init__` and one
`@bentoml.api(batchable=True)` method over a list of PIL images (adaptive batching), at most
32 per batch; `max_latency_ms` is BentoML's default (60 s): with the 1 s of the docs' example
BentoML answered 503 to every request that waited longer, which at c = 32 on large photos
was most of them (where the service answers them all).

`bentoml serve bentoml_app:Classifier --port PORT` (in the peers' virtual environment).
"""

from __future__ import annotations

import bentoml
import numpy as np
from common import Model
from PIL.Image import Image


@bentoml.service(traffic={"timeout": 300})
class Classifier:
    def __init__(self) -> None:
        self.model = Model()

    @bentoml.api(route="/predict", batchable=True, max_batch_size=32)
    def predict(self, image: list[Image]) -> list[dict]:
        x = np.stack([self.model.preprocess_image(im) for im in image])  # (B, 3, S, S)
        return [self.model.answer(p) for p in self.model.predict(x)]
