"""Answer one question per frame of an image sequence (a folder of frames or an animated GIF)
and print the per-frame latency: the loop a robot runs. Torch-free.

    python examples/frame_loop.py BUNDLE FRAMES_DIR_OR_GIF "how many objects are there" [--deadline 0.2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image, ImageSequence

from setok.runtime import Pipeline


def frames(source: Path):
    if source.is_dir():
        for path in sorted(source.iterdir()):
            if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"}:
                yield path.name, path
    else:
        with Image.open(source) as im:
            for i, frame in enumerate(ImageSequence.Iterator(im)):
                yield f"frame {i}", frame.convert("RGB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("source", type=Path)
    ap.add_argument("question")
    ap.add_argument("--deadline", type=float, default=None, help="seconds per answer; partial answers are flagged")
    args = ap.parse_args()
    pipe = Pipeline.open(args.bundle)
    pipe.warmup()
    for name, frame in frames(args.source):
        start = time.perf_counter()
        tokens = pipe.tokenize(frame)  # encode once ...
        answer = pipe.answer(tokens, args.question, deadline=args.deadline)  # ... ask (many)
        ms = (time.perf_counter() - start) * 1000
        flag = "" if answer.complete else " (deadline hit)"
        print(f"{name}: {answer.text!r}{flag}  {tokens.num_tokens} tokens  {ms:.1f} ms")


if __name__ == "__main__":
    main()
