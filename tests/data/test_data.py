"""Data loading and encoding: fields, errors, truncation and the loss mask."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from sumcircuit.data import (
    IGNORE_INDEX,
    DataConfig,
    Example,
    Template,
    collate,
    encode,
    load_examples,
    preview,
    resolve_source,
)
from sumcircuit.errors import DataError

from helpers import SHARED_DATA


def _write_jsonl(path: Path, rows: list[object], gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- sources and fields

@pytest.mark.parametrize("folder,split,text_field,summary_fields,n_refs", [
    ("cnndm_gpt4", "train", "article", ("abstract",), 1),
    ("scitldr", "test", "source", ("target",), None),
    ("dialogsum", "train", "dialogue", ("summary",), 1),
    ("dialogsum", "test", "dialogue", ("summary1", "summary2", "summary3"), 3),
])
@pytest.mark.real  # reads the real data sets of ../shared/data
def test_shared_data_sets_detected(folder: str, split: str, text_field: str,
                                   summary_fields: tuple[str, ...], n_refs: int | None) -> None:
    result = load_examples(DataConfig(str(SHARED_DATA / folder), split=split, n_docs=20))
    assert result.source.text_field == text_field
    assert result.source.summary_fields == summary_fields
    assert len(result.examples) == 20 and not result.invalid
    assert len(result.source.sha256 or "") == 64
    for ex in result.examples:
        assert ex.text and ex.summary
        if n_refs is not None:
            assert len(ex.references) == n_refs


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_scitldr_lists_joined_and_multi_reference() -> None:
    ex = load_examples(DataConfig(str(SHARED_DATA / "scitldr" / "test"), n_docs=1)).examples[0]
    raw = json.loads(gzip.open(SHARED_DATA / "scitldr" / "test.jsonl.gz", "rt").readline())
    assert ex.text == " ".join(s.strip() for s in raw["source"])
    assert list(ex.references) == [t.strip() for t in raw["target"]]
    assert ex.doc_id == raw["paper_id"]


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_resolve_source_forms() -> None:
    folder = SHARED_DATA / "cnndm_gpt4"
    assert resolve_source(str(folder), "val") == (str(folder / "val.jsonl.gz"), "val")
    assert resolve_source(str(folder / "train"), None) == (str(folder / "train.jsonl.gz"), "train")
    assert resolve_source("cnn_dailymail", None) == ("hf:abisee/cnn_dailymail:3.0.0", "test")
    with pytest.raises(DataError, match="name the split with `split`"):
        resolve_source(str(folder), None)
    with pytest.raises(DataError, match="data not found"):
        resolve_source("no/such/file.jsonl", None)


def test_csv_and_field_override(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('body,tldr\n"Doc one, with comma.",Sum one\n"Doc two",Sum two\n', encoding="utf-8")
    result = load_examples(DataConfig(str(path), text_field="body", summary_field="tldr"))
    assert [(e.text, e.summary) for e in result.examples] == [("Doc one, with comma.", "Sum one"),
                                                              ("Doc two", "Sum two")]


# ---------------------------------------------------------------- bad records

@pytest.mark.parametrize("row,line_field,reason", [
    ('{"article": "x", "abstract": ', (2, None), "invalid JSON"),
    ({"article": "x"}, (2, "abstract"), "missing"),
    ({"article": "   ", "abstract": "s"}, (2, "article"), "empty"),
    ({"article": 5, "abstract": "s"}, (2, "article"), "got int"),
    ([1, 2], (2, None), "expected a JSON object"),
    ('{"article": "x", "abstract": "s", "article": "y"}', (2, None), "the key 'article' appears twice"),
    ('{"article": ' + "[" * 100_000 + "]" * 100_000 + ', "abstract": "s"}', (2, None), "nested too deeply"),
])
def test_bad_record_names_file_line_field(tmp_path: Path, row: object, line_field: tuple[int, str | None],
                                          reason: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl.gz", [{"article": "ok", "abstract": "fine"}, row], gz=True)
    with pytest.raises(DataError) as err:
        load_examples(DataConfig(str(path)))
    line, field = line_field
    assert err.value.file == str(path) and err.value.line == line and err.value.field == field
    assert reason in str(err.value) and f"bad.jsonl.gz:{line}" in str(err.value)
    skipped = load_examples(DataConfig(str(path), skip_invalid=True))
    assert len(skipped.examples) == 1 and len(skipped.invalid) == 1


def test_preview_counts_invalid(tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = [{"article": "word " * 50, "abstract": "short summary"}, "not json",
            {"article": "tiny doc", "abstract": "s"}]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    report = preview(DataConfig(str(path), max_tokens=30), tiny_tokenizer)
    assert (report["records"], report["valid"], report["invalid"]) == (3, 2, 1)
    assert "p.jsonl:2" in report["invalid_examples"][0]
    assert report["truncated_documents"] == 1
    assert report["total_tokens"]["max"] <= 30


# ---------------------------------------------------------------- encoding

def _example(text: str = "The cat sat on the mat. " * 20, summary: str = "A cat sat.") -> Example:
    return Example("d1", text, (summary,), "mem:1")


def test_template_parsing() -> None:
    t = Template.parse("{document}\nTL;DR: {summary}")
    assert (t.pre, t.mid, t.post, t.has_summary) == ("", "\nTL;DR: ", "", True)
    assert not Template.parse("{text}").has_summary
    for bad in ("no slots", "{summary} {document}", "{document} {document}"):
        with pytest.raises(DataError):
            Template.parse(bad)


def test_loss_mask_covers_exactly_summary_tokens(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = _example()
    enc = encode(tiny_tokenizer, ex, max_tokens=1024)
    s0, s1 = enc.summary_span
    labelled = [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    assert labelled == list(range(s0, s1))
    assert [enc.input_ids[i] for i in labelled] == enc.labels[s0:s1]
    assert enc.input_ids[-1] == tiny_tokenizer.eos_token_id
    # the summary tokens decode to the summary (with the space moved off the separator)
    assert tiny_tokenizer.decode(enc.input_ids[s0:s1 - 1]) == " " + ex.summary
    assert tiny_tokenizer.decode(enc.input_ids[:s0]) == ex.text + "\nTL;DR:"
    assert not enc.truncated


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_truncation_keeps_summary_intact(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = _example(text="Long document sentence number. " * 200, summary="The summary stays whole.")
    full = encode(tiny_tokenizer, ex, max_tokens=4096)
    cut = encode(tiny_tokenizer, ex, max_tokens=64)
    assert len(cut.input_ids) == 64 and cut.truncated and not cut.summary_truncated
    f0, f1 = full.summary_span
    c0, c1 = cut.summary_span
    assert cut.input_ids[c0:c1] == full.input_ids[f0:f1]  # summary + EOS untouched
    d0, d1 = cut.document_span
    assert cut.input_ids[d0:d1] == full.input_ids[full.document_span[0]:full.document_span[0] + d1 - d0]
    assert cut.document_tokens == full.document_span[1] - full.document_span[0]
    # the generation prompt truncates the document identically
    prompt = encode(tiny_tokenizer, ex, max_tokens=64, with_summary=False)
    assert prompt.input_ids == cut.input_ids[:c0]


def test_generation_prompt_does_not_depend_on_reference(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "Long document sentence number. " * 200
    short = encode(tiny_tokenizer, _example(text, "Tiny."), max_tokens=96, with_summary=False, summary_budget=32)
    long = encode(tiny_tokenizer, _example(text, "A much longer reference summary " * 4), max_tokens=96,
                  with_summary=False, summary_budget=32)
    assert short.input_ids == long.input_ids
    assert len(short.input_ids) == 96 - 32  # room for 32 generated tokens
    assert tiny_tokenizer.decode(short.input_ids).endswith("\nTL;DR:")


def test_text_template_is_verbatim_document(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = Example("d", "Just some text, verbatim.", (), "mem:1")
    enc = encode(tiny_tokenizer, ex, template="{text}", max_tokens=100)
    assert tiny_tokenizer.decode(enc.input_ids) == ex.text
    assert enc.summary_span[0] == enc.summary_span[1] and all(x == IGNORE_INDEX for x in enc.labels)


def test_special_token_text_is_not_a_control_token(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = _example(text="A document that mentions <|endoftext|> literally.")
    enc = encode(tiny_tokenizer, ex)
    doc = enc.input_ids[enc.document_span[0]:enc.document_span[1]]
    assert tiny_tokenizer.eos_token_id not in doc


def test_collate_right_and_left_padding(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    a = encode(tiny_tokenizer, _example(text="short doc."), max_tokens=64)
    b = encode(tiny_tokenizer, _example(text="a much longer document " * 5), max_tokens=64)
    pad = tiny_tokenizer.pad_token_id
    right = collate([a, b], pad, "right")
    n = len(a.input_ids)
    assert right["input_ids"][0, :n].tolist() == a.input_ids
    assert right["attention_mask"][0].sum().item() == n
    assert (right["labels"][0, n:] == IGNORE_INDEX).all()
    assert right["summary_mask"][0].nonzero().flatten().tolist() == list(range(*a.summary_span))
    left = collate([a, b], pad, "left")
    off = left["input_ids"].shape[1] - n
    assert left["input_ids"][0, off:].tolist() == a.input_ids
    assert left["attention_mask"][0, :off].sum().item() == 0
    assert torch.equal(left["summary_mask"][1], right["summary_mask"][1])


@pytest.mark.real
@pytest.mark.parametrize("folder,split", [("cnndm_gpt4", "val"), ("scitldr", "test"), ("dialogsum", "test")])
def test_real_tokenizer_on_shared_data(smollm2, folder: str, split: str) -> None:  # type: ignore[no-untyped-def]
    tok = smollm2.tokenizer
    examples = load_examples(DataConfig(str(SHARED_DATA / folder), split=split, n_docs=5)).examples
    for ex in examples:
        enc = encode(tok, ex, max_tokens=512)
        assert len(enc.input_ids) <= 512
        s0, s1 = enc.summary_span
        assert tok.decode(enc.input_ids[s0:s1 - 1]).strip() == ex.summary
        assert enc.input_ids[-1] == tok.eos_token_id
        assert sum(lab != IGNORE_INDEX for lab in enc.labels) == s1 - s0


def test_byte_order_mark_of_excel_files_is_not_part_of_the_first_field(tmp_path: Path) -> None:
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfarticle,highlights\r\nDoc one.,Sum one\r\n")
    jsonl_path = tmp_path / "bom.jsonl"
    jsonl_path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"article": "Doc", "abstract": "Sum"}).encode() + b"\n")
    assert [(e.text, e.summary) for e in load_examples(DataConfig(str(csv_path))).examples] == [("Doc one.", "Sum one")]
    assert [(e.text, e.summary) for e in load_examples(DataConfig(str(jsonl_path))).examples] == [("Doc", "Sum")]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".csv.gz"])
def test_a_decompression_bomb_is_a_one_line_error_in_bounded_memory(suffix: str, tmp_path: Path) -> None:
    import resource

    from sumcircuit.data.sources import MAX_RECORD_BYTES

    path = tmp_path / f"bomb{suffix}"
    header = b"article,highlights\n" if suffix == ".csv.gz" else b""
    with gzip.open(path, "wb", compresslevel=9) as fh:  # ~40 kB on disk, 40 MiB without a line break
        fh.write(header + b'"' + b"a" * (40 * 2**20))
    assert path.stat().st_size < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"bomb.*:\d+: .*longer than 16 MiB") as err:
        load_examples(DataConfig(str(path), skip_invalid=True))
    assert err.value.file == str(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 8 * MAX_RECORD_BYTES / 2**20  # a few copies of one record at most, not the whole file
