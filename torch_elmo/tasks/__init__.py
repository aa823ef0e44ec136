"""Downstream tasks with ELMo features: text classification (classify.py, `elmo classify`; its
BiLSTM classifier in bilstm.py) and CoNLL-2003 NER (ner.py, `elmo ner`); common.py holds what
they share (data lines, subsampling, the frozen biLM's layers per sentence, word vocabulary and
casing, classification scores). A trained model is saved as a directory (saved.py) and loaded
back as a predictor (load.py's `load_task`: ner.Tagger or classify.TextClassifier; what they
share is in predictor.py). The names below are re-exported for `from torch_elmo.tasks import
...`."""
from .bilstm import BiLSTMClassifier, train_bilstm_classifier
from .classify import (Example, TextClassifier, detect_format, fit_and_score, pool_features,
                       read_examples, read_trec, run_classification, save_classifier)
from .common import embed_layers, subsample
from .load import load_task
from .ner import (BiLSTMCRF, ConllSentence, NerResult, Tagger, iob1_to_bio, ner_scores,
                  read_conll, save_tagger, train_tagger, write_conll)
