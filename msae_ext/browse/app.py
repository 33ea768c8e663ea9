"""The concept browser's data: every page of `msae serve` and `msae dashboard` as a JSON-ready dict.

A `Browser` holds an SAE, its latent index over an embedding set (`interpret.index`: one streamed
pass, cached next to the SAE and reused while the SAE and the data are unchanged), its concept
names (`msae concepts`), the rows' captions and images, and optionally the encoder that embeds a
typed text or an uploaded image (a CLIP model, or the wordllama stand-in for CLIP's text tower).
The server and the static export call the same methods, so a notebook can too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import write_text_atomic
from ..interpret.concepts import ConceptTable
from ..interpret.index import META_FILE, LatentIndex, build_index
from ..interpret.rows import RowSet, open_rows
from ..interpret.search import query_embedding, similarity_search
from ..interpret.space import ConceptSpace, Edit
from ..store import check_dimension, read_all

#: latents a query lists, neighbours a steered search returns
QUERY_LATENTS, NEIGHBOURS = 16, 8


class BrowserError(ValueError):
    """Bad input to the browser: an unknown latent or concept, a query it cannot embed, bad data."""


def fingerprint(sae, source, modality: str, protocol: str = "paper") -> str:
    """What an index depends on: the SAE's weights, the data (description and size), the
    statistics applied to it and the inference protocol. A changed SAE or data set gets a new index."""
    h = hashlib.sha256()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        h.update(getattr(sae, name).detach().float().cpu().numpy().tobytes())
    where = Path(source.description)
    h.update(json.dumps([str(where.resolve()) if where.exists() else source.description, source.n_rows,
                         source.d_in, modality, protocol]).encode())
    return h.hexdigest()[:16]


def default_index_dir(sae_ref: str | Path, source, protocol: str = "paper") -> Path:
    """browser_index/<data>-<rows>[-native] inside an SAE folder; under the msae_ext cache for a release."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(Path(source.description).parts[-2:]))[-60:]
    name = f"{slug}-{source.n_rows}" + ("" if protocol == "paper" else f"-{protocol}")
    if Path(sae_ref).is_dir():
        return Path(sae_ref) / "browser_index" / name
    cache = Path(os.environ.get("MSAE_CACHE") or Path.home() / ".cache" / "msae_ext")
    return cache / "browser_index" / re.sub(r"[^A-Za-z0-9_.-]+", "_", str(sae_ref)) / name


class Browser:
    def __init__(self, space: ConceptSpace, rows: RowSet, index: LatentIndex, table: ConceptTable | None = None,
                 encoder: Any = None, name: str = "SAE", protocol: str = "paper", data_name: str | None = None):
        self.space, self.rows, self.index, self.table, self.encoder, self.name = space, rows, index, table, encoder, name
        self.protocol = protocol  # how the index and queries encode: 'paper' (ReLU only) or 'native'
        self.data_name = data_name  # the data as the user named it (the index records its resolved path)
        self._lock = threading.Lock()  # one encode at a time: the server answers from several threads
        self._summaries: list[dict[str, Any]] | None = None
        self._list_json: bytes | None = None

    # -- the pages -----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        cfg = self.space.sae.cfg
        return {"name": self.name, "architecture": cfg.architecture(), "protocol": self.protocol, "d_in": cfg.d_in,
                "d_sae": cfg.d_sae, "modality": self.space.modality, "data": self.data_name or self.index.meta["data"],
                "n_rows": self.index.meta["n_rows"],
                "levels": self.index.meta["levels"], "has_concepts": self.table is not None,
                "concept_counts": self.table.data.get("counts") if self.table else None,
                "query_text": self.encoder is not None, "query_image": self._embeds_images(),
                "data_modality": self.rows.modality}

    def latents(self, query: str = "", sort: str = "frequency", valid_only: bool = False,
                limit: int | None = None) -> list[dict[str, Any]]:
        """The latent list: matching `query` (a substring of the name, or #index), sorted by firing
        frequency, maximum activation or nesting level (coarsest first)."""
        try:
            order = self.index.order(query, sort, self.table.valid if self.table else None, valid_only, limit)
        except ValueError as e:
            raise BrowserError(str(e)) from None
        if self._summaries is None:  # every latent's row of the list, made once (5 significant digits)
            self._summaries = [self._with_validation({k: float(f"{v:.5g}") if isinstance(v, float) else v
                                                      for k, v in self.index.summary(j).items()})
                               for j in range(self.space.d_sae)]
        return [dict(self._summaries[j]) for j in order]

    def latents_json(self) -> bytes:
        """The whole list by frequency as JSON (what the app loads first), serialised once."""
        if self._list_json is None:
            self._list_json = json.dumps(self.latents()).encode()
        return self._list_json

    def latent(self, j: int) -> dict[str, Any]:
        """A latent's page: statistics, histogram, concepts and validations, top examples, a sample
        per activation band, co-firing latents of coarser and finer levels, decoder neighbours."""
        if not 0 <= j < self.space.d_sae:
            raise BrowserError(f"latent {j} does not exist; the SAE has {self.space.d_sae} latents")
        page = self._with_validation(self.index.page(j, NEIGHBOURS))
        if self.table is not None:
            n = self.table.neurons[j]
            page["concepts"] = [{"word": w, "similarity": float(s)} for w, s in n["concepts"]]
            page["validations"] = n["valid"]
            page["similarity"], page["ratio"] = n["similarity"], n["ratio"]
        top_rows = [t["row"] for t in page["top"]]
        page["top"] = [{**self.describe(t["row"]), "value": t["value"]} for t in page["top"]]
        page["bands"] = [{**self.describe(b["row"]), "low": b["low"], "high": b["high"]} for b in page["bands"]]
        for entry in page["histogram"] + page["bands"]:  # the open end bin: JSON has no infinity
            entry["high"] = entry["high"] if np.isfinite(entry["high"]) else None
        if top_rows:
            x = read_all(self.rows.source, np.asarray(top_rows))
            with self._lock:
                page["cofiring"] = self.index.cofiring(j, torch.from_numpy(x), n=NEIGHBOURS)
        else:
            page["cofiring"] = {"coarser": [], "finer": []}
        for side in ("coarser", "finer"):
            page["cofiring"][side] = [self._with_validation(c) for c in page["cofiring"][side]]
        page["decoder_neighbours"] = [self._with_validation(c) for c in page["decoder_neighbours"]]
        return page

    def describe(self, row: int) -> dict[str, Any]:
        """A row as a page shows it: its id and caption, and whether its image can be shown."""
        d = self.rows.describe(row)
        d.pop("image", None)  # a path on this machine: pages ask for image/ROW instead
        if self.rows.modality == "image" and self.rows.image_path(row) is not None:
            d["has_image"] = True
        return d

    def thumbnail(self, row: int, size: int = 160) -> bytes | None:
        """The row's image as a JPEG thumbnail, or None where it cannot be read back."""
        if not 0 <= row < self.rows.n_rows:
            raise BrowserError(f"row {row} does not exist; the data has {self.rows.n_rows} rows")
        image = self.rows.load_image(row)
        if image is None:
            return None
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def query(self, *, text: str | None = None, row: int | None = None, image: bytes | None = None,
              n: int = QUERY_LATENTS) -> dict[str, Any]:
        """An input's active latents with their names and magnitudes (largest first): a typed text
        (through the encoder; without one, a word of the concept vocabulary opens its latent), an
        uploaded image, or a row of the data."""
        x, described = self._embed(text=text, row=row, image=image)
        with self._lock:
            z = self.space.encode(torch.from_numpy(x[None]))[0].float().cpu()
        active = int((z > 0).sum())
        v, i = z.topk(min(n, max(active, 1)))
        levels = self.index.arrays["nesting_level"]
        found = [self._with_validation({"index": int(k), "label": self._label(int(k)), "value": float(val),
                                        "nesting_level": int(levels[k])})
                 for k, val in zip(i.tolist(), v.tolist()) if val > 0]
        return {"query": described, "l0": active, "latents": found}

    def steer(self, edits: list[dict[str, Any]], *, text: str | None = None, row: int | None = None,
              image: bytes | None = None, k: int = NEIGHBOURS) -> dict[str, Any]:
        """Nearest rows of the query before and after raising or lowering concepts in SAE space
        (`msae search --steer`: set or add a magnitude, decode, search CLIP space again). Each edit
        is {"latent": index or concept name, "value": number, "mode": "set" | "add"}."""
        x, described = self._embed(text=text, row=row, image=image)
        parsed = [self._edit(e) for e in edits]
        with self._lock:
            result = similarity_search(self.rows, x, space=self.space, table=self.table, k=k,
                                       steer=[parsed] if parsed else None, n_concepts=4)
        out = {"query": described, "neighbours": [self._hit(h) for h in result["clip"]]}
        if parsed:
            s = result["steered"][0]
            out["edits"], out["distance_from_query"] = s["edits"], s["distance_from_query"]
            out["steered"] = [self._hit(h) for h in s["hits"]]
        return out

    # -- helpers -------------------------------------------------------------------------------
    def _embeds_images(self) -> bool:
        return self.encoder is not None and getattr(self.encoder, "preprocess", None) is not None \
            and hasattr(self.encoder.model, "encode_image")

    def _embed(self, *, text: str | None, row: int | None, image: bytes | None) -> tuple[np.ndarray, dict]:
        given = {k: v for k, v in dict(text=text, row=row, image=image).items() if v not in (None, "")}
        if len(given) != 1:
            raise BrowserError("give exactly one query: a text, a row of the data, or an image")
        if image is not None and not self._embeds_images():
            raise BrowserError("an image query needs a CLIP model: start msae serve with --clip MODEL "
                               "--pretrained TAG")
        if text and self.encoder is None:
            if self.table is None:
                raise BrowserError("a text query needs a text encoder (msae serve --clip MODEL --pretrained TAG) "
                                   "or, for a vocabulary word, concept names (--concepts)")
            try:
                j = self.table.resolve(text)
            except ValueError:
                raise BrowserError(f"{text!r}: no text encoder is loaded (msae serve --clip ...), and it is not a "
                                   "word of the concept vocabulary") from None
            raise BrowserError(f"no text encoder is loaded; {text!r} is the concept of latent #{j} (its page: "
                               f"#/latent/{j})")
        try:
            with self._lock:
                x, described = query_embedding(self.rows, clip=self.encoder, **given)
        except ValueError as e:
            raise BrowserError(str(e)) from None
        return (x, self.describe(row)) if row is not None else (self._checked(x), described)

    def _checked(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.space.d_in:
            raise BrowserError(f"the query encoder gives {x.shape[-1]}-d embeddings, the SAE has d_in="
                               f"{self.space.d_in} (is it the model the data was embedded with?)")
        return np.asarray(x, np.float32)

    def _edit(self, e: dict[str, Any]) -> Edit:
        latent, mode = e.get("latent"), e.get("mode", "set")
        if mode not in ("set", "add"):
            raise BrowserError(f"steering mode must be set or add, got {mode!r}")
        try:
            value = float(e["value"])
        except (KeyError, TypeError, ValueError):
            raise BrowserError(f"steering {latent!r}: value must be a number, got {e.get('value')!r}") from None
        if isinstance(latent, int) or (isinstance(latent, str) and latent.strip().lstrip("#").isdigit()):
            j = int(str(latent).strip().lstrip("#"))
        elif isinstance(latent, str) and self.table is not None:
            try:
                j = self.table.resolve(latent)
            except ValueError as err:
                raise BrowserError(str(err)) from None
        else:
            raise BrowserError(f"steering {latent!r}: name a latent by #index (concept names need --concepts)")
        if not 0 <= j < self.space.d_sae:
            raise BrowserError(f"latent {j} does not exist; the SAE has {self.space.d_sae} latents")
        return Edit(index=j, value=value, mode=mode)

    def _hit(self, h: dict[str, Any]) -> dict[str, Any]:
        return {**self.describe(h["row"]), "distance": h["distance"],
                **({"steered_magnitudes": h["steered_magnitudes"]} if "steered_magnitudes" in h else {})}

    def _label(self, j: int) -> str | None:
        return self.table.labels[j] if self.table else None

    def _with_validation(self, entry: dict[str, Any]) -> dict[str, Any]:
        if self.table is not None:
            entry["valid"] = self.table.valid[entry["index"]]
        return entry


def open_browser(sae_ref: str | Path, data: str | Path, *, concepts: str | Path | None = None,
                 modality: str | None = None, clip: str | None = None, pretrained: str | None = None,
                 device: str = "cpu", index_dir: str | Path | None = None, rebuild: bool = False,
                 protocol: str = "paper", progress: bool = True) -> Browser:
    """A Browser over `data` (an `msae embed` cache or a matrix) for an SAE folder or a release,
    building its latent index on first use (one pass, with a progress bar) and reusing it after.
    `protocol`: 'paper' encodes with ReLU only (section 4), 'native' with the architecture's own
    activation (a TopK SAE's top-k), as `msae eval --protocol`."""
    from ..interpret import open_space
    from ..publish import open_sae

    rows = open_rows(data)
    sae, doc = open_sae(sae_ref, device=device, concepts=concepts is None)
    if hasattr(sae, "set_protocol"):
        sae.set_protocol(protocol)
    elif protocol != "paper":
        raise BrowserError(f"{sae_ref} has no inference protocols (a {sae.cfg.architecture()} SAE); "
                           "leave --protocol at paper")
    table = ConceptTable.load(concepts) if concepts else (ConceptTable(doc, f"{sae_ref} (published concepts)")
                                                          if doc else None)
    space, table = open_space(sae, modality, table, device)
    try:
        check_dimension(rows.source, space.d_in)
    except ValueError as e:
        raise BrowserError(f"{e} (embed the data with the SAE's CLIP model)") from None
    try:
        space.encode(torch.zeros(1, space.d_in))
    except ValueError as e:  # no statistics of this modality saved with the SAE
        raise BrowserError(str(e)) from None
    where = Path(index_dir) if index_dir else default_index_dir(sae_ref, rows.source, protocol)
    key = fingerprint(sae, rows.source, space.modality, protocol)
    meta = where / META_FILE
    if rebuild or not meta.exists() or json.loads(meta.read_text()).get("fingerprint") != key:
        if progress:
            print(f"building the latent index of {rows.n_rows} rows in {where} (once) ...", flush=True)
        build_index(space, rows.source, where, progress=progress)
        doc = json.loads(meta.read_text())
        doc["fingerprint"] = key
        write_text_atomic(meta, json.dumps(doc, indent=1))
    encoder = None
    if clip:
        from ..embed import load_clip

        encoder = load_clip(clip, pretrained, device=device)
    index = LatentIndex(where, space.sae, table.labels if table else None)
    return Browser(space, rows, index, table, encoder, name=str(sae_ref), protocol=protocol,
                   data_name=str(data))
