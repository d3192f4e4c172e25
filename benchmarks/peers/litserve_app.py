"""The same encoder and head as a LitServe API, written as LitServe's docs recommend:
decode_request / predict / encode_response, dynamic batching (max_batch_size, batch_timeout)
with the batched predict taking the stacked inputs.

`python litserve_app.py PORT` (in the peers' virtual environment).
"""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np
from common import Model


class ClipAPI(ls.LitAPI):
    def setup(self, device):
        self.model = Model()

    def decode_request(self, request):
        return self.model.preprocess(request["image"].file.read())  # (3, S, S)

    def batch(self, inputs):
        return np.stack(inputs)  # (B, 3, S, S)

    def predict(self, x):
        return self.model.predict(x)  # (B, C)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return self.model.answer(output)


if __name__ == "__main__":
    api = ClipAPI(max_batch_size=32, batch_timeout=0.005)
    server = ls.LitServer(api, accelerator="cpu", timeout=300)
    server.run(port=int(sys.argv[1]), host="127.0.0.1", generate_client_file=False)
