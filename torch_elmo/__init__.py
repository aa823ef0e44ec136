"""torch-elmo: train, evaluate, export and use ELMo (Peters et al., 2018) in PyTorch."""
from .chars import batch_to_ids
from .config import ElmoError, Options, preset, read_options, write_options
from .embed import ElmoEmbedder
from .token_cache import TokenEmbeddingCache, dump_token_embeddings
from .export import export_model, load_bilm, load_weights, save_weights
from .model import BiLM
from .modules import Elmo, ElmoModel, ScalarMix, load
from .vocab import Vocabulary

__version__ = "0.1.0"

# saved task models (elmo ner / classify --save): imported on first use, so that `import
# torch_elmo` does not import scikit-learn, skops or safetensors
_TASK_NAMES = ("load_task", "Tagger", "TextClassifier")


def __getattr__(name):
    if name in _TASK_NAMES:
        from . import tasks
        return getattr(tasks, name)
    raise AttributeError(f"module 'torch_elmo' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_TASK_NAMES))
