"""Each kind of bad input: an error that names the culprit, or a count in the summary."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from data_prep import DataPrepError
from data_prep.__main__ import main
from data_prep.corpus import CorpusConfig, read_corpus
from prep_helpers import read_tree, write_files


def _read(root, **kw):
    return read_corpus(CorpusConfig(inputs=[str(root)], **kw), progress=False)


def test_missing_input_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataPrepError, match=f"input {missing}: no such file or directory"):
        _read(missing)
    with pytest.raises(DataPrepError, match=r"no file matches this pattern"):
        _read(tmp_path / "*.txt")


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n")
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    with pytest.raises(DataPrepError, match=r"cannot read input file://.*dangling\.txt"):
        _read(tmp_path)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe and \xc3 and \xe2\x82 end\n")
    (tmp_path / "good.txt").write_bytes("caf\u00e9 \ufffd already there\n".encode())
    docs, stats = _read(tmp_path)
    assert (stats.undecodable_documents, stats.undecodable_sequences) == (1, 4)
    assert docs[0].text == "ok \ufffd\ufffd and \ufffd and \ufffd end\n"


def test_empty_binary_and_other_files_are_skipped_and_counted(tmp_path):
    write_files(str(tmp_path), {
        "a.txt": b"text\n", "empty.txt": b"", "blob.txt": b"\x00\x01\x02", "image.png": b"\x89PNG",
        "lines.jsonl": b'{"text": ""}\n\n{"text": "kept"}\n',
    })
    docs, stats = _read(tmp_path)
    assert [d.text for d in docs] == ["text\n", "kept"]
    assert stats.skipped == {"binary": 1, "empty": 2, "extension": 1}
    assert stats.files == 4


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "one"}\n{"text": "two"}\n{"text": oops}\n{"body": "x"}\n'))
    with pytest.raises(DataPrepError, match=r"c\.jsonl\.gz line 3: malformed JSON"):
        _read(path)
    docs, stats = _read(path, skip_bad_json=True)
    assert [d.text for d in docs] == ["one", "two"]
    assert stats.skipped == {"bad_json": 2}
    with pytest.raises(DataPrepError, match=r"line 1: no string field 'body'"):
        _read(path, text_field="body")
    with pytest.raises(DataPrepError, match=r"not a valid gzip file"):
        (tmp_path / "d.jsonl.gz").write_bytes(b"not gzip")
        _read(tmp_path / "d.jsonl.gz")


def test_corpus_smaller_than_one_window_is_a_clear_error(make_shards, tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    with pytest.raises(DataPrepError, match=r"the train split holds \d+ tokens in 1 documents, fewer than one window"):
        make_shards(tmp_path / "ds", inputs=[str(tmp_path / "tiny.txt")], val_fraction=0.0)


def test_val_fraction_that_selects_nothing_is_an_error(make_shards, tmp_path):
    (tmp_path / "one.txt").write_text("a single document\n" * 50)
    with pytest.raises(DataPrepError, match=r"put none of the 1 documents in val"):
        make_shards(tmp_path / "ds", inputs=[str(tmp_path / "one.txt")], val_fraction=1e-9)


def test_other_configuration_refused_unless_overwrite(make_shards, tmp_path, capsys, corpus_dir, tokenizer_path):
    out = tmp_path / "ds"
    make_shards(out)
    argv = ["shards", "--input", str(corpus_dir), "--tokenizer", tokenizer_path, "--out", str(out),
            "--seq-len", "16", "--val-fraction", "0.1", "--windows-per-shard", "16", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{out}/manifest.json was written by another configuration" in err and "seq_len" in err
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 16
    fresh = tmp_path / "fresh"
    make_shards(fresh, seq_len=16)
    assert read_tree(str(out)) == read_tree(str(fresh)), "nothing of the old dataset is left"


def test_an_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    (tmp_path / "data[1].txt").write_text("the literal file\n")
    (tmp_path / "data1.txt").write_text("what the pattern would match\n")
    for url in (str(tmp_path / "data[1].txt"), f"file://{tmp_path}/data[1].txt"):
        docs, _ = _read(url)
        assert [d.text for d in docs] == ["the literal file\n"]


def test_a_corrupt_gzip_stream_is_named(tmp_path):
    good = gzip.compress(b'{"text": "one"}\n' * 50)
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(good[:10] + b"\xff" * 8 + good[18:])  # valid header, invalid deflate block
    with pytest.raises(DataPrepError, match=r"broken\.jsonl\.gz: not a valid gzip file"):
        _read(path)



def test_unknown_scheme_and_unwritable_output_are_clear_errors(tmp_path, capsys, tokenizer_path, corpus_dir):
    with pytest.raises(DataPrepError, match=r"zz://q: Protocol not known"):
        _read("zz://q")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    code = main(["shards", "--input", str(corpus_dir), "--tokenizer", tokenizer_path,
                 "--out", str(blocker / "ds"), "--seq-len", "16", "--val-fraction", "0.1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Not a directory" in err and str(blocker) in err
