"""Text generation shared by the CLI (generate/generate.py) and the Gradio app (app.py).

    model, tokenizer = load_model_and_tokenizer("checkpoints/trm-tinystories-small")   # or a Hub id
    settings = GenerationSettings(max_new_tokens=100, temperature=0.8, seed=0)
    print(generate_text(model, tokenizer, "Once upon a time", settings).text)
    for piece in stream_generate(model, tokenizer, "Once upon a time", settings):
        print(piece, end="", flush=True)

Everything a user types is checked here, once, with messages that say what was wrong:
  * model folders: missing, no config.json, pickle-only weights (refused: unpickling runs arbitrary
    code, so only safetensors load), truncated or corrupt safetensors, missing tokenizer;
  * prompts: empty, not UTF-8, longer than the context (cut from the left, with a warning saying how
    many tokens went);
  * sampling settings: ranges, NaN, and the TRM controls (halt threshold, supervision steps).

Seeding: every generation samples with its own torch.Generator (seeded from `seed`, or from the
operating system's entropy when `seed` is None), never with torch's process-global RNG: generate()
samples with the global one, so the draw is done by the last logits processor (`SampleWithGenerator`)
and generate() then picks that token greedily. So a seeded generation gives the same text streamed or
not, alone or while other threads generate, in the app's batches (trm_lm/serving.py) or here, and an
unseeded one is really random whatever was seeded before.

Inspection: `trace_top_k=k` (generate_text, stream_generate, the app's decoder) adds to the result one
`TokenTrace` per new token (the supervision steps it ran, the top-k after each), from
`TRMForCausalLM.inspect`; `inspect_generation` is the one-call form. trm_lm/inspection.py only lays
traces out as text and tables.

Any causal LM loads and generates; the TRM-only controls raise a clear error on other models.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .compiled import check_compilable, compiled_decoder
from .modeling_trm import TokenTrace

logger = logging.getLogger(__name__)

TRM_MODEL_TYPE = "trm_lm"
MAX_NEW_TOKENS_LIMIT = 4096
MAX_RETURN_SEQUENCES = 16
# logits / temperature (and / repetition_penalty) must stay finite in float32: below these, 0 = greedy / 1 = off
MIN_TEMPERATURE = 1e-3
MIN_REPETITION_PENALTY = 1e-3
TEST_TIME_DEPTH = 2  # the CLI and app run up to this many times the trained supervision steps

# safetensors' names of the integer dtypes -> torch's
INTEGER_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
                  "I32": "int32", "U64": "uint64", "I64": "int64"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DECODE_KWARGS = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
# owner/name or name, as the Hub spells repository ids; anything else given as --model is a path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def one_line(error: BaseException | str) -> str:
    """An error message on one line (library messages often span several)."""
    return " ".join(str(error).split())


# ----------------------------------------------------------------------------------------------------
# loading


def default_model_path(repo_root: str | Path) -> Path:
    """The model the CLI and the app use when none is given: checkpoints/trm-tinystories-small."""
    path = Path(repo_root) / "checkpoints" / "trm-tinystories-small"
    if not path.is_dir():
        raise FileNotFoundError(f"no model given and the default model {path} does not exist: "
                                "pass --model with a model folder or a Hugging Face Hub id")
    return path


def check_model_dir(path: str | Path) -> Path:
    """Check that `path` holds a loadable model folder (save_pretrained output) with safetensors weights."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"expected a model directory (save_pretrained output), got a file: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model folder written by save_pretrained")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{path} has only pickle weights ({', '.join(pickles)}); refusing to load them, since "
                             "unpickling can run arbitrary code. Re-save the model with save_pretrained (safetensors)")
        raise FileNotFoundError(f"{path} has no weights (*.safetensors)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
            if not all(isinstance(name, str) for name in shards):
                raise ValueError("weight_map values must be file names")
        except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as error:
            raise ValueError(f"{index} is not a valid safetensors index: {one_line(error)}") from error
        missing = sorted(name for name in shards if not (path / name).is_file())
        if missing:
            raise FileNotFoundError(f"{path} is missing weight shards listed in its index: {', '.join(missing)}")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as tensors:  # reads and checks the header against the file size
                dtypes = {key: tensors.get_slice(key).get_dtype() for key in tensors.keys()}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file} is not a valid safetensors file (truncated or corrupt?): "
                             f"{one_line(error)}") from error
        integer = sorted(key for key, dtype in dtypes.items() if dtype in INTEGER_DTYPES)
        if integer and not _is_quantized(path):  # from_pretrained would cast them to float silently (0.03 -> 0)
            raise ValueError(f"{file} stores {integer[0]} as {INTEGER_DTYPES[dtypes[integer[0]]]} "
                             f"({len(integer)} integer tensor(s) in all) but the model is not quantized: "
                             "re-save it with save_pretrained from a floating-point model")
    return path


def _is_quantized(path: Path) -> bool:
    try:
        return "quantization_config" in json.loads((path / "config.json").read_text())
    except (ValueError, TypeError, RecursionError):  # an unreadable config.json is reported when it is loaded
        return False


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' = cuda if available, else mps, else cpu; anything else must be a torch device that exists here."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r} (try 'auto', 'cpu', 'cuda', 'cuda:1', 'mps')") from error
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r} (try 'auto', 'cpu', 'cuda', 'cuda:1', 'mps')")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} was asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was asked for, but MPS is not available on this machine")
    return resolved


def load_model_and_tokenizer(name_or_path: str | Path, device: str = "auto", trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from a folder or a Hub id (AutoModelForCausalLM / AutoTokenizer).

    Returns (model in eval mode on `device`, tokenizer). Every failure is a FileNotFoundError, ValueError or
    OSError whose message names the model and the reason.
    """
    name = str(name_or_path)
    torch_device = resolve_device(device)
    local = Path(name).expanduser()
    if local.exists() or not _HUB_ID.match(name):
        check_model_dir(local)
        if not any((local / file).is_file() for file in TOKENIZER_FILES):
            raise FileNotFoundError(f"{local} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); "
                                    "save the tokenizer next to the model with tokenizer.save_pretrained")
        source, where = str(local), f"model folder {local}"
    else:
        source, where = name, f"{name!r} (no such local folder, so it was tried as a Hugging Face Hub id)"
    try:  # the boundary with user-chosen files: whatever goes wrong in there is reported as "cannot load X"
        # mismatched sizes are reported below by name (transformers' own error points at a log we silence)
        # bf16/fp16 checkpoints (the shipped one) compute in float32 on CPU: faster there, and exact enough
        # that cached and uncached decoding agree; accelerators keep the stored dtype
        from .export import is_int8_folder, load_int8  # here: trm_lm.export imports this module

        if source == str(local) and is_int8_folder(local):  # `python -m trm_lm.export --format int8`, dequantized
            model, loading = load_int8(local, trust_remote_code=trust_remote_code)
        else:
            model, loading = AutoModelForCausalLM.from_pretrained(
                source, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True,
                ignore_mismatched_sizes=True,
                dtype=torch.float32 if torch.device(torch_device).type == "cpu" else "auto")
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise OSError(f"could not load {where}: {type(error).__name__}: {one_line(error)}") from error
    problems = [f"{key} is missing" for key in sorted(loading["missing_keys"])]
    problems += [f"{key} is in the checkpoint but not in the model" for key in sorted(loading["unexpected_keys"])]
    problems += [f"{key} has shape {tuple(saved)}, the model needs {tuple(needed)}"
                 for key, saved, needed in sorted(loading["mismatched_keys"])]
    if problems:  # transformers would go on with randomly initialised weights
        raise ValueError(f"the checkpoint of {where} does not fit its config: {'; '.join(problems[:3])}"
                         + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise ValueError(f"the weights of {where} hold NaN or inf values ({', '.join(broken[:3])}"
                         f"{', ...' if len(broken) > 3 else ''}): the checkpoint is corrupt or training diverged")
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer of {where} has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{vocab_size}: they do not belong together")
    return model.to(torch_device).eval(), tokenizer


def is_trm(model) -> bool:
    return getattr(model.config, "model_type", None) == TRM_MODEL_TYPE


def check_trace_top_k(model, top_k) -> None:
    """ValueError unless `model` can report per-step predictions (a TRM's inspect()) and 1 <= top_k <= vocab."""
    if not is_trm(model) or not hasattr(model, "inspect"):
        raise ValueError(f"per-step traces need a TRM model (model_type 'trm_lm') with inspect(); "
                         f"got {type(model).__name__}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k (predictions shown per step) must be in [1, {model.config.vocab_size}] "
                         f"(the vocabulary size), got {top_k!r}")


def context_length(model) -> int | None:
    """How many positions the model can attend over (None if its config does not say)."""
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ----------------------------------------------------------------------------------------------------
# prompts and settings


def validate_prompt(prompt: str | bytes) -> str:
    """The prompt as text; ValueError if it is empty or not valid UTF-8."""
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"the prompt is not valid UTF-8: byte {prompt[error.start]:#04x} at offset "
                             f"{error.start}") from error
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
    try:  # undecodable command-line bytes arrive as lone surrogates (Python's surrogateescape)
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the prompt is not valid UTF-8 (undecodable input at character {error.start})") from error
    if not prompt.strip():
        raise ValueError("the prompt is empty: give some text to continue, e.g. 'Once upon a time'")
    return prompt


def _check_number(name: str, value, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if integer:
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


@dataclass
class GenerationSettings:
    """What to generate and how to sample it; checked on creation (ValueError with the field's name)."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy decoding
    top_k: int = 0  # 0 = off
    top_p: float = 0.95  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    num_return_sequences: int = 1
    halt_threshold: float | None = None  # TRM per-token exit: None = the model's config, 0 = off, (0, 1] = on
    supervision_steps: int | None = None  # TRM: run only the first k supervision steps; None = all
    share_step_cache: bool = False  # TRM: the steps share one step's KV slots (memory / N_sup, not exact)
    seed: int | None = None  # None = not reproducible
    compile: bool = False  # TRM: decode with one torch.compile'd step on a static cache (trm_lm/compiled.py)

    def __post_init__(self):
        self.max_new_tokens = _check_number("max_new_tokens", self.max_new_tokens, integer=True)
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}")
        self.temperature = _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}")
        self.top_k = _check_number("top_k", self.top_k, integer=True)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.top_p = _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.repetition_penalty = _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.repetition_penalty < MIN_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be at least {MIN_REPETITION_PENALTY} (1 = off), "
                             f"got {self.repetition_penalty}")
        self.num_return_sequences = _check_number("num_return_sequences", self.num_return_sequences, integer=True)
        if not 1 <= self.num_return_sequences <= MAX_RETURN_SEQUENCES:
            raise ValueError(f"num_return_sequences must be in [1, {MAX_RETURN_SEQUENCES}], "
                             f"got {self.num_return_sequences}")
        if self.num_return_sequences > 1 and self.temperature == 0:
            raise ValueError("greedy decoding (temperature 0) gives one sequence: set temperature > 0 "
                             "to sample several")
        if self.halt_threshold is not None:
            self.halt_threshold = _check_number("halt_threshold", self.halt_threshold)
            if not 0 <= self.halt_threshold <= 1:
                raise ValueError(f"halt_threshold must be in [0, 1] (0 = off), got {self.halt_threshold}")
        if self.supervision_steps is not None:
            self.supervision_steps = _check_number("supervision_steps", self.supervision_steps, integer=True)
            if self.supervision_steps < 1:
                raise ValueError(f"supervision_steps must be >= 1, got {self.supervision_steps}")
        for name in ("share_step_cache", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.seed is not None:
            self.seed = _check_number("seed", self.seed, integer=True)
            if not 0 <= self.seed < 2**32:
                raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


@dataclass
class EncodedPrompt:
    """A prompt as model input: (1, T) ids, BOS first when the tokenizer has one, cut to fit the context."""

    input_ids: torch.LongTensor  # (1, T)
    total_tokens: int  # before truncation (BOS included)
    dropped_tokens: int
    context_length: int | None

    @property
    def warning(self) -> str | None:
        if not self.dropped_tokens:
            return None
        return (f"the prompt is {self.total_tokens} tokens; dropped its first {self.dropped_tokens} so that the prompt "
                f"and the new tokens fit the model's context of {self.context_length} tokens")


def encode_prompt(tokenizer, prompt: str | bytes, max_new_tokens: int, context: int | None) -> EncodedPrompt:
    """Tokenize `prompt` after a BOS (how training saw every document start); keep its end if it is too long."""
    prompt = validate_prompt(prompt)
    ids = tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]  # we warn about length ourselves
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None else []
    if bos is not None and ids and ids[0] == bos:  # tokenizers like Llama's add it themselves
        ids = ids[1:]
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    total = len(prefix) + len(ids)
    dropped = 0
    if context is not None:
        room = context - max_new_tokens - len(prefix)
        if room < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                             f"{context} tokens: use max_new_tokens <= {context - len(prefix) - 1}")
        dropped = max(0, len(ids) - room)
        ids = ids[dropped:]
    input_ids = torch.tensor([prefix + ids], dtype=torch.long)
    return EncodedPrompt(input_ids=input_ids, total_tokens=total, dropped_tokens=dropped, context_length=context)


def prepare_prompt(model, tokenizer, prompt, settings: GenerationSettings) -> EncodedPrompt:
    """`prompt` encoded for `model` (an EncodedPrompt passes through); a truncation is logged as a warning."""
    if isinstance(prompt, EncodedPrompt):
        return prompt
    encoded = encode_prompt(tokenizer, prompt, settings.max_new_tokens, context_length(model))
    if encoded.warning:
        logger.warning(encoded.warning)
    return encoded


def padding_id(tokenizer) -> int:
    """The id that pads batches (always masked out): the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class SampleWithGenerator(LogitsProcessor):
    """The last logits processor of a sampled generation: draws each row's next token from softmax(scores)
    with its own torch.Generator and leaves only that token finite, so generate()'s greedy step picks it.

    generate() would sample with torch's process-global RNG, which every thread shares; this draws exactly
    what generate()'s sampling step draws (softmax, one multinomial sample per row) from a generator that
    belongs to one generation.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        tokens = torch.multinomial(probs, num_samples=1, generator=self.generator)  # (B, 1)
        return torch.full_like(scores, -math.inf).scatter_(1, tokens, 0.0)


class NumpySortTopP(TopPLogitsWarper):
    """TopPLogitsWarper with its sort done by numpy on CPU: numpy's AVX-512 sort orders the app's (16, 4096)
    batch in ~0.7 ms, torch.sort in ~4 ms (a sixth of a batched decoding step). Every correct sort gives the
    same ascending values, so the cumulative probabilities and the tokens kept are TopPLogitsWarper's (only
    exactly tied logits at the cut could be ordered differently; tests compare the two)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64):
            return super().__call__(input_ids, scores)
        order = torch.from_numpy(np.argsort(scores.detach().contiguous().numpy(), axis=-1))  # (B, V) ascending
        mass_up_to = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)  # this token and every smaller one
        drop = mass_up_to <= 1 - self.top_p
        drop[..., -self.min_tokens_to_keep:] = False
        return scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), self.filter_value)


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator for one generation: seeded, or from the operating system's entropy when seed is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def logits_processors(settings: GenerationSettings, generator: torch.Generator | None) -> LogitsProcessorList:
    """generate()'s processors for these settings in its order (penalty, temperature, top-k, top-p), then the
    draw with `generator` when sampling: the scores that come out have one finite entry per row when sampling
    (the drawn token), and are the penalised logits when greedy (temperature 0); take their argmax."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.temperature == 0:
        return processors
    if settings.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k != 0:
        processors.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        processors.append(NumpySortTopP(settings.top_p))
    processors.append(SampleWithGenerator(generator))
    return processors


def generate_kwargs(model, tokenizer, settings: GenerationSettings) -> dict:
    """Keyword arguments for `model.generate` and `model.inspect`: a GenerationConfig, the logits processors
    (sampling with a new torch.Generator seeded from `settings.seed`) and the TRM controls.

    The sampling settings travel as processors, not as GenerationConfig fields: generate() runs greedy and
    the last processor makes the draw (see SampleWithGenerator). Several sequences are rows of the
    input (generate_text repeats the prompt), since greedy generate() gives one sequence per row.
    """
    greedy = settings.temperature == 0
    generator = None if greedy else new_generator(settings.seed, model.device)  # greedy draws nothing
    config = dict(max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=padding_id(tokenizer))
    kwargs = dict(generation_config=GenerationConfig(**config),
                  logits_processor=logits_processors(settings, generator))
    if (settings.halt_threshold is None and settings.supervision_steps is None and not settings.share_step_cache
            and not settings.compile):
        return kwargs
    if not is_trm(model):
        raise ValueError(f"halt_threshold, supervision_steps, share_step_cache and compile are TRM controls; this "
                         f"model is {getattr(model.config, 'model_type', type(model).__name__)!r}")
    if settings.halt_threshold is not None:
        kwargs["halt_threshold"] = settings.halt_threshold  # the model's meaning too: 0 = off
    if settings.supervision_steps is not None:
        trained = model.config.supervision_steps
        if settings.supervision_steps > TEST_TIME_DEPTH * trained:
            raise ValueError(f"supervision_steps must be in [1, {TEST_TIME_DEPTH * trained}] for this model "
                             f"(trained with {trained}; up to {TEST_TIME_DEPTH}x that runs at test time), "
                             f"got {settings.supervision_steps}")
        kwargs["supervision_steps"] = settings.supervision_steps
    if settings.share_step_cache:
        kwargs["share_step_cache"] = True
    if settings.compile:
        check_compilable(model, settings.halt_threshold, settings.share_step_cache)  # now, not in the thread
        kwargs["compile"] = True
    return kwargs


# ----------------------------------------------------------------------------------------------------
# generating


@dataclass
class GenerationResult:
    prompt: EncodedPrompt
    token_ids: list[list[int]]  # new tokens of each sequence, up to and including the first EOS
    texts: list[str]  # their decoded text (special tokens skipped)
    traces: list[TokenTrace] | None = None  # per new token of the first sequence, when trace_top_k=k asked for it

    @property
    def text(self) -> str:
        return self.texts[0]


def decode_new_tokens(tokenizer, token_ids: list[int]) -> str:
    """Generated ids -> text, exactly as the streamer decodes them."""
    return tokenizer.decode(token_ids, **DECODE_KWARGS)


def _result(tokenizer, encoded: EncodedPrompt, rows: list[list[int]], traces=None) -> GenerationResult:
    eos = tokenizer.eos_token_id
    trimmed = [row[: row.index(eos) + 1] if eos in row else row for row in rows]  # drop the padding after EOS
    return GenerationResult(encoded, trimmed, [decode_new_tokens(tokenizer, row) for row in trimmed], traces)


def _run(model, tokenizer, input_ids: torch.LongTensor, kwargs: dict, trace_top_k: int) -> tuple[list, list | None]:
    """generate() on `input_ids` (R, T); with trace_top_k, inspect() instead (one row): (sequences, traces)."""
    if trace_top_k:
        traces = model.inspect(input_ids, tokenizer=tokenizer, top_k=trace_top_k, **kwargs)
        return [[trace.token_id for trace in traces]], traces
    if kwargs.pop("compile", False):
        sequences = compiled_decoder(model).generate(input_ids, **kwargs)
    else:
        sequences = model.generate(input_ids, **kwargs)  # (R, T + new)
    return sequences[:, input_ids.shape[1]:].tolist(), None


def _checked(model, tokenizer, prompt, settings: GenerationSettings, trace_top_k: int):
    if trace_top_k:
        check_trace_top_k(model, trace_top_k)
        if settings.num_return_sequences != 1:
            raise ValueError("per-token traces follow one sequence: use num_return_sequences=1")
        if settings.compile:
            raise ValueError("per-token traces come from the uncompiled decoding: drop compile to trace")
    encoded = prepare_prompt(model, tokenizer, prompt, settings)
    return encoded, generate_kwargs(model, tokenizer, settings)  # bad settings raise here


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str | bytes | EncodedPrompt, settings: GenerationSettings,
                  trace_top_k: int = 0) -> GenerationResult:
    """Generate `settings.num_return_sequences` continuations of `prompt` in one call (with `trace_top_k=k`:
    one, plus its per-token traces)."""
    encoded, kwargs = _checked(model, tokenizer, prompt, settings, trace_top_k)
    input_ids = encoded.input_ids.to(model.device).repeat(settings.num_return_sequences, 1)
    rows, traces = _run(model, tokenizer, input_ids, dict(kwargs, attention_mask=torch.ones_like(input_ids)),
                        trace_top_k)
    return _result(tokenizer, encoded, rows, traces)


def inspect_generation(model, tokenizer, prompt: str | bytes | EncodedPrompt, max_new_tokens: int = 32,
                       top_k: int = 3, halt_threshold: float | None = None, supervision_steps: int | None = None,
                       seed: int | None = None, **sampling) -> list[TokenTrace]:
    """Generate from `prompt` and report, per generated token, the steps it used and the top-k after each step.

    top_k: predictions kept per step. halt_threshold: None = the model's config, 0 = off.
    sampling: temperature, top_p, repetition_penalty, and `sampling_top_k` (top-k *sampling*; named so
    because `top_k` here is the number of predictions shown). Unset ones take GenerationSettings' defaults.
    The same as `generate_text(..., trace_top_k=top_k).traces`.
    """
    if "sampling_top_k" in sampling:
        sampling["top_k"] = sampling.pop("sampling_top_k")
    try:
        settings = GenerationSettings(max_new_tokens=max_new_tokens, halt_threshold=halt_threshold,
                                      supervision_steps=supervision_steps, seed=seed, **sampling)
    except TypeError as error:  # an unknown keyword
        raise ValueError(f"unknown sampling setting: {error}") from error
    return generate_text(model, tokenizer, prompt, settings, trace_top_k=top_k).traces


class _StopWhenSet(StoppingCriteria):
    """Stops generation once `event` is set: the reader of a stream went away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generate(model, tokenizer, prompt: str | bytes | EncodedPrompt, settings: GenerationSettings,
                    trace_top_k: int = 0) -> Generator[str, None, GenerationResult]:
    """A generator of the new text, piece by piece as it is generated, that returns a GenerationResult.

        stream = stream_generate(model, tokenizer, "Once upon a time", settings)   # checks everything now
        result = yield from stream   # inside another generator; or catch StopIteration.value

    `generate()` runs in a thread that feeds a TextIteratorStreamer. With `trace_top_k=k` (TRM models)
    the thread runs `model.inspect(top_k=k)` instead, which streams the same generation and then adds
    the per-token traces to the result. Closing the generator early stops generating.
    """
    if settings.num_return_sequences != 1:
        raise ValueError("streaming shows one sequence: use num_return_sequences=1")
    encoded, kwargs = _checked(model, tokenizer, prompt, settings, trace_top_k)
    return _stream(model, tokenizer, encoded, kwargs, trace_top_k)


def _stream(model, tokenizer, encoded: EncodedPrompt, kwargs: dict, trace_top_k: int):
    input_ids = encoded.input_ids.to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, **DECODE_KWARGS)
    reader_gone = threading.Event()
    kwargs = dict(kwargs, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([_StopWhenSet(reader_gone)]))
    outcome = {}

    def run():
        try:
            outcome["rows"], outcome["traces"] = _run(model, tokenizer, input_ids, kwargs, trace_top_k)
        except BaseException as error:  # handed to the reader, who re-raises it
            outcome["error"] = error
            streamer.end()  # unblock the reader

    thread = threading.Thread(target=run, name="trm-lm-generate", daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        reader_gone.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return _result(tokenizer, encoded, outcome["rows"], outcome["traces"])


__all__ = [
    "GenerationSettings", "EncodedPrompt", "GenerationResult", "load_model_and_tokenizer", "check_model_dir",
    "default_model_path", "resolve_device", "validate_prompt", "encode_prompt", "context_length", "is_trm",
    "check_trace_top_k",
    "prepare_prompt", "padding_id", "generate_kwargs", "generate_text", "stream_generate", "inspect_generation",
    "decode_new_tokens", "one_line", "logits_processors", "new_generator", "SampleWithGenerator", "NumpySortTopP",
]
