"""Text data for causal language modelling: loading, tokenizer training, packing into blocks.

Pipeline (trm_lm/text_task.py reads the texts once with `load_text_datasets` and packs the training split):

    tokenizer = load_or_train_tokenizer(None, train_texts=...)         # or a path / Hub id
    train_ds, eval_ds = build_lm_datasets(tokenizer, block_size=512, train_file="train.jsonl",
                                          validation_file="valid.jsonl")

Documents come from the Hub (default `roneneldan/TinyStories`, `text` column) or from local files:
  * `.txt`    documents separated by `<|endoftext|>`, on a line of its own or inline; each piece is
              stripped of surrounding whitespace and empty pieces are dropped (the official TinyStories
              `.txt` files use "\n<|endoftext|>\n").
  * `.jsonl`  one JSON object per line with a string field `text_column` (blank lines are allowed).
  * `.json`   a JSON array of such objects, or JSON Lines under a `.json` name.
  * `.parquet` a string column `text_column`.
Local files are read by our own reader (`iter_documents`), which names the file and line of any
malformed input, and are handed to `datasets` through `Dataset.from_generator`, so the result is cached
on disk under `HF_HOME/datasets` (or `cache_dir`) and re-read only when the file changes.

Packing convention (matches `trm_lm.evaluate`, where every document is scored after a BOS):
every document is followed by EOS. With our tokenizer BOS == EOS (`<|endoftext|>`), so the stream is
`d1 <eos> d2 <eos> d3 ...`: the EOS both ends a document and is the BOS the next one is read after.
A tokenizer with a distinct BOS (e.g. Llama) gets `<bos> d <eos>` per document. The stream is cut into
`block_size` blocks that start wherever they fall; the tail that does not fill a block is dropped per
packing batch of `PACKING_BATCH_DOCUMENTS` documents (well under 1% of the tokens for TinyStories).
Attention crosses document boundaries inside a block, as in GPT-2 / nanoGPT training.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import (Dataset, DatasetDict, Features, IterableDataset, IterableDatasetDict, Value, concatenate_datasets,
                      load_dataset)
from datasets.exceptions import DatasetGenerationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEFAULT_DATASET = "roneneldan/TinyStories"
DOCUMENT_SEPARATOR = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
PACKING_BATCH_DOCUMENTS = 1000  # documents per packing batch; each batch drops < block_size tokens

# ----------------------------------------------------------------------------------------------------
# reading local files, with errors that name the file and line


def _decode_line(raw: bytes, path: Path, line_number: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 1].hex()
        raise ValueError(
            f"{path} line {line_number}: not valid UTF-8 (byte 0x{bad} at column {err.start + 1}); "
            "re-encode the file as UTF-8"
        ) from None
    return text.lstrip("\ufeff") if line_number == 1 else text  # tolerate a UTF-8 byte-order mark


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its newline) for every line of a UTF-8 file."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            yield line_number, _decode_line(raw, path, line_number)


def _json_loads(text: str, where: str, line_of_error: bool = False):
    """json.loads, every failure a ValueError naming `where` (and the line of the error if line_of_error)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = f" line {err.lineno}" if line_of_error else ""
        raise ValueError(f"{where}{line}: invalid JSON ({err.msg} at column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; nesting deeper than the stack
        raise ValueError(f"{where}: invalid JSON ({' '.join(str(err).split())})") from None


def _check_record(record, where: str, text_column: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a {text_column!r} field, got {type(record).__name__}")
    if text_column not in record:
        raise ValueError(f"{where}: no {text_column!r} field (fields: {sorted(record)})")
    text = record[text_column]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_column!r} must be a string, got {type(text).__name__}")
    try:  # a JSON escape can spell a lone surrogate (\ud800), which is not text
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{where}: field {text_column!r} holds a lone surrogate (\\u{ord(text[err.start]):04x}) "
                         f"at character {err.start}: not valid Unicode text") from None
    return text


def _iter_txt(path: Path) -> Iterator[str]:
    pieces: list[str] = []  # lines (or parts of lines) of the current document
    for _, line in _iter_lines(path):
        *finished, rest = line.split(DOCUMENT_SEPARATOR)
        for part in finished:  # every separator on this line closes a document
            document = "".join(pieces + [part]).strip()
            pieces = []
            if document:
                yield document
        pieces.append(rest)
    document = "".join(pieces).strip()
    if document:
        yield document


def _iter_jsonl(path: Path, text_column: str) -> Iterator[str]:
    for line_number, line in _iter_lines(path):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        yield _check_record(_json_loads(line, where), where, text_column)


def _iter_json(path: Path, text_column: str) -> Iterator[str]:
    with open(path, "rb") as f:  # a JSON array starts with "[" after optional blanks / byte-order mark
        first = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first != b"[":  # JSON Lines under a .json name
        yield from _iter_jsonl(path, text_column)
        return
    text = "".join(line for _, line in _iter_lines(path))
    records = _json_loads(text, str(path), line_of_error=True)
    for index, record in enumerate(records):
        yield _check_record(record, f"{path} item {index}", text_column)


def _iter_parquet(path: Path, text_column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    if text_column not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_column!r} (columns: {parquet.schema_arrow.names})")
    column_type = parquet.schema_arrow.field(text_column).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{path}: column {text_column!r} must hold strings, it holds {column_type}")
    row = 0
    for batch in parquet.iter_batches(columns=[text_column]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise ValueError(f"{path} row {row}: {text_column!r} is null")
            row += 1
            yield text


def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    return path


def iter_documents(path: str | os.PathLike, text_column: str = "text") -> Iterator[str]:
    """Yield the documents of a local `.txt` / `.jsonl` / `.json` / `.parquet` file (see module doc).

    Raises FileNotFoundError for a missing file and ValueError naming the file and line (row, or item
    for a JSON array) for malformed input: invalid UTF-8, invalid JSON, a missing or non-string text
    field, or a file without any document.
    """
    path = _checked_path(path)  # raised now, not at the first next()
    readers = {".txt": _iter_txt, ".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet}
    reader = readers[path.suffix.lower()]
    documents = reader(path) if reader is _iter_txt else reader(path, text_column)
    return _nonempty(documents, path)


def _nonempty(documents: Iterator[str], path: Path) -> Iterator[str]:
    empty = True
    for document in documents:
        empty = False
        yield document
    if empty:
        raise ValueError(f"{path}: the file contains no documents")


def read_documents(path: str | os.PathLike, text_column: str = "text") -> list[str]:
    """All documents of a local file, validated as in `iter_documents` (used by `trm_lm.evaluate`)."""
    return list(iter_documents(path, text_column))


def _generate_records(path: str, text_column: str, size: int, mtime_ns: int) -> Iterator[dict]:
    # size and mtime_ns are unused here: they are in gen_kwargs so that datasets' cache key changes
    # when the file does.
    for document in iter_documents(path, text_column):
        yield {"text": document}


def expand_data_files(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The files named by `spec`: one path, a glob pattern, or a list of either, in the order given
    (each pattern's matches sorted). A pattern that matches nothing, or a file named twice, is an error."""
    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not entries:
        raise ValueError("no data files given")
    files: list[Path] = []
    for entry in entries:
        entry = os.fspath(entry)
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise FileNotFoundError(f"no data file matches the pattern {entry!r}")
            files.extend(Path(match) for match in matches)
        else:
            files.append(Path(entry))
    resolved = [file.resolve() for file in files]
    repeated = sorted({str(f) for f in files if resolved.count(f.resolve()) > 1})
    if repeated:
        raise ValueError(f"data file(s) given more than once: {repeated}")
    return files


def _files_dataset(spec, text_column: str, streaming: bool, cache_dir: str | None):
    """Several local files (see `expand_data_files`) as one dataset, documents in file order."""
    parts = [_file_dataset(path, text_column, streaming, cache_dir) for path in expand_data_files(spec)]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _file_dataset(path: str | os.PathLike, text_column: str, streaming: bool, cache_dir: str | None):
    """One local file as a `datasets` Dataset (cached on disk) or IterableDataset with a `text` column."""
    path = _checked_path(path)
    stat = path.stat()
    gen_kwargs = {"path": str(path.resolve()), "text_column": text_column, "size": stat.st_size,
                  "mtime_ns": stat.st_mtime_ns}
    features = Features({"text": Value("string")})
    if streaming:
        return IterableDataset.from_generator(_generate_records, features=features, gen_kwargs=gen_kwargs)
    try:
        return Dataset.from_generator(_generate_records, features=features, gen_kwargs=gen_kwargs, cache_dir=cache_dir)
    except DatasetGenerationError as err:  # datasets wraps our reader's error; show the reader's message
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise


def load_text_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | os.PathLike | list | None = None,
    validation_file: str | os.PathLike | list | None = None,
    text_column: str = "text",
    streaming: bool = False,
    validation_split_percentage: float = 5.0,
    cache_dir: str | None = None,
    seed: int = 0,
) -> DatasetDict | IterableDatasetDict:
    """Raw documents as a DatasetDict (or IterableDatasetDict when streaming) with `train` and `validation`.

    Local files (`train_file`, optional `validation_file`; each one path, a glob or a list of them, read in
    order and concatenated) have a single `text` column. With no files and
    no `dataset_name`, the Hub dataset `roneneldan/TinyStories` is used. When there is no validation file
    or split, `validation_split_percentage` % of the training documents (a seeded random choice) is held
    out; a streaming dataset must bring its own validation data.
    """
    if train_file is not None and dataset_name is not None:
        raise ValueError("give either dataset_name or train_file/validation_file, not both")
    if validation_file is not None and train_file is None:
        raise ValueError("validation_file needs a train_file")
    if train_file is not None:
        splits = {"train": _files_dataset(train_file, text_column, streaming, cache_dir)}
        if validation_file is not None:
            splits["validation"] = _files_dataset(validation_file, text_column, streaming, cache_dir)
        raw = (IterableDatasetDict if streaming else DatasetDict)(splits)
        text_column = "text"
    else:
        raw = load_dataset(
            dataset_name or DEFAULT_DATASET, dataset_config_name, streaming=streaming, cache_dir=cache_dir
        )
    if "train" not in raw:
        raise ValueError(f"dataset has no 'train' split (splits: {list(raw)})")
    if "validation" not in raw:
        if streaming:
            raise ValueError("a streaming dataset needs a 'validation' split or a validation_file")
        if not 0 < validation_split_percentage < 100:
            raise ValueError(f"validation_split_percentage must be in (0, 100), got {validation_split_percentage}")
        held_out = raw["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
        raw = DatasetDict({"train": held_out["train"], "validation": held_out["test"]})
    for split in ("train", "validation"):
        columns = raw[split].column_names
        if columns is not None and text_column not in columns:
            raise ValueError(f"{split} split has no column {text_column!r} (columns: {columns})")
    if text_column != "text":
        raw = (IterableDatasetDict if streaming else DatasetDict)(
            {split: raw[split].rename_column(text_column, "text") for split in ("train", "validation")}
        )
    return raw


# ----------------------------------------------------------------------------------------------------
# tokenizer


def train_bpe_tokenizer(
    texts_iterator: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on `texts_iterator`.

    Ids 0 and 1 are `<|endoftext|>` (bos = eos, the document separator) and `<|pad|>`. Every byte is in
    the base alphabet, so any unicode text encodes without unknown tokens and decodes back exactly.
    """
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + 2 special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[DOCUMENT_SEPARATOR, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts_iterator, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=DOCUMENT_SEPARATOR,
        eos_token=DOCUMENT_SEPARATOR,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,  # the clean-up would turn " ." into "." and break round trips
    )


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no eos_token; it is needed as the document separator")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked out, any id will do
    # A sentencepiece model loaded without its dependencies can silently encode everything to nothing.
    if not tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"tokenizer {name!r} encodes text to no tokens; is it a complete tokenizer (tokenizer.json)?")
    return tokenizer


def load_or_train_tokenizer(
    tokenizer_name: str | os.PathLike | None = None,
    train_texts: Iterable[str] | None = None,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    output_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load `tokenizer_name` (a folder or Hub id, via AutoTokenizer) or train a BPE on `train_texts`.

    A loaded tokenizer without a pad token gets pad = eos. A trained one is saved to `output_dir` if given.
    """
    if tokenizer_name is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_name), trust_remote_code=trust_remote_code)
        return _check_tokenizer(tokenizer, str(tokenizer_name))
    if train_texts is None:
        raise ValueError("give tokenizer_name or train_texts to train a tokenizer on")
    tokenizer = train_bpe_tokenizer(train_texts, vocab_size=vocab_size, min_frequency=min_frequency)
    if output_dir is not None:
        tokenizer.save_pretrained(str(output_dir))
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# packing


def _tokenize_documents(batch: dict, tokenizer, bos_token_id: int | None, eos_token_id: int) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    prefix = [] if bos_token_id is None else [bos_token_id]
    return {"input_ids": [prefix + document + [eos_token_id] for document in ids]}


def _pack_into_blocks(batch: dict, block_size: int) -> dict:
    stream = list(itertools.chain.from_iterable(batch["input_ids"]))
    usable = len(stream) // block_size * block_size
    blocks = [stream[start : start + block_size] for start in range(0, usable, block_size)]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}  # model shifts labels itself


def pack_dataset(dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, num_proc: int | None = None):
    """Tokenise a dataset with a `text` column and pack it into `block_size` blocks (see module doc).

    Works on Dataset (cached on disk by datasets' fingerprint of tokenizer and block size) and on
    IterableDataset (lazy).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    _check_tokenizer(tokenizer, getattr(tokenizer, "name_or_path", ""))
    bos = tokenizer.bos_token_id
    bos = None if bos is None or bos == tokenizer.eos_token_id else bos  # the previous EOS already is the BOS
    map_kwargs = {} if isinstance(dataset, IterableDataset) else {"num_proc": num_proc}
    columns = dataset.column_names
    if columns is None:  # streaming Hub datasets may not know their columns
        dataset, columns = dataset.select_columns(["text"]), ["text"]
    tokenized = dataset.map(
        _tokenize_documents,
        batched=True,
        remove_columns=columns,
        fn_kwargs={"tokenizer": tokenizer, "bos_token_id": bos, "eos_token_id": tokenizer.eos_token_id},
        **map_kwargs,
    )
    # Packing changes the number of rows, so every old column must go (a streaming map fails otherwise).
    return tokenized.map(
        _pack_into_blocks,
        batched=True,
        batch_size=PACKING_BATCH_DOCUMENTS,
        remove_columns=["input_ids"],
        fn_kwargs={"block_size": block_size},
        **map_kwargs,
    )


def build_lm_datasets(
    tokenizer: PreTrainedTokenizerBase, block_size: int = 512, num_proc: int | None = None, **load_kwargs
):
    """(train_dataset, eval_dataset) of packed blocks for causal LM training, torch-formatted.

    Each row has `input_ids` and `labels` (equal lists of `block_size` ids; the model shifts labels), so
    `transformers.default_data_collator` batches them. `load_kwargs` go to `load_text_datasets`
    (`dataset_name`, `dataset_config_name`, `train_file`, `validation_file`, `text_column`, `streaming`,
    `validation_split_percentage`, `cache_dir`, `seed`). Non-streaming results are cached on disk and
    reused when the data, tokenizer and block size are the same; streaming returns IterableDatasets.
    """
    raw = load_text_datasets(**load_kwargs)
    train = pack_dataset(raw["train"], tokenizer, block_size, num_proc)
    evaluation = pack_dataset(raw["validation"], tokenizer, block_size, num_proc)
    return train.with_format("torch"), evaluation.with_format("torch")
