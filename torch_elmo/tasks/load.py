"""`torch_elmo.load_task(DIR)`: a saved task model directory (saved.py) -> its predictor, a
`Tagger` (ner.py) or a `TextClassifier` (classify.py), on the device asked for."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..device import resolve_device
from . import saved
from .classify import TextClassifier, load_classifier
from .ner import Tagger, load_tagger


def load_task(path: str | os.PathLike, device: Optional[str | torch.device] = None
              ) -> Union[Tagger, TextClassifier]:
    """The predictor of a saved task model (`elmo ner --save DIR`, `elmo classify --save DIR`):
    a `Tagger` (`.predict(texts)` -> tokens, BIO tags, entities) or a `TextClassifier`
    (`.predict(texts)` -> labels, `.predict_proba(texts)` -> probabilities in `classes_` order).
    Every file is checked against the sha256 in task.json first; a directory that is not a saved
    task model (an ELMo model: torch_elmo.load), a changed file or a newer format version is a
    one-line ElmoError. `device`: cpu, cuda, ... (default: cuda when available, else cpu)."""
    meta = saved.read_task(path)
    dev = resolve_device(device, "device=")
    if meta["kind"] == "ner":
        return load_tagger(path, meta, dev)
    return load_classifier(path, meta, dev)
