"""What the trainer and evaluator consume: TrainItem, from synthetic scenes or a user folder.

A stream is a pure function of (seed, step): batch(step, B) always returns the same items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from setok.data.scenes import EVAL_SEED_BASE, Scene, make_scene, text_corpus

SEED_SPACE = EVAL_SEED_BASE  # training seeds live in [0, EVAL_SEED_BASE)


@dataclass
class TrainItem:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    instance_mask: np.ndarray | None = None  # (H, W) int64, 0 = background
    concepts: list[str] = field(default_factory=list)  # one per instance id 1..M
    qa: list[tuple[str, str]] = field(default_factory=list)
    referring: list[tuple[str, np.ndarray]] = field(default_factory=list)
    num_objects: int | None = None


def from_scene(scene: Scene) -> TrainItem:
    concepts = [f"{o.size} {o.color} {o.shape}" for o in scene.objects]
    return TrainItem(scene.image, scene.caption, scene.instance_mask, concepts, scene.qa,
                     scene.referring, len(scene.objects))


class SceneStream:
    has_masks = True

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def batch(self, step: int, n: int) -> list[TrainItem]:
        base = (self.seed * 1_000_003 + step * n) % SEED_SPACE
        return [from_scene(make_scene((base + i) % SEED_SPACE, self.size)) for i in range(n)]

    def corpus(self) -> list[str]:
        return text_corpus(3000, seed=self.seed, size=self.size)


class FolderStream:
    """A user's image-caption folder: captions only, so no grouping / QA / referring losses."""

    has_masks = False

    def __init__(self, path: str | Path, size: int, seed: int):
        from setok.data.folder import load_folder

        self.samples = load_folder(path)
        self.size, self.seed = size, seed

    def batch(self, step: int, n: int) -> list[TrainItem]:
        from setok.runtime.preprocess import load_image

        rng = random.Random(self.seed * 1_000_003 + step)
        picks = [rng.randrange(len(self.samples)) for _ in range(n)]
        return [TrainItem(load_image(self.samples[i].image_path, self.size), self.samples[i].text) for i in picks]

    def corpus(self) -> list[str]:
        return [s.text for s in self.samples] + text_corpus(200, seed=self.seed, size=self.size)


def item_stream(data: str, size: int, seed: int):
    return SceneStream(size, seed) if data == "synthetic" else FolderStream(data, size, seed)


def eval_items(n: int, seed: int, size: int = 64) -> list[TrainItem]:
    """Held-out scenes: seeds from EVAL_SEED_BASE up, disjoint from every training seed."""
    return [from_scene(make_scene(EVAL_SEED_BASE + seed * 100_003 + i, size)) for i in range(n)]
