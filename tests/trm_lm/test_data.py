"""trm_lm.data: file formats, malformed input, tokenizer, packing, caching, streaming."""
import itertools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import IterableDataset

from trm_lm.data import (
    DOCUMENT_SEPARATOR,
    build_lm_datasets,
    load_or_train_tokenizer,
    load_text_datasets,
    read_documents,
)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "src": "test"}) + "\n" for t in texts), encoding="utf-8")
    return path


def write_file(path, texts):
    """Write `texts` in the format given by the file suffix."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, texts)
    if path.suffix == ".json":
        path.write_text(json.dumps([{"text": t} for t in texts], indent=1), encoding="utf-8")
    elif path.suffix == ".parquet":
        pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path)
    elif path.suffix == ".txt":
        path.write_text("".join(f"{t}\n{DOCUMENT_SEPARATOR}\n" for t in texts), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("name", ["d.txt", "d.jsonl", "d.json", "d.parquet"])
def test_each_format_loads_the_same_documents(tmp_path, stories, name):
    train, valid = stories[:12], stories[12:15]
    train_path = write_file(tmp_path / f"train_{name}", train)
    valid_path = write_file(tmp_path / f"valid_{name}", valid)
    assert read_documents(train_path) == train
    raw = load_text_datasets(train_file=train_path, validation_file=valid_path)
    assert raw["train"]["text"] == train
    assert raw["validation"]["text"] == valid


def test_json_lines_under_json_name(tmp_path, stories):
    path = write_jsonl(tmp_path / "lines.json", stories[:5])
    assert read_documents(path) == stories[:5]


def test_txt_separators_on_their_own_line_and_inline(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text(
        f"{DOCUMENT_SEPARATOR}\n"  # a leading separator gives no empty document
        "First story.\nSecond paragraph ✓.\n"
        f"{DOCUMENT_SEPARATOR}\n"
        f"Second story.{DOCUMENT_SEPARATOR}Third story, inline.\n"
        f"  {DOCUMENT_SEPARATOR}{DOCUMENT_SEPARATOR}\n"  # an empty document between two separators is dropped
        "Fourth story without a final separator.\n",
        encoding="utf-8",
    )
    assert read_documents(path) == [
        "First story.\nSecond paragraph ✓.",
        "Second story.",
        "Third story, inline.",
        "Fourth story without a final separator.",
    ]


def test_real_tinystories_txt(shared_data):
    raw = shared_data / "tinystories" / "raw"
    validation = read_documents(raw / "hf_validation_first_1000__BhargavKumarNath_NanoGPT.txt")
    assert len(validation) == 1000  # PROVENANCE.md: stories 0-999 of the HF validation split
    assert validation[0].startswith("Spot. Spot saw the shiny car")
    assert all(DOCUMENT_SEPARATOR not in story and story == story.strip() for story in validation)
    assert len(read_documents(raw / "v1_train_first_2MiB__gusjengis_toy-RNN.txt")) == 2316 + 1  # + the cut one


def test_validation_split_held_out_from_train(tmp_path, stories):
    path = write_jsonl(tmp_path / "train.jsonl", stories[:40])
    raw = load_text_datasets(train_file=path, validation_split_percentage=25)
    train, valid = list(raw["train"]["text"]), list(raw["validation"]["text"])
    assert len(valid) == 10 and len(train) == 30
    assert sorted(train + valid) == sorted(stories[:40])
    with pytest.raises(ValueError, match="validation_split_percentage"):
        load_text_datasets(train_file=path, validation_split_percentage=0)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"text": "unterminated}', "invalid JSON"),
        ('{"story": "no text field"}', "no 'text' field"),
        ('{"text": 17}', "field 'text' must be a string, got int"),
        ('["text"]', "expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n\n' + bad_line + '\n{"text": "ok"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"train\.jsonl line 3: {message}"):
        read_documents(path)
    with pytest.raises(ValueError, match=rf"train\.jsonl line 3: {message}"):  # also through datasets
        load_text_datasets(train_file=path)


def test_malformed_json_array_names_item(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": None}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.json item 1: field 'text' must be a string"):
        read_documents(path)


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl"])
def test_non_utf8_names_file_and_line(tmp_path, name):
    path = tmp_path / name
    good = b'{"text": "fine"}\n' if name.endswith("jsonl") else b"fine\n"
    path.write_bytes(good + good.replace(b"fine", b"caf\xe9"))  # latin-1 e-acute
    with pytest.raises(ValueError, match=rf"{name} line 2: not valid UTF-8 \(byte 0xe9"):
        read_documents(path)
    with pytest.raises(ValueError, match=rf"{name} line 2: not valid UTF-8"):
        load_text_datasets(train_file=path)


@pytest.mark.parametrize("content", ["", "\n\n", f"\n{DOCUMENT_SEPARATOR}\n{DOCUMENT_SEPARATOR}\n"])
def test_file_without_documents(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt: the file contains no documents"):
        read_documents(path)
    with pytest.raises(ValueError, match="contains no documents"):
        load_text_datasets(train_file=path)


def test_bad_paths_and_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_documents(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_text_datasets(train_file=tmp_path / "data.csv")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="ints.parquet: column 'text' must hold strings"):
        read_documents(tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="no column 'story'"):
        read_documents(tmp_path / "ints.parquet", text_column="story")
    with pytest.raises(ValueError, match="not both"):
        load_text_datasets(dataset_name="x/y", train_file=tmp_path / "data.csv")


# ----------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_special_tokens_and_unicode_round_trip(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1]) == [DOCUMENT_SEPARATOR, "<|pad|>"]
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    assert len(tokenizer) == 512
    for text in ["Ünïcödé ✓", "Hi . I do n't know ,  two  spaces\nnew line", "日本語 🙂 \t tab"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # learned merges: common English is shorter in tokens than in bytes
    sentence = "Once upon a time, there was a little girl named Lily."
    assert len(tokenizer(sentence)["input_ids"]) < len(sentence.encode()) / 2


def test_load_or_train_tokenizer(tmp_path, stories, tokenizer):
    trained = load_or_train_tokenizer(train_texts=stories[:300], vocab_size=512, output_dir=tmp_path / "tok")
    text = stories[400]
    assert trained(text)["input_ids"] == tokenizer(text)["input_ids"]  # training is deterministic
    loaded = load_or_train_tokenizer(tmp_path / "tok")
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 0, 1)
    with pytest.raises(ValueError, match="tokenizer_name or train_texts"):
        load_or_train_tokenizer()


def test_loaded_tokenizer_without_pad_gets_eos(tmp_path, tokenizer):
    from transformers import PreTrainedTokenizerFast

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=DOCUMENT_SEPARATOR)
    no_pad.save_pretrained(tmp_path / "no_pad")
    loaded = load_or_train_tokenizer(tmp_path / "no_pad")
    assert loaded.pad_token_id == loaded.eos_token_id == 0


# ----------------------------------------------------------------------------------------------------
# packing, caching, streaming


@pytest.fixture()
def small_files(tmp_path, stories):
    return write_jsonl(tmp_path / "train.jsonl", stories[:150]), write_jsonl(tmp_path / "valid.jsonl", stories[150:180])


def expected_stream(tokenizer, texts):
    """The documents tokenised and joined, each followed by EOS (bos == eos for our tokenizer)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return list(itertools.chain.from_iterable(doc + [tokenizer.eos_token_id] for doc in ids))


def test_packing_gives_full_blocks_of_the_joined_stream(small_files, stories, tokenizer):
    train_file, valid_file = small_files
    train, valid = build_lm_datasets(tokenizer, block_size=64, train_file=train_file, validation_file=valid_file)
    for dataset, texts in [(train, stories[:150]), (valid, stories[150:180])]:
        assert set(dataset.column_names) == {"input_ids", "labels"}
        rows = dataset[:]  # all rows, stacked by the torch format
        blocks = rows["input_ids"]
        assert isinstance(blocks, torch.Tensor) and blocks.shape[1] == 64  # full blocks only
        assert torch.equal(rows["labels"], blocks)
        stream = expected_stream(tokenizer, texts)
        assert blocks.shape[0] == len(stream) // 64
        assert blocks.flatten().tolist() == stream[: blocks.numel()]


def test_packing_adds_a_distinct_bos(small_files, stories, tokenizer):
    from transformers import PreTrainedTokenizerFast

    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, bos_token="<|pad|>", eos_token=DOCUMENT_SEPARATOR
    )  # pretend <|pad|> (id 1) is a separate BOS, as in Llama's <s> ... </s>
    train_file, valid_file = small_files
    train, _ = build_lm_datasets(with_bos, block_size=32, train_file=train_file, validation_file=valid_file)
    first = tokenizer(stories[0], add_special_tokens=False)["input_ids"]
    assert train[:]["input_ids"].flatten().tolist()[: len(first) + 3] == [1] + first + [0, 1]


def test_cache_is_reused_and_keyed_on_block_size_and_file(small_files, tokenizer):
    train_file, valid_file = small_files
    first, _ = build_lm_datasets(tokenizer, block_size=64, train_file=train_file, validation_file=valid_file)
    again, _ = build_lm_datasets(tokenizer, block_size=64, train_file=train_file, validation_file=valid_file)
    assert again._fingerprint == first._fingerprint
    assert again.cache_files == first.cache_files and first.cache_files  # on disk, read back
    other, _ = build_lm_datasets(tokenizer, block_size=32, train_file=train_file, validation_file=valid_file)
    assert other._fingerprint != first._fingerprint
    # a changed file is read again (cache key includes its size and modification time)
    write_jsonl(train_file, ["A new story."] * 100)
    os.utime(train_file, ns=(1, 1))
    changed, _ = build_lm_datasets(tokenizer, block_size=64, train_file=train_file, validation_file=valid_file)
    assert changed._fingerprint != first._fingerprint
    assert changed[0]["input_ids"].tolist() == expected_stream(tokenizer, ["A new story."] * 100)[:64]


def test_streaming_yields_the_same_first_blocks(small_files, tokenizer):
    train_file, valid_file = small_files
    train, valid = build_lm_datasets(tokenizer, block_size=64, train_file=train_file, validation_file=valid_file)
    stream_train, stream_valid = build_lm_datasets(
        tokenizer, block_size=64, train_file=train_file, validation_file=valid_file, streaming=True
    )
    assert isinstance(stream_train, IterableDataset)
    streamed = list(itertools.islice(stream_train, 3))
    for i, row in enumerate(streamed):
        assert torch.equal(row["input_ids"], train[i]["input_ids"])
        assert torch.equal(row["labels"], train[i]["labels"])
    assert torch.equal(next(iter(stream_valid))["input_ids"], valid[0]["input_ids"])
    with pytest.raises(ValueError, match="streaming dataset needs a 'validation'"):
        load_text_datasets(train_file=train_file, streaming=True)
