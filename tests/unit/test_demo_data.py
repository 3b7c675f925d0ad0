"""The shipped `lorakit demo` dataset: up to date with its generator, well formed, and a fair held-out split."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "src" / "lorakit" / "data" / "demo"
FIELDS = ["device", "room", "action", "value", "time"]


def load_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def parse_record(record: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in record.split(" ")]
    assert [key for key, _ in pairs] == FIELDS, f"fields out of order in {record!r}"
    return dict(pairs)


@pytest.fixture(scope="module")
def gen():
    return load_generator()


def test_shipped_files_are_what_the_generator_writes(gen, tmp_path):
    train, test = gen.build_splits(gen.DEFAULT_SEED, gen.DEFAULT_TRAIN_SIZE, gen.DEFAULT_TEST_SIZE)
    gen.write_jsonl(tmp_path / "train.jsonl", train)
    gen.write_jsonl(tmp_path / "test.jsonl", test)
    for split in ("train", "test"):
        shipped = (DEMO_DIR / f"{split}.jsonl").read_text(encoding="utf-8")
        assert shipped == (tmp_path / f"{split}.jsonl").read_text(encoding="utf-8"), (
            f"{split}.jsonl is stale: run `python tools/make_demo_data.py`")


def test_generator_is_deterministic_and_seed_dependent(gen):
    assert gen.build_splits(7, 100, 20) == gen.build_splits(7, 100, 20)
    assert gen.build_splits(7, 100, 20) != gen.build_splits(8, 100, 20)


@pytest.mark.parametrize("split", ["train", "test"])
def test_rows_are_messages_with_a_valid_record(gen, split):
    rows = read_rows(split)
    assert len(rows) == {"train": gen.DEFAULT_TRAIN_SIZE, "test": gen.DEFAULT_TEST_SIZE}[split]
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == gen.SYSTEM_PROMPT
        rec = parse_record(row["messages"][2]["content"])
        assert rec["device"] in gen.DEVICES and rec["room"] in gen.ROOMS
        assert rec["action"] in gen.ACTIONS[rec["device"]]
        assert (rec["value"] == "none") == (rec["action"] != "set")
        is_clock = len(rec["time"]) == 5 and rec["time"][2] == ":" and rec["time"].replace(":", "").isdigit()
        assert is_clock or rec["time"] == "now" or rec["time"] in gen.NAMED_TIMES


def test_test_split_holds_only_unseen_device_room_pairs_and_unseen_requests():
    train, test = read_rows("train"), read_rows("test")
    pair = lambda row: tuple(parse_record(row["messages"][2]["content"])[k] for k in ("device", "room"))
    train_pairs, test_pairs = {pair(r) for r in train}, {pair(r) for r in test}
    assert not train_pairs & test_pairs
    # ...yet every device and room of the test is seen in training, with other partners
    assert {d for d, _ in test_pairs} <= {d for d, _ in train_pairs}
    assert {r for _, r in test_pairs} <= {r for _, r in train_pairs}
    requests = lambda rows: {r["messages"][1]["content"].lower() for r in rows}
    assert not requests(train) & requests(test)
    assert len(requests(train)) == len(train)


def test_coverage_check_rejects_a_train_split_missing_a_synonym(gen):
    train, _ = gen.build_splits(gen.DEFAULT_SEED, gen.DEFAULT_TRAIN_SIZE, gen.DEFAULT_TEST_SIZE)
    gen.check_coverage(train)  # the shipped split passes
    without_nursery = [(req, rec) for req, rec in train if "nursery" not in req.lower()]
    with pytest.raises(ValueError, match="nursery"):
        gen.check_coverage(without_nursery)
