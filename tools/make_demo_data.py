"""Generate the `lorakit demo` dataset: smart-home requests -> one-line command records.

Task: a short natural-language request ("could you dim the lounge lamps to 30% at 19.30?") becomes a
fixed record with five keys in a fixed order, values normalised to a small vocabulary:

    device=light room=living_room action=set value=30 time=19:30

- device: light | heating | blinds | fan | speaker | tv        (synonyms: lamp, radiator, shades, ...)
- room:   kitchen | living_room | bedroom | bathroom | office | hallway | garage | dining_room | kids_room
- action: on | off | open | close | set                         (set always carries a number)
- value:  the number for `set` (percent, degrees, fan speed, volume), else `none`
- time:   HH:MM ("at 7.05" -> 07:05), a named slot ("after dinner" -> evening, "at dusk" -> sunset),
          or `now` (no time given, or "right now")

The base model cannot guess the keys, their order, or the vocabulary; the mapping itself is small and
regular, so a LoRA adapter learns it from a few hundred examples in a couple of CPU minutes.

Held-out split: some (device, room) pairs appear only in the test split, so every test record is a
combination never seen in training (each device, room and surface phrase on its own is seen). The
score therefore measures learning the mapping, not recall of memorised answers.

Deterministic (seeded `random.Random`), standard library only. Regenerate the shipped files with:

    python tools/make_demo_data.py            # writes src/lorakit/data/demo/{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM_PROMPT = "Parse the smart-home command."
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "data" / "demo"
DEFAULT_SEED = 1234
DEFAULT_TRAIN_SIZE = 384
DEFAULT_TEST_SIZE = 48
# (device, room) pairs reserved for the test split: every device and every room still occurs in
# training with other partners, so the test asks for new combinations of known parts.
HELD_OUT_PAIRS = (
    ("light", "garage"), ("light", "dining_room"), ("heating", "office"), ("heating", "kids_room"),
    ("blinds", "bedroom"), ("blinds", "kitchen"), ("fan", "living_room"), ("fan", "hallway"),
    ("speaker", "bathroom"), ("speaker", "kitchen"), ("tv", "bedroom"), ("tv", "office"),
)

# Canonical room -> how people say it.
ROOMS = {
    "kitchen": ["kitchen"],
    "living_room": ["living room", "lounge"],
    "bedroom": ["bedroom", "master bedroom"],
    "bathroom": ["bathroom"],
    "office": ["office", "study"],
    "hallway": ["hallway", "hall", "corridor"],
    "garage": ["garage"],
    "dining_room": ["dining room"],
    "kids_room": ["kids room", "nursery"],
}

# Canonical device -> how people say it (always used with "the": "the {room} {noun}").
DEVICES = {
    "light": ["light", "lights", "lamp", "lamps", "ceiling light"],
    "heating": ["heating", "heater", "radiator", "thermostat"],
    "blinds": ["blinds", "shades", "curtains", "shutters"],
    "fan": ["fan", "ceiling fan"],
    "speaker": ["speaker", "music", "radio"],
    "tv": ["tv", "television", "telly"],
}

# Verb phrases per canonical action; {d} is the device phrase ("the kitchen lights").
SWITCH_PHRASES = {
    "on": ["turn on {d}", "switch on {d}", "turn {d} on", "put {d} on", "start {d}"],
    "off": ["turn off {d}", "switch off {d}", "turn {d} off", "shut off {d}", "kill {d}", "stop {d}"],
    "open": ["open {d}", "raise {d}", "pull up {d}"],
    "close": ["close {d}", "lower {d}", "shut {d}", "draw {d}"],
}

# Per device: which actions exist, and for `set`, (phrases with {d} and {v}, allowed values).
SET_PHRASES = {
    "light": (["dim {d} to {v}%", "set {d} to {v}%", "set {d} to {v} percent", "brighten {d} to {v}%"],
              list(range(10, 100, 10)) + [5, 25, 75]),
    "heating": (["set {d} to {v} degrees", "set {d} to {v}C", "put {d} on {v} degrees",
                 "make {d} {v} degrees"], list(range(16, 27))),
    "blinds": (["set {d} to {v}%", "open {d} to {v}%", "set {d} to {v} percent"],
               list(range(10, 100, 10))),
    "fan": (["set {d} to speed {v}", "put {d} on speed {v}", "set {d} to level {v}"], [1, 2, 3]),
    "speaker": (["set {d} volume to {v}", "turn {d} to volume {v}", "put {d} at volume {v}"],
                list(range(10, 90, 10))),
}
ACTIONS = {
    "light": ["on", "off", "set"],
    "heating": ["on", "off", "set"],
    "blinds": ["open", "close", "set"],
    "fan": ["on", "off", "set"],
    "speaker": ["on", "off", "set"],
    "tv": ["on", "off"],
}

# Named times of day (routine triggers) -> canonical slot.
NAMED_TIMES = {
    "sunrise": ["at sunrise", "at dawn"],
    "morning": ["in the morning", "this morning", "when I wake up"],
    "noon": ["at noon", "at midday", "at lunchtime"],
    "evening": ["in the evening", "this evening", "after dinner"],
    "sunset": ["at sunset", "at dusk"],
    "night": ["tonight", "at night", "at bedtime"],
}

OPENERS = ["", "", "", "please ", "can you ", "could you ", "hey, ", "i want you to "]
OPENERS_AFTER_TIME = ["", "", "please ", "can you ", "could you "]
CLOSERS = ["", "", "", " please", ", thanks"]


def time_phrase(rng: random.Random) -> tuple[str, str, bool]:
    """A spoken time, its canonical form, and whether it may open the sentence.

    ("at 7.30", "07:30", True), ("after dinner", "evening", True), ("right now", "now", False), ...
    Clock times are 24-hour (no am/pm: the 12 -> 24 hour arithmetic is more than a 135M model learns
    from a few hundred examples); the normalisation is zero padding and ":" for ".".
    """
    style = rng.choice(["none", "none", "now", "clock", "clock", "clock", "named", "named", "named"])
    if style == "none":
        return "", "now", False
    if style == "now":
        return rng.choice(["now", "right now", "immediately"]), "now", False
    if style == "named":
        slot = rng.choice(list(NAMED_TIMES))
        return rng.choice(NAMED_TIMES[slot]), slot, True
    hour, minute = rng.randrange(24), rng.randrange(0, 60, 5)
    spoken_hour = f"{hour:02d}" if rng.random() < 0.5 else str(hour)
    return f"at {spoken_hour}{rng.choice([':', ':', '.'])}{minute:02d}", f"{hour:02d}:{minute:02d}", True


def device_phrase(rng: random.Random, device: str, room: str) -> str:
    """'the kitchen lights' or 'the lights in the kitchen'."""
    noun, place = rng.choice(DEVICES[device]), rng.choice(ROOMS[room])
    return f"the {place} {noun}" if rng.random() < 0.5 else f"the {noun} in the {place}"


def make_example(rng: random.Random, device: str, room: str) -> tuple[str, str]:
    """One (request, record) pair for a given device and room; action, value and time are drawn."""
    action = rng.choice(ACTIONS[device])
    thing = device_phrase(rng, device, room)
    value = "none"
    if action == "set":
        phrases, values = SET_PHRASES[device]
        value = str(rng.choice(values))
        command = rng.choice(phrases).format(d=thing, v=value)
    else:
        command = rng.choice(SWITCH_PHRASES[action]).format(d=thing)
    spoken_time, time, may_lead = time_phrase(rng)
    if may_lead and rng.random() < 0.3:
        opener = rng.choice(OPENERS_AFTER_TIME)  # time first: "at dusk, could you close ..."
        request = f"{spoken_time}, {opener}{command}"
    else:
        opener = rng.choice(OPENERS)
        request = f"{opener}{command} {spoken_time}".rstrip()
    request += rng.choice(CLOSERS)
    if rng.random() < 0.6:
        request = request[0].upper() + request[1:]
    if rng.random() < 0.3:
        request += "?" if opener in ("can you ", "could you ") else "."
    record = f"device={device} room={room} action={action} value={value} time={time}"
    return request, record


def to_messages(request: str, record: str) -> dict:
    """One JSONL row in the chat `messages` format (our own short system prompt: see README)."""
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": request},
                         {"role": "assistant", "content": record}]}


def sample_split(rng: random.Random, pairs: list[tuple[str, str]], size: int,
                 taken: set[str]) -> list[tuple[str, str]]:
    """`size` examples over `pairs` (cycled so every pair is used evenly), no request repeated."""
    examples: list[tuple[str, str]] = []
    while len(examples) < size:
        device, room = pairs[len(examples) % len(pairs)]
        request, record = make_example(rng, device, room)
        if request.lower() not in taken:
            taken.add(request.lower())
            examples.append((request, record))
    rng.shuffle(examples)
    return examples


def build_splits(seed: int, train_size: int, test_size: int) -> tuple[list, list]:
    """Train and test examples; test uses only HELD_OUT_PAIRS, train only the other pairs."""
    rng = random.Random(seed)
    all_pairs = [(d, r) for d in DEVICES for r in ROOMS]
    test_pairs = [p for p in all_pairs if p in HELD_OUT_PAIRS]
    train_pairs = [p for p in all_pairs if p not in HELD_OUT_PAIRS]
    rng.shuffle(train_pairs)
    taken: set[str] = set()
    test = sample_split(rng, test_pairs, test_size, taken)
    train = sample_split(rng, train_pairs, train_size, taken)
    return train, test


def check_coverage(train: list[tuple[str, str]]) -> None:
    """Every synonym the test may use must occur in training, else the test is unfair."""
    text = " ".join(request.lower() for request, _ in train)
    groups = (*ROOMS.values(), *DEVICES.values(), *NAMED_TIMES.values())
    phrases = [p.lower() for group in groups for p in group]
    text = " " + text.replace("?", " ").replace(".", " ").replace(",", " ") + " "
    missing = [p for p in phrases if f" {p} " not in text]
    if missing:
        raise ValueError(f"train split never uses {missing}; raise --train-size or change the seed")


def write_jsonl(path: Path, examples: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for request, record in examples:
            handle.write(json.dumps(to_messages(request, record), ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE)
    parser.add_argument("--test-size", type=int, default=DEFAULT_TEST_SIZE)
    args = parser.parse_args()
    train, test = build_splits(args.seed, args.train_size, args.test_size)
    check_coverage(train)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test examples to {args.out_dir}")


if __name__ == "__main__":
    main()
