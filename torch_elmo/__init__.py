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
