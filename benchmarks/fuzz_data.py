"""Fuzz the preference-data loaders: files mixing valid records with every kind of bad input.

    python benchmarks/fuzz_data.py [--records 20000] [--seed 0]

Writes JSONL, gzipped JSONL and JSON-array files of each supported format (explicit, conversational, HH
dialogue, conversational dialogue, pointwise, Taskmaster and PandaLM-style voted pairs), loads each with
perlhf.data and prints: records tried, kept, skipped by reason, crashes (exceptions other than DataError),
lost (records neither kept nor counted) and misjudged (a valid record not kept, a bad one kept, a wrong skip
reason or a wrong parsed value). tests/test_data_fuzz.py drives the same generator through hypothesis.
"""

from __future__ import annotations

import argparse
import collections
import copy
import gzip
import json
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perlhf.data import MAX_TEXT, DataError, PreferencePair, load_preferences, load_prompts  # noqa: E402

FORMATS = ("explicit", "conversational", "hh", "conversation_pairs", "pointwise", "taskmaster", "voted")
CONTAINERS = ("jsonl", "jsonl.gz", "json")
# Characters that stress escaping and tokenization: quotes, backslashes, NUL, a line separator, non-BMP emoji.
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789     \n\t\"\\{}[]:,'éß中文😀\u2028\x00"
BAD_BYTES_MARK = "@@BAD-BYTES@@"   # replaced by b"\xff\xfe" in the written file
WRONG_TYPES = (42, True, 3.5, {"x": 1})
COMMON_BAD = ("extra_fields", "not_object", "missing", "null", "wrong_type", "empty", "too_long", "surrogate",
              "bad_bytes", "malformed", "deep")
EXTRA_BAD = {
    "explicit": ("identical",),
    "conversational": ("identical", "unknown_role", "bad_message"),
    "hh": ("identical", "no_prompt"),
    "conversation_pairs": ("identical", "unknown_role", "bad_message"),
    "pointwise": ("bad_label",),
    "taskmaster": ("bad_label", "unknown_role", "malformed_context", "bad_turn"),
    "voted": ("identical", "tie", "bad_vote"),
}
LINE_ONLY = ("malformed", "deep")   # only a JSON-lines file can hold an unparsable record
PANDALM_COLUMNS = {"prompt": "instruction", "input": "input", "response_a": "response1", "response_b": "response2",
                   "votes": "annotator1,annotator2,annotator3"}


def kinds_for(fmt: str, container: str) -> tuple[str, ...]:
    """Bad-record kinds that make sense for a format in a container ("extra_fields" is a valid kind)."""
    kinds = COMMON_BAD + EXTRA_BAD[fmt]
    return tuple(kind for kind in kinds if container != "json" or kind not in LINE_ONLY)


@dataclass
class Case:
    kind: str
    value: Any = None           # the record, serialized as JSON
    line: str | None = None     # raw JSON-lines text for records no JSON value can express
    expected: str = "kept"      # "kept", or the exact skip reason
    output: tuple | None = None  # what the loader must return for a kept record


@dataclass
class Built:
    record: dict
    output: tuple
    slots: dict[str, Callable[[dict, str], None]]  # column -> put this text where the column's text lives
    required: list[str]
    wrong_type: dict[str, str]                     # column -> reason when it holds a non-text value
    identical: Callable[[dict], None]
    special: dict[str, Callable[[dict], str]] = field(default_factory=dict)  # kind -> mutate, return reason
    no_empty: tuple[str, ...] = ()                 # columns where empty text is allowed


def random_text(rng: random.Random, longest: int = 24) -> str:
    while True:
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, longest)))
        if text.strip():
            return text


def two_texts(rng: random.Random) -> tuple[str, str]:
    first = random_text(rng)
    while True:
        second = random_text(rng)
        if second.strip() != first.strip():
            return first, second


def _setter(column: str) -> Callable[[dict, str], None]:
    def put(record: dict, text: str) -> None:
        record[column] = text
    return put


# --- one builder per format: a valid record plus how to break each of its parts ---------------------------------

def build_explicit(rng, columns) -> Built:
    p, c, r = columns.get("prompt", "prompt"), columns.get("chosen", "chosen"), columns.get("rejected", "rejected")
    prompt = random_text(rng)
    chosen, rejected = two_texts(rng)
    return Built({p: prompt, c: chosen, r: rejected}, ("pair", prompt, chosen, rejected),
                 {p: _setter(p), c: _setter(c), r: _setter(r)}, [p, c, r],
                 {name: f"wrong type {name}" for name in (p, c, r)},
                 lambda record: record.__setitem__(r, record[c] + rng.choice(["", " ", "\n"])))


def _chat(rng, turns: int) -> list[dict]:
    messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.3 else []
    for turn in range(turns):
        messages.append({"role": "user", "content": random_text(rng)})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": random_text(rng)})
    return messages


def build_conversational(rng, columns) -> Built:
    prompt = _chat(rng, rng.randint(1, 2))
    chosen, rejected = two_texts(rng)
    as_text = rng.random() < 0.2  # a plain-string reply after a message prompt is accepted too
    record = {"prompt": prompt,
              "chosen": chosen if as_text else [{"role": "assistant", "content": chosen}],
              "rejected": [{"role": "assistant", "content": rejected}]}

    def put_prompt(record, text):
        for message in record["prompt"]:
            message["content"] = text

    def put_reply(column):
        def put(record, text):
            if isinstance(record[column], list):
                record[column][0]["content"] = text
            else:
                record[column] = text
        return put

    def identical(record):
        record["rejected"][0]["content"] = chosen

    def unknown_role(record):
        record["prompt"][0]["role"] = rng.choice(["tool", "narrator", "User", ""])
        return "unknown role prompt"

    def bad_message(record):
        record["prompt"][0] = rng.choice(["hello", {"role": "user"}, {"content": "x"}, {"role": "user", "content": 5}])
        return "bad message prompt"

    return Built(record, ("pair", copy.deepcopy(prompt), chosen, rejected),
                 {"prompt": put_prompt, "chosen": put_reply("chosen"), "rejected": put_reply("rejected")},
                 ["prompt", "chosen", "rejected"],
                 {name: f"wrong type {name}" for name in ("prompt", "chosen", "rejected")},
                 identical, {"unknown_role": unknown_role, "bad_message": bad_message})


def build_hh(rng, columns) -> Built:
    prompt = ""
    for turn in range(rng.randint(1, 3)):
        prompt += f"\n\nHuman: {random_text(rng)}\n\nAssistant:"
        if turn < 2 and rng.random() < 0.5:
            prompt += f" {random_text(rng)}"
    if not prompt.endswith("Assistant:"):
        prompt += f"\n\nHuman: {random_text(rng)}\n\nAssistant:"
    chosen, rejected = two_texts(rng)
    record = {"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"}

    def put(column):
        def put_reply(record, text):
            record[column] = f"{prompt} {text}"
        return put_reply

    def no_prompt(record):
        record["chosen"], record["rejected"] = two_texts(rng)
        return "no shared prompt"

    return Built(record, ("pair", prompt, chosen, rejected), {"chosen": put("chosen"), "rejected": put("rejected")},
                 ["chosen", "rejected"], {"chosen": "wrong type chosen", "rejected": "wrong type rejected"},
                 lambda record: record.__setitem__("rejected", record["chosen"]), {"no_prompt": no_prompt})


def build_conversation_pairs(rng, columns) -> Built:
    prompt = _chat(rng, rng.randint(1, 2))
    chosen, rejected = two_texts(rng)
    record = {"chosen": copy.deepcopy(prompt) + [{"role": "assistant", "content": chosen}],
              "rejected": copy.deepcopy(prompt) + [{"role": "assistant", "content": rejected}]}

    def put(column):
        def put_reply(record, text):
            record[column][-1]["content"] = text
        return put_reply

    def unknown_role(record):
        record["chosen"][0]["role"] = rng.choice(["tool", "bot", "Human"])
        return "unknown role chosen"

    def bad_message(record):
        record["rejected"][0] = rng.choice(["hello", {"role": "user"}, {"role": 1, "content": "x"}])
        return "bad message rejected"

    return Built(record, ("pair", copy.deepcopy(prompt), chosen, rejected),
                 {"chosen": put("chosen"), "rejected": put("rejected")}, ["chosen", "rejected"],
                 {"chosen": "wrong type chosen", "rejected": "wrong type rejected"},
                 lambda record: record["rejected"][-1].__setitem__("content", chosen),
                 {"unknown_role": unknown_role, "bad_message": bad_message})


GOOD_LABELS = ((0, 0.0), (1, 1.0), (0.0, 0.0), (1.0, 1.0), (True, 1.0), (False, 0.0), ("1", 1.0), ("0", 0.0),
               ("true", 1.0), ("False", 0.0))
BAD_LABELS = (2, -1, 0.5, "yes", "maybe", [1], float("nan"))


def build_pointwise(rng, columns) -> Built:
    p, resp, lab = columns.get("prompt", "prompt"), columns.get("response", "response"), columns.get("label", "label")
    prompt, response = random_text(rng), random_text(rng)
    label, value = rng.choice(GOOD_LABELS)

    def bad_label(record):
        record[lab] = rng.choice(BAD_LABELS)
        return f"bad label {lab}"

    return Built({p: prompt, resp: response, lab: label}, ("rated", prompt, response, value),
                 {p: _setter(p), resp: _setter(resp)}, [p, resp, lab],
                 {p: f"wrong type {p}", resp: f"wrong type {resp}"}, lambda record: None, {"bad_label": bad_label})


def render_turns(turns: list[dict]) -> str:
    """The rendering docs/data.md documents, written independently of perlhf.data."""
    lines = []
    for turn in turns:
        if turn["role"] == "user":
            lines.append("User: " + turn["text"])
        elif turn["role"] == "agent" and "text" in turn:
            lines.append("Agent: " + turn["text"])
        elif turn["role"] == "agent":
            lines.append("API call: " + json.dumps(turn["api"], ensure_ascii=False))
        else:
            lines.append("API result: " + json.dumps(turn["response"], ensure_ascii=False))
    return "\n".join(lines + ["Agent:"])


def build_taskmaster(rng, columns) -> Built:
    turns = [{"role": "agent", "text": random_text(rng)}, {"role": "user", "text": random_text(rng)}]
    if rng.random() < 0.5:
        turns += [{"role": "agent", "api": {"get_menu_items": {"query": random_text(rng)}}},
                  {"role": "api", "response": {"get_menu_items": {"items": [{"name": random_text(rng)}]}}}]
    if rng.random() < 0.5:
        generation = {"role": "agent", "text": random_text(rng)}
        response = generation["text"]
    else:
        generation = {"role": "agent", "api": {"add_order_item": {"menu_item_id": random_text(rng), "quantity": "1"}}}
        response = "API call: " + json.dumps(generation["api"], ensure_ascii=False)
    reward = rng.choice([1.0, 0.0])
    record = {"conversation_id": f"dlg-{rng.randrange(10**6)}", "context": json.dumps(turns),
              "generation": json.dumps(generation), "reward": reward}

    def put_context(record, text):
        changed = copy.deepcopy(turns)
        changed[1]["text"] = text
        record["context"] = json.dumps(changed)

    def put_generation(record, text):
        record["generation"] = json.dumps({"role": "agent", "text": text})

    def bad_label(record):
        record["reward"] = rng.choice(BAD_LABELS)
        return "bad label reward"

    def unknown_role(record):
        changed = copy.deepcopy(turns)
        changed[0]["role"] = rng.choice(["system", "bot", "Agent"])
        record["context"] = json.dumps(changed)
        return "unknown role context"

    def malformed_context(record):
        record["context"] = record["context"][:-2]
        return "malformed json context"

    def bad_turn(record):
        record["generation"] = json.dumps(rng.choice([{"role": "agent"}, {"role": "user", "text": "hi"}, ["x"],
                                                      {"text": "no role"}]))
        return "bad turn generation"

    slots = {"context": put_context, "generation": put_generation}
    return Built(record, ("rated", render_turns(turns), response, reward), slots, ["context", "generation", "reward"],
                  {"context": "wrong type context", "generation": "bad turn generation"}, lambda record: None,
                  {"bad_label": bad_label, "unknown_role": unknown_role, "malformed_context": malformed_context,
                   "bad_turn": bad_turn},
                 no_empty=("context",))  # an empty turn text is allowed inside a context


def build_voted(rng, columns) -> Built:
    instruction = random_text(rng)
    extra = rng.choice(["", "", random_text(rng)])
    first, second = two_texts(rng)
    winner = rng.choice([1, 2])
    other = 3 - winner
    votes = rng.choice([[winner] * 3, [winner, winner, 0], [winner, winner, other]])
    rng.shuffle(votes)
    record = {"idx": rng.randrange(1000), "instruction": instruction, "input": extra, "response1": first,
              "response2": second, "annotator1": votes[0], "annotator2": votes[1], "annotator3": votes[2]}
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    chosen, rejected = (first, second) if winner == 1 else (second, first)

    def put_instruction(record, text):
        record["instruction"], record["input"] = text, ""

    def tie(record):
        votes = rng.choice([[0, 0, 0], [0, 0, 1], [1, 2, 0], [0, 0, 2], [2, 0, 1]])
        record["annotator1"], record["annotator2"], record["annotator3"] = votes
        return "tie"

    def bad_vote(record):
        column = rng.choice(["annotator1", "annotator2", "annotator3"])
        record[column] = rng.choice([3, -1, "x", True, 1.5, "one", [7]])
        return f"bad vote {column}"

    names = ("instruction", "response1", "response2")
    return Built(record, ("pair", prompt, chosen, rejected),
                 {"instruction": put_instruction, "response1": _setter("response1"), "response2": _setter("response2")},
                 ["instruction", "response1", "response2", "annotator1", "annotator2", "annotator3"],
                 {name: f"wrong type {name}" for name in names},
                 lambda record: record.__setitem__("response2", record["response1"]),
                 {"tie": tie, "bad_vote": bad_vote})


BUILDERS = {"explicit": build_explicit, "conversational": build_conversational, "hh": build_hh,
            "conversation_pairs": build_conversation_pairs, "pointwise": build_pointwise,
            "taskmaster": build_taskmaster, "voted": build_voted}


def file_columns(fmt: str, rng: random.Random) -> dict[str, str] | None:
    """The `columns` argument for a file: PandaLM names for voted, sometimes renamed columns elsewhere."""
    if fmt == "voted":
        return dict(PANDALM_COLUMNS)
    if fmt == "explicit" and rng.random() < 0.5:
        return {"prompt": "question", "chosen": "good", "rejected": "bad"}
    if fmt == "pointwise" and rng.random() < 0.5:
        return {"prompt": "query", "response": "answer", "label": "thumbs_up"}
    return None


def make_case(fmt: str, kind: str, container: str, columns: dict | None, rng: random.Random) -> Case:
    built = BUILDERS[fmt](rng, columns or {})
    record = built.record
    if kind == "valid":
        return Case(kind, record, output=built.output)
    if kind == "extra_fields":
        record["meta"], record["note"] = {"source": random_text(rng)}, random_text(rng)
        return Case(kind, record, output=built.output)
    if kind == "not_object":
        return Case(kind, rng.choice([[1, 2], "just text", 42, None, True, []]), expected="not an object")
    if kind in ("missing", "null"):
        column = rng.choice(built.required)
        if kind == "missing":
            del record[column]
        else:
            record[column] = None
        return Case(kind, record, expected=f"missing field {column}")
    if kind == "wrong_type":
        column = rng.choice(sorted(built.wrong_type))
        record[column] = rng.choice(WRONG_TYPES)
        return Case(kind, record, expected=built.wrong_type[column])
    if kind in ("empty", "too_long", "surrogate", "bad_bytes"):
        column = rng.choice([name for name in built.slots if kind != "empty" or name not in built.no_empty])
        text = {"empty": rng.choice(["", " ", "\n\t "]), "too_long": "x" * (MAX_TEXT + 1),
                "surrogate": f"a\ud800{random_text(rng)}", "bad_bytes": f"a{BAD_BYTES_MARK}b"}[kind]
        built.slots[column](record, text)
        jsonl = container != "json"
        expected = {"empty": f"empty {column}",
                    "too_long": "line too long" if jsonl else f"too long {column}",
                    "surrogate": f"invalid utf-8 {column}",
                    "bad_bytes": "invalid utf-8" if jsonl else f"invalid utf-8 {column}"}[kind]
        return Case(kind, record, expected=expected)
    if kind == "malformed":
        text = json.dumps(record, ensure_ascii=False)
        return Case(kind, line=text[:rng.randint(1, len(text) - 1)], expected="malformed json")
    if kind == "deep":
        depth = rng.randint(5_000, 50_000)
        return Case(kind, line="[" * depth + "]" * depth, expected="malformed json")
    if kind == "identical":
        built.identical(record)
        return Case(kind, record, expected="identical chosen and rejected")
    return Case(kind, record, expected=built.special[kind](record))


def write_file(path: Path, cases: list[Case], container: str) -> None:
    def encode(case: Case) -> bytes:
        # a lone surrogate can only be written as a \ud800 escape; other text goes out as raw UTF-8
        text = case.line if case.line is not None else json.dumps(case.value, ensure_ascii=case.kind == "surrogate")
        return text.encode("utf-8").replace(BAD_BYTES_MARK.encode(), b"\xff\xfe")

    if container == "json":
        data = b"[\n" + b",\n".join(encode(case) for case in cases) + b"\n]\n"
    else:
        data = b"".join(encode(case) + b"\n" for case in cases)
    if container.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1)
    path.write_bytes(data)


@dataclass
class Outcome:
    records: int = 0
    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    crashes: list[str] = field(default_factory=list)
    lost: int = 0
    miscounted: int = 0          # report.total != kept + skipped, or != records
    misjudged: list[str] = field(default_factory=list)
    refused_files: int = 0       # DataError for a file without a single valid record (expected)
    refused_records: int = 0
    wrongly_refused: list[str] = field(default_factory=list)
    prompt_crashes: list[str] = field(default_factory=list)

    def add(self, other: "Outcome") -> None:
        for name in ("records", "kept", "lost", "miscounted", "refused_files", "refused_records"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)
        for name in ("crashes", "misjudged", "wrongly_refused", "prompt_crashes"):
            getattr(self, name).extend(getattr(other, name))

    @property
    def problems(self) -> list[str]:
        counts = [f"{self.lost} records lost"] * bool(self.lost) + \
            [f"{self.miscounted} files miscounted"] * bool(self.miscounted)
        return self.crashes + self.prompt_crashes + self.misjudged + self.wrongly_refused + counts


def _index(origin: str) -> int:
    if "#" in origin.rpartition("/")[2]:
        return int(origin.rpartition("#")[2])
    return int(origin.rpartition(":")[2]) - 1


def _as_tuple(record) -> tuple:
    if isinstance(record, PreferencePair):
        return ("pair", record.prompt, record.chosen, record.rejected)
    return ("rated", record.prompt, record.response, record.label)


def check_file(directory: Path, name: str, fmt: str, container: str, cases: list[Case],
               columns: dict | None) -> Outcome:
    """Write the cases, load them, and compare every record's fate with what the generator intended."""
    outcome = Outcome(records=len(cases))
    path = directory / f"{name}.{container}"
    rejects = directory / f"{name}.rejects.jsonl"
    write_file(path, cases, container)
    valid = sum(case.expected == "kept" for case in cases)
    try:  # the same file as prompts: reasons differ there, but not the accounting
        prompts, prompt_report = load_prompts(str(path), column=(columns or {}).get("prompt"))
        if not prompt_report.total == len(cases) == len(prompts) + sum(prompt_report.skipped.values()):
            outcome.miscounted += 1
    except DataError:
        pass
    except Exception:
        outcome.prompt_crashes.append(f"load_prompts {path.name}:\n{traceback.format_exc()}")
    try:
        records, report = load_preferences(str(path), columns=columns, rejects_path=rejects)
    except DataError as exc:
        if valid:
            outcome.wrongly_refused.append(f"{path.name}: DataError with {valid} valid records: {exc}")
        else:
            outcome.refused_files, outcome.refused_records = 1, len(cases)
        return outcome
    except Exception:
        outcome.crashes.append(f"{path.name} ({fmt}, {container}):\n{traceback.format_exc()}")
        return outcome
    outcome.kept = report.kept
    outcome.skipped.update(report.skipped)
    if report.total != report.kept + sum(report.skipped.values()) or report.total != len(cases) \
            or len(records) != report.kept:
        outcome.miscounted += 1
    fates: dict[int, list] = collections.defaultdict(list)
    for record in records:
        fates[_index(record.origin)].append(("kept", record))
    with open(rejects, encoding="utf-8") as handle:
        for line in handle:
            reject = json.loads(line)
            fates[_index(reject["origin"])].append(("skipped", reject["reason"]))
    for index, case in enumerate(cases):
        fate = fates.get(index, [])
        if not fate:
            outcome.lost += 1
            continue
        if len(fate) > 1:
            outcome.misjudged.append(f"{path.name} record {index} ({case.kind}) counted {len(fate)} times")
            continue
        status, detail = fate[0]
        if case.expected == "kept":
            if status != "kept":
                outcome.misjudged.append(f"{path.name} record {index}: valid {fmt} record skipped as {detail!r}")
            elif case.output is not None and _as_tuple(detail) != case.output:
                outcome.misjudged.append(f"{path.name} record {index}: parsed {_as_tuple(detail)!r}, "
                                         f"expected {case.output!r}")
        elif status == "kept" or detail != case.expected:
            got = "kept" if status == "kept" else repr(detail)
            outcome.misjudged.append(f"{path.name} record {index} ({fmt}/{case.kind}): {got}, "
                                     f"expected {case.expected!r}")
    return outcome


def run(records: int, seed: int, largest_file: int = 400, bad_share: float = 0.5) -> Outcome:
    rng = random.Random(seed)
    total = Outcome()
    with tempfile.TemporaryDirectory(prefix="perlhf-fuzz-") as tmp:
        directory = Path(tmp)
        number = 0
        while total.records < records:
            fmt, container = rng.choice(FORMATS), rng.choice(CONTAINERS)
            columns = file_columns(fmt, rng)
            kinds = kinds_for(fmt, container)
            # enormous records are rare: each costs a megabyte to write and read
            weights = [0.1 if kind == "too_long" else 1.0 for kind in kinds]
            size = min(rng.randint(1, largest_file), records - total.records)
            cases = [make_case(fmt, "valid" if rng.random() >= bad_share else rng.choices(kinds, weights)[0],
                               container, columns, rng) for _ in range(size)]
            total.add(check_file(directory, f"f{number}", fmt, container, cases, columns))
            number += 1
    return total


FIELD_REASONS = ("missing field", "wrong type", "empty", "too long", "invalid utf-8", "unknown role", "bad message",
                 "bad label", "bad vote", "bad turn", "malformed json", "not an assistant reply",
                 "prompt ends with assistant")


def by_problem(skipped: collections.Counter) -> collections.Counter:
    """Skip counts with the column names folded: "empty chosen" and "empty response1" are both "empty <field>"."""
    folded = collections.Counter()
    for reason, count in skipped.items():
        prefix = next((p for p in FIELD_REASONS if reason.startswith(p + " ")), None)
        folded[f"{prefix} <field>" if prefix else reason] += count
    return folded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000, help="records to generate (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    outcome = run(args.records, args.seed)
    seconds = time.perf_counter() - start
    skipped = sum(outcome.skipped.values())
    rows = [("records tried", outcome.records), ("kept", outcome.kept), ("skipped", skipped)]
    rows += [(f"  {reason}", count) for reason, count in by_problem(outcome.skipped).most_common()]
    rows += [("in files refused with DataError (no valid record)", outcome.refused_records),
             ("crashes (unhandled exceptions)", len(outcome.crashes) + len(outcome.prompt_crashes)),
             ("lost (neither kept nor counted)", outcome.lost),
             ("misjudged (wrong fate, reason or value)", len(outcome.misjudged)),
             ("files wrongly refused", len(outcome.wrongly_refused)),
             ("files with report.total != kept + skipped", outcome.miscounted)]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value:>8,}")
    print(f"{'seconds':<{width}}  {seconds:>8.1f}")
    for problem in outcome.problems[:10]:
        print("\n" + problem)
    return 1 if outcome.problems else 0


if __name__ == "__main__":
    sys.exit(main())
