"""Data pipeline: config validation, file readers, format normalisation, auto-detection and its errors."""

from __future__ import annotations

import csv
import json
import pathlib

import pytest

from lorakit.train.data import DataConfig, load_splits, split_indices
from lorakit.train.data_formats import Chat, Completion, Labelled, Text

ALPACA = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Add", "input": "1+1", "output": "2"},
]


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


# ---- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"format": "chatml"}, "format"),
    ({"val_size": 1.5}, "val_size"),
    ({"val_size": -1}, "val_size"),
    ({"val_size": True}, "val_size"),
    ({"cutoff_len": 0}, "cutoff_len"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ({"max_samples": 0}, "max_samples"),
    ({"template": "llama3"}, "template"),
    ({"text_field": ""}, "text_field"),
    ({"val_size": 0.1, "val_path": "v.json"}, "val_path"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(path="d.json", **kwargs)


def test_config_defaults_and_float_count():
    cfg = DataConfig(path="d.json")
    assert (cfg.format, cfg.cutoff_len, cfg.pad_to_multiple_of, cfg.shuffle_seed) == ("auto", 1024, 8, 42)
    assert not cfg.train_on_inputs and not cfg.packing and cfg.val_size == 0
    assert DataConfig(path="d.json", val_size=10.0).val_size == 10  # YAML "10.0" is a count
    assert DataConfig(path=pathlib.Path("d.json")).path == "d.json"
    with pytest.raises(ValueError, match="packing must be True or False"):
        DataConfig(path="d.json", packing=1)


# ---- readers --------------------------------------------------------------------------------------
def test_every_file_type_reads_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [
        write_json(tmp_path / "list.json", ALPACA),
        write_json(tmp_path / "wrapped.json", {"data": ALPACA}),
        write_jsonl(tmp_path / "rows.jsonl", ALPACA),
        write_jsonl(tmp_path / "lines_saved_as.json", ALPACA),
        write_csv(tmp_path / "rows.csv", ALPACA),
    ]
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "rows.parquet")
    paths.append(str(tmp_path / "rows.parquet"))
    expected = load_splits(DataConfig(path=paths[0])).train
    assert len(expected) == 2 and isinstance(expected[0], Chat)
    for path in paths:
        splits = load_splits(DataConfig(path=path))
        assert splits.format == "alpaca", path
        assert splits.train == expected, path


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "ds"))
    assert len(load_splits(DataConfig(path=str(tmp_path / "ds"))).train) == 2

    val_rows = [{"instruction": "Q", "input": "", "output": "A"}]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA),
                               "validation": datasets.Dataset.from_list(val_rows)})
    dd.save_to_disk(str(tmp_path / "dd"))
    splits = load_splits(DataConfig(path=str(tmp_path / "dd")))
    assert len(splits.train) == 2 and len(splits.val) == 1
    assert splits.val[0].messages[-1]["content"] == "A" and "validation" in splits.val_source
    # An explicit val_size wins over the saved validation split.
    splits = load_splits(DataConfig(path=str(tmp_path / "dd"), val_size=1))
    assert len(splits.train) == 1 and splits.val_source == "val_size"


def test_datasetdict_without_train_split_is_an_error(tmp_path):
    import datasets

    datasets.DatasetDict({"other": datasets.Dataset.from_list(ALPACA)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="no 'train' split.*other"):
        load_splits(DataConfig(path=str(tmp_path / "dd")))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_splits(DataConfig(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown file type '.txt'"):
        load_splits(DataConfig(path=str(tmp_path / "data.txt")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a saved dataset"):
        load_splits(DataConfig(path=str(tmp_path / "folder")))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl, line 3: not valid JSON"):
        load_splits(DataConfig(path=str(path)))


def test_empty_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no records"):
        load_splits(DataConfig(path=write_json(tmp_path / "empty.json", [])))
    with pytest.raises(ValueError, match="no records"):
        load_splits(DataConfig(path=write_jsonl(tmp_path / "empty.jsonl", [])))


def test_non_object_record_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="record 1 is a str"):
        load_splits(DataConfig(path=write_json(tmp_path / "d.json", [ALPACA[0], "oops"])))


# ---- formats --------------------------------------------------------------------------------------
def test_alpaca_with_input_system_and_history(tmp_path):
    row = {"instruction": "Add", "input": "1+1", "output": "2", "system": "Be brief.", "history": [["hi", "hello"]]}
    [record] = load_splits(DataConfig(path=write_json(tmp_path / "a.json", [row]))).train
    assert [m["role"] for m in record.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert record.messages[3]["content"] == "Add\n1+1"
    assert record.trained == (False, False, True, False, True)


def test_messages_format_trains_every_assistant_turn_and_honours_weight(tmp_path):
    row = {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": [{"type": "text", "text": "d"}, {"type": "text", "text": "e"}]},
    ]}
    [record] = load_splits(DataConfig(path=write_jsonl(tmp_path / "m.jsonl", [row]))).train
    assert record.trained == (False, False, False, False, True)
    assert record.messages[-1] == {"role": "assistant", "content": "de"}


def test_sharegpt_maps_speakers_to_roles(tmp_path):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    splits = load_splits(DataConfig(path=write_jsonl(tmp_path / "s.jsonl", [row])))
    assert splits.format == "sharegpt"
    assert [m["role"] for m in splits.train[0].messages] == ["system", "user", "assistant"]
    bad = {"conversations": [{"from": "robot", "value": "q"}]}
    with pytest.raises(ValueError, match="'robot'"):
        load_splits(DataConfig(path=write_jsonl(tmp_path / "b.jsonl", [bad]), format="sharegpt"))


def test_prompt_completion_raw_and_conversational(tmp_path):
    raw = load_splits(DataConfig(path=write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}])))
    assert raw.format == "prompt_completion" and raw.train == [Completion("2+2=", "4")]
    conv = {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
    [record] = load_splits(DataConfig(path=write_jsonl(tmp_path / "c.jsonl", [conv]))).train
    assert isinstance(record, Chat) and record.trained == (False, True)


def test_text_and_text_label_with_custom_fields(tmp_path):
    splits = load_splits(DataConfig(path=write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])))
    assert splits.format == "text" and splits.train == [Text("hello")]
    rows = [{"sentence": "good", "y": "pos"}, {"sentence": "bad", "y": "neg"}]
    cfg = DataConfig(path=write_jsonl(tmp_path / "l.jsonl", rows), text_field="sentence", label_field="y")
    splits = load_splits(cfg)
    assert splits.format == "text_label" and splits.train[0] == Labelled("good", "pos")
    assert splits.label_names == ["neg", "pos"]


def test_text_label_names_integers_and_csv_integer_strings(tmp_path):
    rows = [{"text": "a", "label": 2}, {"text": "b", "label": 0}]
    assert load_splits(DataConfig(path=write_jsonl(tmp_path / "i.jsonl", rows))).label_names == ["0", "1", "2"]
    csv_rows = [{"text": "a", "label": "10"}, {"text": "b", "label": "2"}]
    splits = load_splits(DataConfig(path=write_csv(tmp_path / "l.csv", csv_rows)))
    assert [r.label for r in splits.train] == [10, 2]  # ints, not the strings "10" < "2"
    mixed = [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}]
    with pytest.raises(ValueError, match="mix integers and strings"):
        load_splits(DataConfig(path=write_jsonl(tmp_path / "m.jsonl", mixed)))


def test_auto_detect_failure_lists_columns_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError) as err:
        load_splits(DataConfig(path=path))
    message = str(err.value)
    assert "['answer', 'question']" in message
    for needs in ("alpaca: instruction, output", "messages: messages", "sharegpt: conversations",
                  "prompt_completion: prompt, completion", "text_label: text, label"):
        assert needs in message


def test_missing_field_names_field_record_and_columns(tmp_path):
    rows = [ALPACA[0], {"instruction": "no answer", "input": ""}]
    with pytest.raises(ValueError) as err:
        load_splits(DataConfig(path=write_jsonl(tmp_path / "a.jsonl", rows)))
    message = str(err.value)
    assert "record 1" in message and "'output'" in message and "['input', 'instruction']" in message
    assert "a.jsonl" in message


def test_wrong_type_and_bad_role_are_errors(tmp_path):
    with pytest.raises(ValueError, match="record 0.*'output' must be a string"):
        load_splits(DataConfig(path=write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": 3}])))
    bad_role = {"messages": [{"role": "robot", "content": "x"}]}
    with pytest.raises(ValueError, match="role 'robot'"):
        load_splits(DataConfig(path=write_jsonl(tmp_path / "m.jsonl", [bad_role])))
    starts_with_answer = {"messages": [{"role": "assistant", "content": "x"}]}
    with pytest.raises(ValueError, match="starts with an assistant turn"):
        load_splits(DataConfig(path=write_jsonl(tmp_path / "s.jsonl", [starts_with_answer])))


def test_system_prompt_is_prepended_unless_present(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}]
    splits = load_splits(DataConfig(path=write_jsonl(tmp_path / "m.jsonl", rows), system_prompt="Be kind."))
    assert splits.train[0].messages[0] == {"role": "system", "content": "Be kind."}
    assert splits.train[0].trained == (False, False, True)
    assert splits.train[1].messages[0]["content"] == "own"
    with pytest.raises(ValueError, match="system_prompt"):
        load_splits(DataConfig(path=write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]), system_prompt="S"))


# ---- splitting ------------------------------------------------------------------------------------
def test_val_split_is_seeded_disjoint_and_complete(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    first = load_splits(DataConfig(path=path, val_size=0.25, shuffle_seed=1))
    again = load_splits(DataConfig(path=path, val_size=0.25, shuffle_seed=1))
    other = load_splits(DataConfig(path=path, val_size=0.25, shuffle_seed=2))
    assert len(first.val) == 5 and len(first.train) == 15
    assert first.val == again.val and first.train == again.train
    assert first.val != other.val
    assert sorted(r.text for r in first.train + first.val) == sorted(r["text"] for r in rows)
    assert [r.text for r in first.train] == [r["text"] for r in rows if Text(r["text"]) not in first.val]


def test_val_size_count_fraction_and_too_large():
    assert len(split_indices(10, 3, 0)[1]) == 3
    assert len(split_indices(10, 0.01, 0)[1]) == 1  # ceil: a tiny fraction still gives one record
    train, val = split_indices(10, 4, 0)
    assert train == sorted(train) and sorted(train + val) == list(range(10))  # training keeps the file order
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_indices(10, 10, 0)


def test_val_path_and_max_samples(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": str(i)} for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "v"}])
    splits = load_splits(DataConfig(path=train, val_path=val, max_samples=4))
    assert [r.text for r in splits.train] == ["0", "1", "2", "3"]
    assert splits.val == [Text("v")] and splits.val_source == "val_path"
