"""Malformed bytes into the image decoder and the manifest loader: a clear error, never a crash."""

import io
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from setok.errors import InputError, SetokError
from setok.manifest import load_manifest
from setok.runtime.preprocess import load_image


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=512),
                      st.builds(lambda cut, flip: bytes(b ^ (0xFF if i == flip else 0) for i, b in enumerate(PNG[:cut])),
                                st.integers(0, len(PNG)), st.integers(0, len(PNG)))))
def test_image_decoder_fuzz(tmp_path, data):
    path = tmp_path / "x.png"
    path.write_bytes(data)
    try:
        out = load_image(path, 16)
    except InputError as e:
        assert str(path) in str(e)
    else:
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                        max_leaves=20),
       raw=st.binary(max_size=64))
def test_manifest_loader_fuzz(tmp_path, doc, raw):
    for content in (json.dumps(doc).encode(), raw, json.dumps({"schema_version": 1, "stages": doc}).encode()):
        (tmp_path / "manifest.json").write_bytes(content)
        try:
            load_manifest(tmp_path)
        except SetokError:
            pass


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # A valid PNG header claiming 10000 x 10000 pixels; the pixel data would be 300 MB.
    Image.new("L", (10000, 10000)).save(tmp_path / "bomb.png", optimize=True)
    try:
        load_image(tmp_path / "bomb.png", 16)
    except InputError as e:
        assert "pixels" in str(e)
    else:
        raise AssertionError("a 100-megapixel image was decoded")
