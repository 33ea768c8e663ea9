"""Concept naming and its validations (section 5.1, appendix A).

A vocabulary is embedded with the CLIP text tower, given the SAE's *text* preprocessing
(mean and scale of section 3), and compared by cosine with the unit-norm decoder directions
(sae-lens's W_dec rows, the paper's decoder columns). The paper keeps b_pre (= b_dec) in the
vocabulary embeddings: removing it, as Rao et al. (2024) do, squeezes similarities to about 0.1
while keeping 95% of the rankings (figure 9). `remove_b_pre=True` gives that variant.

Validations, per neuron n (Table 3):
  * every concept v picks its best neuron n*(v) = argmax_n cos(n, v). A neuron that is n*(v) for
    at least one v is a *best vector*; among those concepts it keeps one, the most similar
    (validation 3, "one concept per neuron"), as its label. Other neurons are labelled with
    their most similar concept.
  * above_threshold: the neuron's highest similarity exceeds `threshold` (0.42; validation 1).
  * above_and_best: a best vector whose label's similarity exceeds `threshold`.
  * ratio: the label's similarity is more than `ratio` (2) times that of the next most similar
    concept (validation 2). A label that is not the neuron's top concept fails it. When the
    runner-up similarity is <= 0 the ratio is infinite (stored as null) and the test passes.
  * all: above_and_best and ratio.
The authors' public code implements none of these validations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..normalization import ModalityStats, get_stats
from .vocab import VocabularyError

VALIDATIONS = ("above_threshold", "best_vector", "above_and_best", "ratio", "all")


class ConceptError(ValueError):
    pass


def embed_vocabulary(words: list[str], clip, batch_size: int = 256, template: str = "{}",
                     precision: str = "fp32", progress: bool = True) -> np.ndarray:
    """CLIP text embeddings (encode_text, not L2-normalised) of `template.format(word)` per word."""
    from ..embed.extract import batch_indices, encode_texts

    if "{}" not in template:
        raise ConceptError(f"template {template!r} must contain '{{}}' where the word goes")
    out = []
    for idx in tqdm(batch_indices(0, len(words), batch_size), desc="vocabulary", unit="batch", disable=not progress):
        out.append(encode_texts(clip, [template.format(words[i]) for i in idx], precision))
    return np.concatenate(out).astype(np.float32)


def read_vocab_embeddings(path: str | Path, words: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Precomputed vocabulary embeddings: an .npy aligned with `words`, or a text cache written by
    `msae embed --modality text --dataset text:WORDS.txt` (its captions are the words)."""
    path = Path(path)
    if path.is_dir():
        from ..embed.extract import load_embeddings

        emb = load_embeddings(path)
        if emb.captions is None:
            raise ConceptError(f"{path}: the cache has no captions, so its rows cannot be matched to words")
        if emb.failed:
            raise ConceptError(f"{path}: {len(emb.failed)} vocabulary items failed to embed; rows are not aligned")
        cache_words = [c.strip() for c in emb.captions]
        if words is not None and cache_words != words:
            diff = next(i for i, (a, b) in enumerate(zip(cache_words + [None] * len(words), words)) if a != b)
            raise ConceptError(f"{path}: the cache's captions differ from the vocabulary at row {diff} "
                               f"({cache_words[diff] if diff < len(cache_words) else 'missing'!r} vs {words[diff]!r})")
        return np.asarray(emb.matrix, dtype=np.float32), cache_words
    if path.suffix != ".npy":
        raise ConceptError(f"{path}: vocabulary embeddings must be an .npy file or an `msae embed` text cache")
    if not path.exists():
        raise ConceptError(f"{path}: no such file")
    if words is None:
        raise ConceptError(f"{path}: an .npy of vocabulary embeddings needs --vocab WORDS.txt, one word per row")
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ConceptError(f"{path}: unreadable or truncated: {e}") from e
    if matrix.ndim != 2 or matrix.shape[0] != len(words):
        raise ConceptError(f"{path}: shape {matrix.shape}, expected ({len(words)}, d) for {len(words)} words")
    return np.asarray(matrix, dtype=np.float32), words


def prepare_vocabulary(vocab_embeddings: np.ndarray | torch.Tensor, stats: ModalityStats,
                       b_dec: torch.Tensor | None) -> torch.Tensor:
    """Unit-norm vocabulary directions in SAE input space: s (e - mu) [- b_pre]."""
    e = torch.as_tensor(np.array(vocab_embeddings, dtype=np.float32))  # a copy: inputs may be read-only mmaps
    if not torch.isfinite(e).all():
        bad = int((~torch.isfinite(e)).any(-1).nonzero()[0, 0])
        raise ConceptError(f"vocabulary embedding row {bad} is not finite")
    v = stats.apply(e)
    if b_dec is not None:
        v = v - b_dec.detach().float().cpu()
    return torch.nn.functional.normalize(v, dim=-1)


@dataclass
class Similarities:
    """What the validations need from the (d_sae x n_words) cosine matrix, computed in blocks."""

    top_values: torch.Tensor  # (d_sae, m) each neuron's m highest similarities, best first
    top_words: torch.Tensor  # (d_sae, m) their word indices
    best_neuron: torch.Tensor  # (n_words,) argmax over neurons, per word
    best_value: torch.Tensor  # (n_words,)


@torch.no_grad()
def concept_similarities(decoder: torch.Tensor, vocab: torch.Tensor, top: int = 5,
                         block: int = 2048, progress: bool = False) -> Similarities:
    """Cosine of every decoder direction with every (unit-norm) vocabulary direction, kept as
    per-neuron top-`top` lists and per-word best neurons; never the whole matrix at once."""
    d_sae, n_words = decoder.shape[0], vocab.shape[0]
    m = min(max(top, 2), n_words)
    vocab = vocab.to(decoder.device, torch.float32)
    top_values = torch.empty(d_sae, m)
    top_words = torch.empty(d_sae, m, dtype=torch.long)
    best_value = torch.full((n_words,), -float("inf"))
    best_neuron = torch.zeros(n_words, dtype=torch.long)
    for s in tqdm(range(0, d_sae, block), desc="concepts", unit="block", disable=not progress):
        d = torch.nn.functional.normalize(decoder[s : s + block].float(), dim=-1)
        sims = d @ vocab.T  # (b, n_words)
        v, i = sims.topk(m, dim=-1)
        top_values[s : s + len(d)], top_words[s : s + len(d)] = v.cpu(), i.cpu()
        bv, bn = sims.max(dim=0)
        better = bv.cpu() > best_value
        best_value = torch.where(better, bv.cpu(), best_value)
        best_neuron = torch.where(better, bn.cpu() + s, best_neuron)
    return Similarities(top_values, top_words, best_neuron, best_value)


@torch.no_grad()
def similarities_from_matrix(matrix: np.ndarray, top: int = 5, block: int = 2048,
                             progress: bool = False) -> Similarities:
    """The same summary from a precomputed (n_words, d_sae) similarity matrix (the authors' concept
    interpreter), read a block of words at a time so a memory-mapped file is never loaded whole."""
    n_words, d_sae = matrix.shape
    m = min(max(top, 2), n_words)
    top_values = torch.full((d_sae, m), -float("inf"))
    top_words = torch.zeros(d_sae, m, dtype=torch.long)
    best_value = torch.empty(n_words)
    best_neuron = torch.empty(n_words, dtype=torch.long)
    for s in tqdm(range(0, n_words, block), desc="concepts", unit="block", disable=not progress):
        sims = torch.from_numpy(np.array(matrix[s : s + block], dtype=np.float32))  # (b, d_sae)
        if not torch.isfinite(sims).all():
            bad = s + int((~torch.isfinite(sims)).any(-1).nonzero()[0, 0])
            raise ConceptError(f"similarity matrix row {bad} is not finite")
        best_value[s : s + len(sims)], best_neuron[s : s + len(sims)] = sims.max(dim=1)
        v, i = torch.cat([top_values, sims.T], dim=1).topk(m, dim=1)  # running top-m per neuron
        words_here = torch.arange(s, s + len(sims)).expand(d_sae, -1)
        top_words = torch.cat([top_words, words_here], dim=1).gather(1, i)
        top_values = v
    return Similarities(top_values, top_words, best_neuron, best_value)


def concepts_document(sims: Similarities, words: list[str], settings: dict[str, Any], *, threshold: float = 0.42,
                      ratio: float = 2.0, top: int = 5) -> dict[str, Any]:
    """The concepts.json body: settings, Table 3 counts, per-neuron names and per-word best neurons."""
    body = validate(sims, words, threshold=threshold, ratio=ratio, top=top)
    words_best = [{"word": w, "neuron": int(n), "similarity": float(v)}
                  for w, n, v in zip(words, sims.best_neuron.tolist(), sims.best_value.tolist())]
    return {"format": "msae-concepts",
            "settings": {"threshold": threshold, "ratio": ratio, "top": top, "n_words": len(words),
                         "d_sae": int(sims.top_values.shape[0]), **settings},
            **body, "words": words_best}


def concepts_from_matrix(matrix: np.ndarray, words: list[str], *, threshold: float = 0.42, ratio: float = 2.0,
                         top: int = 5, source: str = "similarity matrix", progress: bool = False) -> dict[str, Any]:
    """Names and validations (module docstring) from a precomputed (n_words, d_sae) similarity
    matrix, exactly as `name_concepts` computes them from embeddings."""
    if len(words) != matrix.shape[0]:
        raise ConceptError(f"{len(words)} words but the similarity matrix has {matrix.shape[0]} rows")
    if len(words) < 2:
        raise VocabularyError("the ratio validation needs at least two words in the vocabulary")
    sims = similarities_from_matrix(matrix, top=top, progress=progress)
    return concepts_document(sims, words, {"similarities": source}, threshold=threshold, ratio=ratio, top=top)


def validate(sims: Similarities, words: list[str],
             threshold: float = 0.42, ratio: float = 2.0, top: int = 5) -> dict[str, Any]:
    """Appendix A's validations (module docstring) -> the concepts.json body (counts and neurons)."""
    d_sae = sims.top_values.shape[0]
    # validation 3: one concept per neuron, the most similar among the words it is best for
    assigned: dict[int, int] = {}
    for w, n in enumerate(sims.best_neuron.tolist()):
        if n not in assigned or sims.best_value[w] > sims.best_value[assigned[n]]:
            assigned[n] = w
    best_for: dict[int, list[int]] = {}
    for w, n in enumerate(sims.best_neuron.tolist()):
        best_for.setdefault(n, []).append(w)
    counts = dict.fromkeys(VALIDATIONS, 0)
    neurons = []
    top_values, top_words = sims.top_values.tolist(), sims.top_words.tolist()
    for n in range(d_sae):
        first_sim, first_word = top_values[n][0], top_words[n][0]
        if n in assigned:
            label = assigned[n]
            label_sim = float(sims.best_value[label])
        else:
            label, label_sim = first_word, first_sim
        # runner-up: the best similarity among the other words
        runner = top_values[n][1] if label == first_word else first_sim
        r = label_sim / runner if runner > 0 else (float("inf") if label_sim > 0 else 0.0)
        passed = {
            "above_threshold": first_sim > threshold,
            "best_vector": n in assigned,
            "above_and_best": n in assigned and label_sim > threshold,
            "ratio": r > ratio,
        }
        passed["all"] = passed["above_and_best"] and passed["ratio"]
        for key, ok in passed.items():
            counts[key] += int(ok)
        neurons.append({
            "index": n,
            "label": words[label],
            "similarity": label_sim,
            "ratio": None if r == float("inf") else r,
            "concepts": [[words[w], v] for w, v in zip(top_words[n][:top], top_values[n][:top])],
            "valid": [k for k in VALIDATIONS if passed[k]],
            "best_vector_for": [words[w] for w in sorted(best_for.get(n, []), key=lambda w: -float(sims.best_value[w]))][:top],
        })
    return {"counts": counts, "neurons": neurons}


def name_concepts(sae, vocab_embeddings: np.ndarray | torch.Tensor, words: list[str], *,
                  threshold: float = 0.42, ratio: float = 2.0, top: int = 5, remove_b_pre: bool = False,
                  stats_modality: str = "text", stats: ModalityStats | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Name every neuron of `sae` with the vocabulary and run the validations (module docstring).

    `vocab_embeddings` are raw CLIP text embeddings, one row per word. The text statistics saved
    with the SAE are applied (`msae stats --modality text` attaches them to an image-trained SAE).
    """
    if len(words) != len(vocab_embeddings):
        raise ConceptError(f"{len(words)} words but {len(vocab_embeddings)} vocabulary embeddings")
    if len(words) < 2:
        raise VocabularyError("the ratio validation needs at least two words in the vocabulary")
    d = np.asarray(vocab_embeddings).shape[-1]
    if d != sae.cfg.d_in:
        raise ConceptError(f"vocabulary embeddings have dimension {d}, the SAE has d_in={sae.cfg.d_in} "
                           "(are they from the same CLIP model?)")
    stats = stats if stats is not None else get_stats(sae, stats_modality)
    vocab = prepare_vocabulary(vocab_embeddings, stats, sae.b_dec if remove_b_pre else None)
    sims = concept_similarities(sae.W_dec.detach(), vocab, top=top, progress=progress)
    return concepts_document(sims, words, {"keep_b_pre": not remove_b_pre, "stats_modality": stats_modality},
                             threshold=threshold, ratio=ratio, top=top)


class ConceptTable:
    """A concepts.json read back: neuron labels and name -> neuron lookup."""

    def __init__(self, data: dict[str, Any], source: str = "concepts"):
        if data.get("format") != "msae-concepts":
            raise ConceptError(f"{source}: not a concepts file written by `msae concepts`")
        self.data = data
        self.source = source
        self.neurons = data["neurons"]
        self.labels = [n["label"] for n in self.neurons]
        self.valid = [("all" in n["valid"]) for n in self.neurons]
        self._word_best = {w["word"]: w["neuron"] for w in data.get("words", [])}

    @classmethod
    def load(cls, path: str | Path) -> "ConceptTable":
        path = Path(path)
        try:
            return cls(json.loads(path.read_text()), str(path))
        except FileNotFoundError:
            raise ConceptError(f"{path}: no such concepts file (write one with `msae concepts`)") from None
        except json.JSONDecodeError as e:
            raise ConceptError(f"{path}: corrupt concepts file: {e}") from e

    def resolve(self, name: str) -> int:
        """'#123' or '123' is a neuron index; a word is the neuron labelled with it (the most
        similar if several, valid ones first), else the word's best neuron."""
        name = name.strip()
        if name.lstrip("#").isdigit():
            i = int(name.lstrip("#"))
            if not 0 <= i < len(self.neurons):
                raise ConceptError(f"neuron {i} does not exist; the SAE has {len(self.neurons)} latents")
            return i
        labelled = [n for n in self.neurons if n["label"] == name]
        if labelled:
            best = max(labelled, key=lambda n: ("all" in n["valid"], n["similarity"]))
            return int(best["index"])
        if name in self._word_best:
            return int(self._word_best[name])
        raise ConceptError(f"{name!r} is neither a neuron index nor a word of {self.source}'s vocabulary")



def resolve_neurons(names: list[str], table: ConceptTable | None) -> list[int]:
    """Neuron indices from concept words (which need a concepts table) or '#123' / '123'."""
    out = []
    for name in names:
        if table is not None:
            out.append(table.resolve(name))
        elif name.strip().lstrip("#").isdigit():
            out.append(int(name.strip().lstrip("#")))
        else:
            raise ConceptError(f"{name!r}: naming a concept by word needs a concepts file (`msae concepts`); "
                               "or give a neuron as #INDEX")
    return out
