"""Reading text: corpus files (.txt, .jsonl) and the built-in datasets under the data directory.

A `.txt` file is one text. A `.jsonl` file has one JSON object a line with a `text` or
`passage` field; a bad line is reported by number. Built-in names resolve under
`WELORE_DATA_DIR` (default: the project's shared/data).
"""

from __future__ import annotations

import json
from pathlib import Path

from .hashing import file_sha256
from .errors import DataNotFound, InvalidData
from .settings import get_core_settings

# Built-in name → file under the data directory.
BUILTIN = {
    "boolq": "boolq/boolq_dev.jsonl",
    "commonsenseqa": "commonsenseqa/train_rand_split.jsonl",
    "commonsenseqa-dev": "commonsenseqa/dev_rand_split.jsonl",
}
# Built-in name → text shipped inside the package: the default calibration text and the held-out slice
# of the quality check (see data/LICENSE-general.md).
_PACKAGE_DATA = Path(__file__).resolve().parent / "data"
PACKAGED = {"general": _PACKAGE_DATA / "general.jsonl", "general-heldout": _PACKAGE_DATA / "general-heldout.jsonl"}
TEXT_FIELDS = ("text", "passage")
# Fine-tuning's extra built-in names: name → (built-in name above, the data format it is read as).
ALIASES = {"boolq-passages": ("boolq", "text")}


def builtin_names() -> list[str]:
    """Every built-in name fine-tuning data accepts (evaluation and calibration accept all but ALIASES)."""
    return sorted({*BUILTIN, *PACKAGED, *ALIASES})


def resolve_data(spec: str | Path) -> Path:
    """A built-in dataset name or a file path → an existing file."""
    spec = str(spec)
    if spec in PACKAGED:
        return PACKAGED[spec]
    if spec in BUILTIN:
        path = Path(get_core_settings().data_dir) / BUILTIN[spec]
        if not path.is_file():
            raise DataNotFound(f"built-in dataset {spec!r} expected at {path}; set WELORE_DATA_DIR to "
                               "the directory holding boolq/ and commonsenseqa/")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataNotFound(f"data {spec!r} not found: expected a .txt or .jsonl file or a built-in "
                           f"name ({', '.join(sorted({*BUILTIN, *PACKAGED}))})")
    return path


def iter_jsonl(path: Path):
    """Yield (line number, object) for each non-blank line; a bad line raises InvalidData."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidData(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be "
                                  "one JSON object") from exc
            if not isinstance(obj, dict):
                raise InvalidData(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_texts(spec: str | Path) -> list[str]:
    """The texts of a corpus file (or built-in name), in file order."""
    path = resolve_data(spec)
    if path.suffix == ".jsonl":
        texts = []
        for lineno, obj in iter_jsonl(path):
            field = next((f for f in TEXT_FIELDS if isinstance(obj.get(f), str)), None)
            if field is None:
                raise InvalidData(f"{path}:{lineno}: expected a string field "
                                  f"{' or '.join(repr(f) for f in TEXT_FIELDS)}; found keys {sorted(obj)}")
            texts.append(obj[field])
    elif path.suffix in (".txt", ".md", ".text"):
        try:
            texts = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as exc:
            raise InvalidData(f"{path}: not UTF-8 text ({exc})") from exc
    else:
        raise InvalidData(f"{path}: unsupported file type {path.suffix!r}; expected .txt or .jsonl")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidData(f"{path}: no text found")
    return texts


def data_hash(spec: str | Path) -> str:
    """SHA-256 of the resolved data file's bytes (identifies calibration/eval data)."""
    return file_sha256(resolve_data(spec))
