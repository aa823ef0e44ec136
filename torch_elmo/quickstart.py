"""Quickstart: the README's main job.

Until training lands this embeds the seed's three "plane" sentences with a randomly initialised
tiny biLM and prints the cosine similarities of "plane" across them: identical at layer 0 (the
context-free char-CNN vector), different at layers 1 and 2 (context).
"""
from __future__ import annotations

import numpy as np
import torch

from .config import preset
from .embed import ElmoEmbedder
from .model import BiLM

PLANE_SENTENCES = [
    "The plane took off from the airport .",
    "He used a plane to smooth the wooden board .",
    "A plane is a flat two dimensional surface .",
]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def cli_quickstart(args) -> int:
    torch.manual_seed(0)
    model = BiLM(preset("tiny"))
    embedder = ElmoEmbedder(None, None, model=model)
    tokens = [s.split() for s in PLANE_SENTENCES]
    vectors = embedder.embed_batch(tokens)
    where = [t.index("plane") for t in tokens]
    print("untrained tiny biLM (training arrives with `elmo train`)")
    for layer in range(3):
        v = [vectors[k][layer, where[k]] for k in range(3)]
        sims = [_cosine(v[0], v[1]), _cosine(v[0], v[2]), _cosine(v[1], v[2])]
        print(f"layer {layer}: cos(plane) 1-2 {sims[0]:.4f}  1-3 {sims[1]:.4f}  2-3 {sims[2]:.4f}")
    return 0
