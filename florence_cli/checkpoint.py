"""Finding a checkpoint and judging it before anything is loaded: never a checkpoint's own code.

``locate_model`` turns a folder or a Hub id into a local folder; ``checkpoint_layout`` reads only JSON
files and safetensors headers to say whether the folder is a native or an original (Microsoft)
Florence-2 checkpoint, and refuses anything else in one line: another model type, a native folder
whose processor files name custom code, weights that are truncated or corrupt. ``console_shielded``
keeps loaders off stdout and stdin. Neither torch nor transformers is imported here.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Tensor names only Microsoft's layout has (its vision tower, projection and BART are top-level).
ORIGINAL_PREFIXES = (
    "language_model.",
    "vision_tower.",
    "image_projection",
    "image_pos_embed.",
    "image_proj_norm.",
)
HUB_ID = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?")
MAX_HEADER = 100_000_000  # bytes; safetensors' own limit
# The files that tell transformers which classes to build for a native checkpoint, and the transformers
# classes a Florence-2 checkpoint may name in them.
CLASS_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
TRANSFORMERS_CLASSES = {
    "processor_class": {"Florence2Processor"},
    "image_processor_type": {"CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil"},
    "tokenizer_class": {
        "BartTokenizer", "BartTokenizerFast", "RobertaTokenizer", "RobertaTokenizerFast", "TokenizersBackend",
        "PreTrainedTokenizerFast",
    },
}  # fmt: skip
NEVER_RUN = "florence-cli never runs a checkpoint's code"


class ModelLoadError(Exception):
    """A model that cannot be found or loaded; the message is one line for the user."""


@functools.lru_cache(maxsize=8)
def locate_model(model: str, allow_pickle: bool = False) -> Path:
    """The local folder holding ``model``: the folder itself, or its Hub snapshot (cache and
    ``HF_HUB_OFFLINE`` respected). A string that looks like a path is never looked up on the Hub.
    Remembered per process: the CLI judges a model before loading it, and the Hub is asked once."""
    path = Path(model).expanduser()
    if model and path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"model {model} is not a folder (a model is a checkpoint folder or a Hub id)"
            )
        return path
    # A Hub id is owner/name; a bare word that names no folder here is a folder's name mistyped.
    if model.startswith((".", "/", "~")) or not HUB_ID.fullmatch(model) or "/" not in model:
        raise ModelLoadError(f"model folder {model} does not exist{_did_you_mean(path)}")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors", "*.model"] + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as error:  # the Hub's errors are many; the user needs one line
        raise ModelLoadError(f"cannot find model {model!r}: {_hub_failure(error)}") from None


def model_identity(folder: Path) -> str:
    """What a located checkpoint is, however it was named (a Hub id, its snapshot folder, a copy, a
    relative path): a digest of its files' contents — configs and tokenizer whole, each weight file by
    its size and its first, middle and last MiB (what a replaced or retrained file changes, read in
    milliseconds however large)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in {".json", ".txt", ".model", ".safetensors", ".bin"} or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as file:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                file.seek(offset)
                digest.update(file.read(_SAMPLE))
    return digest.hexdigest()[:16]


_SAMPLE = 1 << 20


def _did_you_mean(path: Path) -> str:
    """``; did you mean ./tiny-model?`` where a folder beside the one named has a close name."""
    try:
        beside = [entry.name for entry in path.parent.iterdir() if entry.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, beside, n=1, cutoff=0.8)
    return f"; did you mean {path.parent / close[0]}?" if close else ""


def _hub_failure(error: Exception) -> str:
    """Why the Hub gave no snapshot, in words (no class names, no URLs)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return (
            "it is a gated repository and this account has no access (ask on its page, then `hf auth login`)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return "no such repository on the Hugging Face Hub (if it is private, log in with `hf auth login`)"
    if isinstance(error, DisabledRepoError):
        return "the repository is disabled on the Hugging Face Hub"
    if isinstance(error, HfHubHTTPError):
        status = _http_status(error)
        if status in (401, 403):
            return f"the Hugging Face Hub refuses access (HTTP {status}); log in with `hf auth login`"
        return f"the Hugging Face Hub answered HTTP {status}"
    if isinstance(error, LocalEntryNotFoundError):
        cause = error.__cause__
        if constants.HF_HUB_OFFLINE or isinstance(cause, OfflineModeIsEnabled):
            return "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
        if isinstance(cause, HfHubHTTPError):
            return f"it is not in the Hugging Face cache and the Hub answered HTTP {_http_status(cause)}"
        return "the Hugging Face Hub cannot be reached and it is not in the Hugging Face cache"
    return first_line(error)  # e.g. the connection lost while downloading, or a full disk


def _http_status(error: Exception) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def first_line(error: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def checkpoint_layout(folder: Path) -> str:
    """``"native"`` (transformers' Florence-2 classes) or ``"original"`` (Microsoft's layout, converted by
    florence-cli's own code), judged from JSON files and safetensors headers alone; anything else, custom
    code named by a native folder, and truncated or corrupt weights are a ``ModelLoadError``."""
    folder = Path(folder)
    config = _config(folder)
    kind = config.get("model_type")
    if kind != "florence2":
        found = f"model_type {kind!r}" if kind else "no model_type"
        raise ModelLoadError(f"{folder} is not a Florence-2 checkpoint: config.json has {found}")
    weights = _safetensors_files(folder)
    if _is_original(config, folder):
        layout = "original"  # its auto_map points at Microsoft's code, which florence-cli never follows
    elif _is_native(config):
        layout = "native"
        for name in CLASS_FILES:
            _refuse_custom_code(folder, name)
    else:
        raise ModelLoadError(
            f"{folder} is not a Florence-2 checkpoint: config.json's vision_config is neither transformers' "
            "(model_type florence_vision) nor Microsoft's (model_type davit)"
        )
    if not weights and not any((folder / name).is_file() for name in (PICKLE, PICKLE_INDEX)):
        raise ModelLoadError(f"{folder} has no weights: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")
    for path in weights:
        _check_safetensors(path)
    return layout


def pickle_refused(path: Path) -> str:
    """Why pickled weights are not read without ``--allow-pickle``, in one line."""
    return (
        f"{path} is a pickle, and unpickling can run arbitrary code; pass --allow-pickle if you "
        "trust it (it is then read with torch.load(weights_only=True)), or use a safetensors copy"
    )


def is_original_layout(folder: Path) -> bool:
    """True for Microsoft's layout (config.json's vision fields or the tensor names say so); no checks."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and _is_original(config, Path(folder))


def _is_original(config: dict, folder: Path) -> bool:
    vision = _vision_config(config)
    if vision.get("model_type") == "davit" or "dim_embed" in vision:
        return True
    return any(name.startswith(ORIGINAL_PREFIXES) for name in _tensor_names(folder))


def _is_native(config: dict) -> bool:
    vision = _vision_config(config)
    return vision.get("model_type") == "florence_vision" or "embed_dim" in vision


def _vision_config(config: dict) -> dict:
    vision = config.get("vision_config")
    return vision if isinstance(vision, dict) else {}


def _config(folder: Path) -> dict:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a Florence-2 checkpoint: it has no config.json")
    return _json_object(folder, "config.json", f"{folder} is not a Florence-2 checkpoint")


def _json_object(folder: Path, name: str, context: str) -> dict:
    """``folder/name`` as a dict; ``context`` starts the message when it is no JSON object."""
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{context}: cannot read {name} ({first_line(error)})") from None
    except ValueError as error:
        raise ModelLoadError(f"{context}: {name} is not valid JSON ({first_line(error)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{context}: {name} is not a JSON object")
    return data


def _refuse_custom_code(folder: Path, name: str) -> None:
    """Refuse ``name`` (a native folder's processor or tokenizer file) if it names code of its own."""
    if not (folder / name).is_file():
        return
    for section in _sections(_json_object(folder, name, str(folder))):
        if "auto_map" in section:
            raise ModelLoadError(f"{folder} names custom code (auto_map in {name}); {NEVER_RUN}")
        for field, allowed in TRANSFORMERS_CLASSES.items():
            value = section.get(field)
            if value is not None and value not in allowed:
                raise ModelLoadError(
                    f"{folder} names custom code ({field} {value!r} in {name} is not a transformers class "
                    f"for Florence-2); {NEVER_RUN}"
                )


def _sections(data) -> Iterator[dict]:
    """Every JSON object in ``data``, itself included (``image_processor`` sits inside processor_config)."""
    if isinstance(data, dict):
        yield data
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            yield from _sections(item)


# --- weights -----------------------------------------------------------------------------------------


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files a load reads: the single file, else the index's shards (which must exist)."""
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    if not (folder / SAFETENSORS_INDEX).is_file():
        return []
    weight_map = _json_object(folder, SAFETENSORS_INDEX, str(folder)).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{folder}: {SAFETENSORS_INDEX} has no weight_map")
    shards = sorted({str(shard) for shard in weight_map.values()})
    for shard in shards:
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise ModelLoadError(f"{folder}: {SAFETENSORS_INDEX} names shard {shard!r}, outside the folder")
        if not (folder / shard).is_file():
            raise ModelLoadError(f"{folder}: shard {shard} named in {SAFETENSORS_INDEX} is missing")
    return [folder / shard for shard in shards]


def _check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header is unreadable or whose tensors lie past its end."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else 0
        if not 0 < length <= MAX_HEADER:
            raise ModelLoadError(f"{path} is not a safetensors file (no header)")
        if 8 + length > size:
            raise ModelLoadError(f"{path} is truncated: {size:,} of at least {8 + length:,} bytes")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise ModelLoadError(f"{path} has an unreadable header ({first_line(error)})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} has an unreadable header (not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(offset, int) for offset in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ModelLoadError(f"{path} is corrupt: tensor {name!r} has no valid data offsets")
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise ModelLoadError(f"{path} is truncated: {size:,} of {8 + length + end:,} bytes")


def _tensor_names(folder: Path) -> list[str]:
    """Tensor names from the safetensors index or header; none if unreadable (checked later)."""
    try:
        if (folder / SAFETENSORS_INDEX).is_file():
            weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))["weight_map"]
            return [str(name) for name in weight_map]
        with open(folder / SAFETENSORS, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(min(length, MAX_HEADER)))
        return [str(name) for name in header if name != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError):
        return []


# --- the console while loading -----------------------------------------------------------------------


class _UnreadableStdin(io.TextIOBase):
    """``sys.stdin`` while a checkpoint loads: every read raises (the CLI's stdin may carry image paths)."""

    def read(self, size: int | None = -1) -> str:
        raise OSError("stdin cannot be read while a model loads")

    readline = read


def quiet_transformers() -> None:
    """Keep transformers' progress bars and advice off stderr, which is for our progress."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@contextlib.contextmanager
def console_shielded() -> Iterator[None]:
    """While loading: prints go to stderr (stdout may carry JSONL) and stdin cannot be read (no prompt
    can take an answer from it); both are restored afterwards."""
    stdout, stdin = sys.stdout, sys.stdin
    sys.stdout, sys.stdin = sys.stderr, _UnreadableStdin()
    try:
        yield
    finally:
        sys.stdout, sys.stdin = stdout, stdin
