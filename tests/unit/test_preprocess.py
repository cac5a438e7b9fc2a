from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.data.indexed_dataset import IndexedDataset
from llm.data.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER, run, script, script_main

DOCS = [
    "First document about lists.",
    "Zweites Dokument: Größe ✓",
    "def f():\n    return 1\n",
    "日本語の文書",
]


def _preprocess(*args: str) -> tuple[int, str, str]:
    p = run(["python", script("preprocess_data.py"), "--tokenizer", str(TOKENIZER), "--no-progress", *args])
    return p.returncode, p.stdout, p.stderr


def _expected(docs: list[str]) -> list[list[int]]:
    tok = load_tokenizer(TOKENIZER)
    return [tok.encode(d) + [tok.eos_id] for d in docs]


def test_jsonl_text_and_eos(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    rc, out, err = _preprocess("--input", str(src), "--output-prefix", str(tmp_path / "out"))
    assert rc == 0, err
    ds = IndexedDataset(tmp_path / "out")
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == _expected(DOCS)
    assert "documents: 4" in out and "skipped: 0" in out


def test_all_input_kinds_dirs_and_globs(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(DOCS[0])
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": DOCS[1]}) + "\n")
    pq.write_table(pa.table({"content": [DOCS[2], DOCS[3]]}), d / "sub" / "c.parquet")
    (d / "ignored.csv").write_text("x")
    rc, out, err = _preprocess(
        "--input", str(d), "--json-key", "content", "--output-prefix", str(tmp_path / "o1")
    )
    assert rc == 0, err
    ds = IndexedDataset(tmp_path / "o1")
    assert [ds[i].tolist() for i in range(len(ds))] == _expected(
        DOCS
    )  # sorted: a.txt, b.jsonl.gz, sub/c.parquet
    rc, _, err = _preprocess("--input", str(d / "*.txt"), "--output-prefix", str(tmp_path / "o2"))
    assert rc == 0, err
    assert len(IndexedDataset(tmp_path / "o2")) == 1


def _malformed_file(path: Path) -> None:
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b"{not json",
        json.dumps({"body": "missing field"}).encode(),
        b'{"text": "bad \xff\xfe utf8"}',
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "good two"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_malformed_records_are_skipped_and_counted(tmp_path: Path) -> None:
    _malformed_file(tmp_path / "m.jsonl")
    rc, out, err = _preprocess("--input", str(tmp_path / "m.jsonl"), "--output-prefix", str(tmp_path / "o"))
    assert rc == 0, err
    assert "documents: 2" in out
    assert (
        "skipped: 5 (empty_text: 1, invalid_json: 1, invalid_utf8: 1, missing_field: 1, not_a_string: 1)"
        in out
    )
    assert len(IndexedDataset(tmp_path / "o")) == 2


def test_strict_fails_on_first_bad_record_with_file_and_line(tmp_path: Path) -> None:
    _malformed_file(tmp_path / "m.jsonl")
    rc, out, err = _preprocess(
        "--input", str(tmp_path / "m.jsonl"), "--output-prefix", str(tmp_path / "o"), "--strict"
    )
    assert rc == 1
    assert f"{tmp_path / 'm.jsonl'}:2: malformed record (invalid_json)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.idx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # no temporary files left


def test_workers_give_byte_identical_output(builtin_prefix: Path, tmp_path: Path) -> None:
    src = tmp_path / "corpus.jsonl"
    from llm.data.builtin_corpus import write_corpus

    write_corpus(src, max_documents=300)
    outputs = []
    for workers in (1, 4):
        prefix = tmp_path / f"w{workers}"
        rc, _, err = _preprocess(
            "--input", str(src), "--output-prefix", str(prefix), "--workers", str(workers)
        )
        assert rc == 0, err
        outputs.append((prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0]) > 100_000


def test_hf_dataset_from_local_save_to_disk(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS}),
            "validation": datasets.Dataset.from_dict({"text": DOCS[:1]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    rc, out, err = _preprocess(
        "--hf-dataset", str(tmp_path / "ds"), "--split", "train", "--output-prefix", str(tmp_path / "o")
    )
    assert rc == 0, err
    ds = IndexedDataset(tmp_path / "o")
    assert [ds[i].tolist() for i in range(len(ds))] == _expected(DOCS)
    rc, _, err = _preprocess(
        "--hf-dataset", str(tmp_path / "ds"), "--split", "nope", "--output-prefix", str(tmp_path / "x")
    )
    assert rc == 1 and "no split 'nope'" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "/nonexistent/x.jsonl"], "input '/nonexistent/x.jsonl' does not exist"),
        (["--input", "/nonexistent/*.jsonl"], "matches no file"),
    ],
)
def test_missing_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    rc, _, err = _preprocess(*args, "--output-prefix", str(tmp_path / "o"))
    assert rc == 1
    assert message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_unwritable_output_is_one_clear_line(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "x"}) + "\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, _, err = _preprocess("--input", str(src), "--output-prefix", str(blocker / "out"))
    assert rc == 1 and "error:" in err and "Traceback" not in err


def test_interrupted_run_leaves_no_valid_looking_output(tmp_path: Path) -> None:
    from llm.data.preprocess import preprocess
    from llm.data.sources import Record

    def records():
        yield Record("str", "one document", "mem", 1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess(records(), tokenizer=str(TOKENIZER), output_prefix=tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_binary_or_empty_input_is_refused_naming_the_file(tmp_path: Path) -> None:
    main = script_main("preprocess_data.py")
    out = tmp_path / "out"

    def preprocess(*inputs: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
        err, stdout = io.StringIO(), io.StringIO()
        argv = ["--input", *map(str, inputs), "--tokenizer", str(TOKENIZER), "--output-prefix", str(out),
                "--workers", "1", "--no-progress", *extra]  # fmt: skip
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            status = main(argv)
        return status, stdout.getvalue(), err.getvalue()

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert preprocess(good)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out.*")}

    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    nul = tmp_path / "nul.jsonl"
    nul.write_text("".join(json.dumps({"text": f"doc {i}\u0000"}) + "\n" for i in range(5)))
    mixed = tmp_path / "mixed.jsonl"  # 200 records, 30 of them not UTF-8: 15%
    mixed.write_bytes(b"".join(b'{"text": "bad \xff\xfe"}\n' if i % 20 < 3 else b'{"text": "fine"}\n'
                               for i in range(200)))  # fmt: skip
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    other_field = tmp_path / "content.jsonl"
    other_field.write_text(json.dumps({"content": "a document"}) + "\n")
    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    for inputs, says in [
        ((good, binary), f"'{binary}' does not look like text: 1 of its 1 records"),
        ((nul,), f"'{nul}' does not look like text: 5 of its 5 records hold NUL bytes"),
        ((mixed,), f"'{mixed}' does not look like text: 30 of its 200 records"),
        ((empty,), "the input gave no document (empty_text: 1); nothing was written"),
        ((other_field,), "(missing_field: 1); nothing was written; no record has a field 'text': name the text "
                         "field with --json-key"),
        ((gz,), f"'{gz}' is not a complete gzip file"),
    ]:
        status, _, err = preprocess(*inputs)
        assert status == 1 and err.startswith("error: ") and says in err and err.count("\n") == 1, err
        assert {p.name: p.read_bytes() for p in tmp_path.glob("out.*")} == before  # the old output kept
    status, stdout, _ = preprocess(mixed, extra=("--max-not-text", "0.2"))
    assert status == 0 and "documents: 170" in stdout and "invalid_utf8: 30" in stdout
