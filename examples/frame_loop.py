"""Answer one question per frame of an image sequence (a folder of frames or an animated GIF)
and print the per-frame latency and where things are, in the frame's own pixels: the loop a
robot runs. Torch-free.

    python examples/frame_loop.py BUNDLE FRAMES_DIR_OR_GIF "how many objects are there" \\
        [--segment "the red circle"] [--letterbox] [--deadline 0.2]

Each line: the answer, the token count, boxes [x0, y0, x1, y1) in frame pixels (the segmented
object's with --segment, else every token's), the latency. The question comes before the image in
the prompt, so from the second frame on its KV comes from the pipeline's prefix cache.
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
    ap.add_argument("--segment", default=None, help="a referring expression: print its box and centroid per frame")
    ap.add_argument("--letterbox", action="store_true", help="pad frames to the model's square instead of cropping")
    ap.add_argument("--deadline", type=float, default=None, help="seconds per answer; partial answers are flagged")
    args = ap.parse_args()
    with Pipeline.open(args.bundle, letterbox=args.letterbox or None) as pipe:
        pipe.warmup()
        for name, frame in frames(args.source):
            start = time.perf_counter()
            tokens = pipe.tokenize(frame)  # encode once ...
            answer = pipe.answer(tokens, args.question, deadline=args.deadline)  # ... ask (many)
            if args.segment:
                m = pipe.segment(tokens, args.segment)
                where = f"box {list(m.box) if m.box else None} centroid {_point(m.centroid)}"
            else:
                where = f"boxes {[b for b in tokens.boxes.tolist() if b[0] >= 0]}"
            ms = (time.perf_counter() - start) * 1000
            flag = "" if answer.complete else " (deadline hit)"
            w, h = tokens.frame_size
            print(f"{name}: {answer.text!r}{flag}  {tokens.num_tokens} tokens  {w}x{h} {where}  {ms:.1f} ms")


def _point(p):
    return None if p is None else [round(v, 1) for v in p]


if __name__ == "__main__":
    main()
