"""torch_elmo.device: the one device policy."""
import pytest
import torch

from torch_elmo.config import ElmoError
from torch_elmo.device import resolve_device


def test_names_defaults_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None, default="cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    with pytest.raises(ElmoError, match=r"^--device gpu0: not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ElmoError, match=r"^--device cuda:1: CUDA is not available on this "
                                            r"machine \(use cpu\)$"):
            resolve_device("cuda:1")
