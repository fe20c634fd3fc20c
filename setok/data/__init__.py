"""Training data: deterministic synthetic scenes and user image/caption folders (numpy + PIL only)."""

from setok.data.folder import Sample, load_folder
from setok.data.scenes import (
    COLORS,
    EVAL_SEED_BASE,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN_SEED_BASE,
    Scene,
    SceneObject,
    make_scene,
    scene_batch,
    text_corpus,
)
from setok.runtime.preprocess import load_image

__all__ = [
    "COLORS",
    "EVAL_SEED_BASE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TRAIN_SEED_BASE",
    "Sample",
    "Scene",
    "SceneObject",
    "load_folder",
    "load_image",
    "make_scene",
    "scene_batch",
    "text_corpus",
]
