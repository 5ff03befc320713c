"""trm_lm.data reading malformed files (each error names the file and line) and multi-megabyte single lines.
"""

import json

import pytest
from helpers import big_prompt, garbage

from trm_lm.data import load_text_datasets, read_documents


# ----------------------------------------------------------------------------------------------------
# data loading


@pytest.mark.parametrize("name, content, message", [
    ("garbage.jsonl", garbage(4096), r"garbage\.jsonl line 1: not valid UTF-8 \(byte 0x"),
    ("garbage.txt", garbage(4096), r"garbage\.txt line 1: not valid UTF-8 \(byte 0x"),
    ("garbage.json", garbage(4096), r"garbage\.json line 1: not valid UTF-8 \(byte 0x"),
    ("garbage.parquet", garbage(4096), r"garbage\.parquet: not a readable Parquet file"),
    ("binary.jsonl", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), r"binary\.jsonl line 1: invalid JSON"),
    ("utf16.jsonl", '{"text": "a"}\n'.encode("utf-16"), r"utf16\.jsonl line 1: not valid UTF-8 \(byte 0xff"),
    ("truncated.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c', r"truncated\.jsonl line 3: invalid JSON"),
    ("array.jsonl", json.dumps([{"text": "a"}, {"text": "b"}]).encode(),
     r"array\.jsonl line 1: expected a JSON object with a 'text' field, got list"),
    ("array_pretty.jsonl", json.dumps([{"text": "a"}], indent=2).encode(), r"array_pretty\.jsonl line 1: invalid JSON"),
    ("object.json", json.dumps({"text": "a"}, indent=2).encode(), r"object\.json line 1: invalid JSON"),
    ("nan.jsonl", b'{"text": NaN}\n', r"nan\.jsonl line 1: field 'text' must be a string, got float"),
    ("items.json", json.dumps([{"text": "a"}, "b"]).encode(), r"items\.json item 1: expected a JSON object"),
    pytest.param("deep.jsonl", b"[" * 100_000 + b"\n", r"deep\.jsonl line 1", id="deep.jsonl"),
    pytest.param("deep.json", b"[" * 100_000, r"deep\.json( line \d+)?: invalid JSON",
                 id="deep.json"),
    pytest.param("bigint.jsonl", b'{"text": "a"}\n{"text": "b", "n": ' + b"9" * 5000 + b"}\n", r"bigint\.jsonl line 2", id="bigint.jsonl"),
    pytest.param("surrogate.jsonl", b'{"text": "a"}\n{"text": "Tom \\ud800"}\n', r"surrogate\.jsonl line 2", id="surrogate.jsonl"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_documents(path)
    with pytest.raises(ValueError, match=message):  # also through datasets, whose own errors must not hide ours
        load_text_datasets(train_file=path, validation_file=path, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("name", ["huge.jsonl", "huge.txt"])
def test_a_multi_megabyte_single_line_loads(tmp_path, name):
    story = big_prompt(4_000_000)  # one 4 MB document on one line
    path = tmp_path / name
    path.write_text(json.dumps({"text": story}) + "\n" if name.endswith(".jsonl") else story, encoding="utf-8")
    assert read_documents(path) == [story]
    raw = load_text_datasets(train_file=path, validation_file=path, cache_dir=str(tmp_path / "cache"))
    assert list(raw["train"]["text"]) == [story]


