"""Suspect data is reported (counted, with line numbers), and text files are read as UTF-8 with errors that say
where and why (a byte-order mark is handled, a null value is not called missing)."""

import codecs
import json

import pytest

from lorakit.text_files import decode_text
from lorakit.train.data import DataConfig, build_datasets, load_splits
from tests.tiny import tiny_tokenizer
from tests.train_fixtures import format_rows, write_rows


def findings(path, *, task="CAUSAL_LM", **settings) -> dict[str, str]:
    _, _, info = build_datasets(DataConfig(path=str(path), **settings), tiny_tokenizer(), task)
    return {f.kind: f.message for f in info.findings}


def test_clean_data_has_no_findings(tmp_path):
    assert findings(write_rows(tmp_path / "a.jsonl", format_rows("alpaca", 12)), val_size=3) == {}


def test_empty_answers_are_counted_with_their_lines(tmp_path):
    rows = format_rows("alpaca", 8)
    rows[2]["output"], rows[5]["output"] = "", "   "
    found = findings(write_rows(tmp_path / "a.csv", rows))
    assert found["empty_answers"].startswith("2 of 8 training answers are empty (")
    assert "a.csv: line 4, line 7)" in found["empty_answers"]  # CSV: the header is line 1


def test_empty_completions_and_texts(tmp_path):
    completions = [{"prompt": "p", "completion": ""}, {"prompt": "q", "completion": "x"}]
    assert "1 of 2 training answers are empty" in findings(write_rows(tmp_path / "c.jsonl", completions))[
        "empty_answers"]
    texts = [{"text": ""}, {"text": "abc"}]
    assert "1 of 2 training texts are empty" in findings(write_rows(tmp_path / "t.jsonl", texts))["empty_answers"]


def test_answers_cut_by_cutoff_len(tmp_path):
    rows = [{"instruction": "q", "output": "a" * (40 if i % 2 else 2)} for i in range(6)]
    message = findings(write_rows(tmp_path / "a.jsonl", rows), cutoff_len=30)["cut_by_cutoff_len"]
    assert message.startswith("3 of 6 training examples are longer than data.cutoff_len=30 and cut there "
                              "(")
    assert "a.jsonl: line 2, line 4, line 6)" in message and "does not learn to stop" in message
    every = findings(write_rows(tmp_path / "b.jsonl", rows[1::2]), cutoff_len=30)["cut_by_cutoff_len"]
    assert every.startswith("all 3 training examples are longer than data.cutoff_len=30")


def test_a_prompt_cut_before_its_answer_is_not_an_answer_cut(tmp_path):
    """Only examples that lose trained tokens count; one whose trained tokens all survive does not."""
    rows = [{"instruction": "q", "output": "a"}] * 2
    assert "cut_by_cutoff_len" not in findings(write_rows(tmp_path / "a.jsonl", rows), cutoff_len=64)


def test_validation_records_that_are_also_training_records(tmp_path):
    rows = format_rows("alpaca", 6)
    val = [rows[1], {"instruction": "new", "output": "1"}, rows[4]]
    message = findings(write_rows(tmp_path / "t.jsonl", rows), val_path=write_rows(tmp_path / "v.jsonl", val))[
        "duplicates"]
    assert message.startswith("2 of 3 validation records also occur in the training data (")
    assert "v.jsonl, line 1 (record 0) = " in message and "t.jsonl, line 2 (record 1)" in message
    assert "v.jsonl, line 3 (record 2) = " in message and "t.jsonl, line 5 (record 4)" in message


def test_duplicates_within_one_file_split_by_val_size(tmp_path):
    rows = format_rows("alpaca", 10) + format_rows("alpaca", 10)  # every record twice
    assert "validation records also occur in the training data" in findings(
        write_rows(tmp_path / "t.jsonl", rows), val_size=4)["duplicates"]


def test_label_sets_that_differ_between_splits(tmp_path):
    train = write_rows(tmp_path / "t.jsonl", format_rows("text_label", 9))
    val = write_rows(tmp_path / "v.jsonl", [{"text": "x", "label": "positive"}])
    message = findings(train, task="SEQ_CLS", val_path=val)["label_sets_differ"]
    assert message.startswith("classes in the training data but never in the validation data: "
                              "['negative', 'neutral']")


def test_a_single_class(tmp_path):
    rows = [{"text": f"t{i}", "label": "spam"} for i in range(5)]
    message = findings(write_rows(tmp_path / "t.jsonl", rows), task="SEQ_CLS")["single_class"]
    assert message.startswith("every one of the 5 training records has the label 'spam'")


def test_a_stray_class_id(tmp_path):
    rows = [{"text": f"t{i}", "label": [0, 1, 2][i % 3]} for i in range(9)]
    rows[4]["label"] = 7
    message = findings(write_rows(tmp_path / "t.jsonl", rows), task="SEQ_CLS")["class_id_gaps"]
    assert message.startswith("the integer class ids skip 3, 4, 5, 6: labels above them (")
    assert "t.jsonl: line 5) give the classifier 8 outputs, 4 of which no record has" in message


def test_findings_are_logged_as_warnings(tmp_path, caplog):
    rows = format_rows("alpaca", 4)
    rows[0]["output"] = ""
    build_datasets(DataConfig(path=write_rows(tmp_path / "a.jsonl", rows)), tiny_tokenizer())
    assert "1 of 4 training answers are empty (" in caplog.text and "a.jsonl: line 1)" in caplog.text


# ---- reading text ------------------------------------------------------------------------------------
def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(codecs.BOM_UTF8 + "instruction,output\nhi,there\n".encode())
    [record] = load_splits(DataConfig(path=str(path))).train
    assert record.messages[0]["content"] == "hi"  # the header read 'instruction', not '\ufeffinstruction'
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + json.dumps({"text": "a"}).encode() + b"\n")
    assert len(load_splits(DataConfig(path=str(jsonl))).train) == 1


def test_non_utf8_names_file_line_column_and_encoding():
    with pytest.raises(ValueError, match=r"^d\.jsonl, line 2, column 4: byte 0xe9 is not valid UTF-8 \(lorakit reads "
                                         r"data as UTF-8\); it looks like Windows-1252 \(CP1252\) text\. Save the file "
                                         r"as UTF-8, e\.g\. iconv -f CP1252 -t UTF-8 d\.jsonl > converted\.jsonl$"):
        decode_text("ok\ncaf\xe9\n".encode("latin-1"), "d.jsonl", "data")


@pytest.mark.parametrize("encoding, bom", [("UTF-16LE", codecs.BOM_UTF16_LE), ("UTF-16BE", codecs.BOM_UTF16_BE),
                                           ("UTF-32LE", codecs.BOM_UTF32_LE)])
def test_other_byte_order_marks_are_named(encoding, bom):
    with pytest.raises(ValueError, match=rf"x\.csv is {encoding} text \(it starts with a {encoding} byte-order mark\)"):
        decode_text(bom + "a".encode(encoding.lower().replace("le", "-le").replace("be", "-be")), "x.csv")


def test_a_null_value_is_not_called_missing(tmp_path):
    with pytest.raises(ValueError, match=r"line 1 \(record 0\): field 'output' is null") as err:
        load_splits(DataConfig(path=write_rows(tmp_path / "a.jsonl", [{"instruction": "q", "output": None}])))
    assert "missing" not in str(err.value).split("(format")[0]
    with pytest.raises(ValueError, match=r"record 0: missing required field 'output'"):
        load_splits(DataConfig(path=write_rows(tmp_path / "b.json", [{"instruction": "q"}]), format="alpaca"))
    with pytest.raises(ValueError, match=r"field 'label' is null"):
        load_splits(DataConfig(path=write_rows(tmp_path / "c.jsonl", [{"text": "q", "label": None}])))
