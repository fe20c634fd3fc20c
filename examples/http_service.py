"""A minimal HTTP service over the runtime (standard library only, one thread per request).

For serving, use `setok serve BUNDLE` (pip install 'setok[serve]'): an OpenAI-compatible API
with batching, admission control, auth and metrics (README, "Serving"). This file shows how
little the runtime needs when a dependency-free endpoint is all you want.

    python examples/http_service.py BUNDLE [--port 8008]
    curl -s localhost:8008/answer -H 'Content-Type: application/json' \\
         -d '{"image": "'"$(base64 -w0 scene.png)"'", "question": "how many objects are there"}'

POST /answer {"image": base64 PNG/JPEG, "question": str, "deadline": seconds?}
  -> {"text", "complete", "num_tokens", "frame", "boxes", "timings_ms"}
POST /caption {"image": ...} -> the same keys.
POST /segment {"image": ..., "expression": str} -> {"box", "centroid", "area", "frame", "boxes", "timings_ms"}
GET /health -> {"ok": true}.
Positions are in the posted image's pixels: "boxes" holds each vision token's [x0, y0, x1, y1)
(x1, y1 exclusive; null for a token the frame does not show), "frame" the mapping to the model's
square input ({"frame_size": [w, h], "crop_box": [x0, y0, x1, y1], "scale": [sx, sy], "mode"}).
Bad input answers 400 with {"error": "..."}; the Pipeline is thread-safe, so requests run in parallel.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from setok.errors import SetokError
from setok.runtime import Pipeline


def make_handler(pipe: Pipeline) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's method naming
            if self.path == "/health":
                self._send(200, {"ok": True})
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            if self.path not in ("/answer", "/caption", "/segment"):
                return self._send(404, {"error": f"no route {self.path}; expected /answer, /caption or /segment"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                image = Image.open(io.BytesIO(base64.b64decode(body["image"], validate=True)))
                tokens = pipe.tokenize(image)
                where = {"frame": tokens.frame.to_dict(),
                         "boxes": [b if b[0] >= 0 else None for b in tokens.boxes.tolist()]}
                if self.path == "/segment":
                    m = pipe.segment(tokens, body.get("expression", ""))
                    return self._send(200, {"box": list(m.box) if m.box else None, "area": m.area,
                                            "centroid": [round(v, 2) for v in m.centroid] if m.centroid else None,
                                            **where, "timings_ms": _ms(m.timings)})
                if self.path == "/answer":
                    out = pipe.answer(tokens, body.get("question", ""), deadline=body.get("deadline"))
                else:
                    out = pipe.caption(tokens, deadline=body.get("deadline"))
            except (KeyError, ValueError, binascii.Error, OSError, SetokError) as e:
                return self._send(400, {"error": f"{type(e).__name__}: {e}"})
            self._send(200, {"text": out.text, "complete": out.complete, "num_tokens": tokens.num_tokens, **where,
                             "timings_ms": _ms(out.timings)})

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args) -> None:  # quiet: one line per request is noise for a robot
            pass

    return Handler


def _ms(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1000, 3) for k, v in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--port", type=int, default=8008)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--letterbox", action="store_true", help="pad images to the model's square instead of cropping")
    args = ap.parse_args()
    pipe = Pipeline.open(args.bundle, letterbox=args.letterbox or None)
    pipe.warmup()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(pipe))
    print(f"serving {args.bundle} on http://{args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
