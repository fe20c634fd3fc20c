"""The KV-cache decoders: ONNX Runtime's I/O-bound decoder against the plain numpy-cache loop."""

import numpy as np

from setok.backends.decode import HostDecoder
from setok.backends.onnxrt.decoder import OrtDecoder
from setok.data.items import eval_items
from setok.runtime import Pipeline


def test_io_bound_decoder_matches_the_host_loop(tiny_bundle):
    pipe = Pipeline.open(tiny_bundle)
    vt = pipe.tokenize(eval_items(1, seed=5)[0].image)
    embeds, _ = pipe.prompt(vt, pipe.prompts["caption"])
    ort_dec = pipe.decoder()
    host = HostDecoder(pipe.stage("llm"), pipe.manifest.stage("llm"))
    assert isinstance(ort_dec, OrtDecoder)
    a, b = ort_dec.step(embeds), host.step(embeds)
    for _ in range(6):  # feed the same greedy token to both; the caches must stay in step
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5)
        tok = pipe.embeddings[[int(np.argmax(b[0][0]))]][None]
        a, b = ort_dec.step(tok), host.step(tok)
    assert ort_dec.length == host.length == embeds.shape[1] + 6
    # The cache stays inside ONNX Runtime: OrtValues, not numpy arrays.
    assert ort_dec.past and not any(isinstance(v, np.ndarray) for v in ort_dec.past.values())
