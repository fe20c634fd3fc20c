"""Ask a question about an image through a Triton server serving a setok model repository.

    setok-side:  python -c "from setok.serve import export_triton; export_triton('BUNDLE', 'REPO')"
    server:      tritonserver --model-repository REPO
    client:      python examples/triton_client.py IMAGE "what is in the picture" [--url localhost:8000]

Needs `pip install tritonclient[http] pillow numpy`; no torch, no setok.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

MODEL = "setok_pipeline"


def load_rgb(path: str) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)  # (H, W, 3)


def ask(url: str, image: np.ndarray, question: str) -> tuple[str, int]:
    try:
        import tritonclient.http as httpclient
    except ImportError:
        sys.exit("this example needs the Triton client: pip install 'tritonclient[http]'")
    client = httpclient.InferenceServerClient(url=url)
    inputs = [httpclient.InferInput("IMAGE", list(image.shape), "UINT8"),
              httpclient.InferInput("QUESTION", [1], "BYTES")]
    inputs[0].set_data_from_numpy(image)
    inputs[1].set_data_from_numpy(np.array([question.encode("utf-8")], dtype=np.object_))
    outputs = [httpclient.InferRequestedOutput("TEXT"), httpclient.InferRequestedOutput("NUM_TOKENS")]
    result = client.infer(MODEL, inputs, outputs=outputs)
    text = result.as_numpy("TEXT").reshape(-1)[0]
    return (text.decode("utf-8") if isinstance(text, bytes) else str(text)), int(result.as_numpy("NUM_TOKENS")[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("question")
    ap.add_argument("--url", default="localhost:8000", help="Triton HTTP endpoint (host:port)")
    args = ap.parse_args()
    answer, k = ask(args.url, load_rgb(args.image), args.question)
    print(f"{answer}  ({k} vision tokens)")


if __name__ == "__main__":
    main()
