"""Interpreting CLIP with a trained SAE (section 5, appendices A and G).

    concepts.py  name neurons with a vocabulary and validate the names (Table 3)
    examples.py  top-activating examples and interval samples per neuron
    search.py    CLIP-space, SAE-space and concept-steered similarity search
    bias.py      probe a downstream classifier for concept associations; counterfactual curves
    space.py     the CLIP <-> SAE bridge they share (encode, decode, edit concepts)
    rows.py      an embedding set with its ids, captions, labels and images
    vocab.py     the shipped vocabulary and the recipe that built it
"""

from .bias import LogisticProbe, bias_analysis, counterfactual_curve, train_logistic_probe
from .concepts import (
    ConceptError,
    ConceptTable,
    concepts_from_matrix,
    embed_vocabulary,
    name_concepts,
    read_vocab_embeddings,
    resolve_neurons,
)
from .examples import save_example_grids, top_activating
from .rows import RowSet, open_rows
from .search import (
    parse_steer,
    parse_steering,
    query_embedding,
    search_clip,
    search_sae,
    shared_concepts,
    similarity_search,
)
from .space import ConceptSpace, Edit, open_space
from .vocab import build_wordfreq_vocabulary, default_vocabulary_path, load_vocabulary

__all__ = [
    "ConceptError", "ConceptSpace", "ConceptTable", "Edit", "LogisticProbe", "RowSet", "bias_analysis",
    "build_wordfreq_vocabulary", "counterfactual_curve", "default_vocabulary_path", "embed_vocabulary",
    "concepts_from_matrix", "load_vocabulary", "name_concepts", "open_rows", "open_space", "parse_steer", "parse_steering",
    "query_embedding", "read_vocab_embeddings", "resolve_neurons", "save_example_grids", "search_clip",
    "search_sae", "shared_concepts", "similarity_search", "top_activating", "train_logistic_probe",
]
