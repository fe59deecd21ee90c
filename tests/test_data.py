"""perlhf.data: formats, validation, rejects, tokenization and the shared real data sets."""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from perlhf import data
from perlhf.data import (DataError, EncodedExample, LoadReport, PreferencePair, RatedResponse, encode_example,
                         load_preferences, load_prompts, render_prompt, split_train_validation)

PANDALM_COLUMNS = {"prompt": "instruction", "input": "input", "response_a": "response1", "response_b": "response2",
                   "votes": "annotator1,annotator2,annotator3"}
HH = "\n\nHuman: How do I bake bread?\n\nAssistant:"


def write_jsonl(path: Path, records: list, *, gz: bool = False) -> str:
    text = "".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def read_rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pair(prompt="Say hi", chosen="Hi!", rejected="Go away.", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


# --- containers ------------------------------------------------------------------------------------------------

def _write_container(tmp_path: Path, container: str, records: list[dict]) -> str:
    if container == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", records)
    if container == "jsonl.gz":
        return write_jsonl(tmp_path / "d.jsonl.gz", records, gz=True)
    if container == "json":
        (tmp_path / "d.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
        return str(tmp_path / "d.json")
    if container == "json.gz":
        (tmp_path / "d.json.gz").write_bytes(gzip.compress(json.dumps(records).encode()))
        return str(tmp_path / "d.json.gz")
    if container == "csv":
        import csv
        with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        return str(tmp_path / "d.csv")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    return str(tmp_path / "d.parquet")


@pytest.mark.parametrize("container", ["jsonl", "jsonl.gz", "json", "json.gz", "csv", "parquet"])
def test_explicit_text_pairs_in_every_container(tmp_path, container):
    records = [pair(), pair("Name a colour", "Blue, with a comma", "I won't", note="extra fields are ignored"),
               pair("Two\nlines", "multi\nline reply", "x")]
    records[0]["note"] = records[2]["note"] = ""
    source = _write_container(tmp_path, container, records)
    pairs, report = load_preferences(source)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Say hi", "Hi!", "Go away."), ("Name a colour", "Blue, with a comma", "I won't"),
        ("Two\nlines", "multi\nline reply", "x")]
    assert (report.kind, report.total, report.kept, sum(report.skipped.values())) == ("pairs", 3, 3, 0)
    # origins: 1-based lines for line formats (the CSV header is line 1), 0-based indexes for record formats
    expected = {"jsonl": [":1", ":2", ":3"], "jsonl.gz": [":1", ":2", ":3"], "csv": [":2", ":3", ":4"]}.get(
        container, ["#0", "#1", "#2"])
    assert [p.origin for p in pairs] == [source + suffix for suffix in expected]


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    source = write_jsonl(tmp_path / "lines.json", [pair(), "{broken", pair("p2")])
    pairs, report = load_preferences(source)
    assert [p.origin for p in pairs] == [f"{source}:1", f"{source}:3"]
    assert report.skipped == {"malformed json": 1}


def test_malformed_json_array_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": oops}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON array at line 3, column 14"):
        load_preferences(str(path))


def test_blank_lines_are_not_records_but_keep_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n" + json.dumps(pair()) + "\n   \n\n" + json.dumps(pair("p2")) + "\n\n")
    pairs, report = load_preferences(str(path))
    assert [p.origin.rsplit(":", 1)[1] for p in pairs] == ["2", "5"]
    assert report.total == 2


def test_utf8_bom_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps(pair()).encode(), json.dumps(pair("p2")).encode()]
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    pairs, _ = load_preferences(str(path))
    assert [p.prompt for p in pairs] == ["Say hi", "p2"]
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\r\nq,a,b\r\n")
    assert load_preferences(str(csv_path))[0][0].prompt == "q"


def test_directory_loads_supported_files_in_sorted_order(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [pair("from b")])
    write_jsonl(folder / "a.jsonl.gz", [pair("from a")], gz=True)
    (folder / "README.md").write_text("not data")
    (folder / "c.json").write_text(json.dumps([pair("from c")]))
    pairs, report = load_preferences(str(folder))
    assert [p.prompt for p in pairs] == ["from a", "from b", "from c"]
    assert report.total == 3 and report.source == str(folder)
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("prompts only count for load_prompts")
    with pytest.raises(DataError, match="nothing: directory holds no"):
        load_preferences(str(empty))


def test_directory_mixing_pairs_and_ratings_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [pair()])
    write_jsonl(folder / "b.jsonl", [{"prompt": "q", "response": "r", "label": 1}])
    with pytest.raises(DataError, match="mixes pairs and pointwise"):
        load_preferences(str(folder))


# --- conversational pairs and chat templates --------------------------------------------------------------------

def test_conversational_explicit_pairs_render_with_the_chat_template(tmp_path, tiny_tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    record = {"prompt": prompt,
              "chosen": [{"role": "assistant", "content": "Paris."}],
              "rejected": [{"role": "assistant", "content": "Lyon.", "name": "bot", "tool_calls": None}]}
    pairs, _ = load_preferences(write_jsonl(tmp_path / "conv.jsonl", [record]))
    assert pairs[0].prompt == prompt and pairs[0].chosen == "Paris." and pairs[0].rejected == "Lyon."
    assert render_prompt(tiny_tokenizer, pairs[0].prompt) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_conversations_without_prompt_split_at_the_shared_messages(tmp_path):
    shared = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Tell me a joke"}]
    good = {"chosen": shared + [{"role": "assistant", "content": "Knock knock."}],
            "rejected": shared + [{"role": "assistant", "content": "No."}]}
    diverging = {"chosen": shared + [{"role": "assistant", "content": "a"}],
                 "rejected": shared[:1] + [{"role": "assistant", "content": "b"}]}
    not_ending_with_reply = {"chosen": shared, "rejected": shared[:2]}
    source = write_jsonl(tmp_path / "conv.jsonl", [good, diverging, not_ending_with_reply])
    pairs, report = load_preferences(source)
    assert pairs == [PreferencePair(shared, "Knock knock.", "No.", f"{source}:1")]
    assert report.skipped == {"no shared prompt": 1, "not an assistant reply chosen": 1}


def test_message_problems_name_the_field(tmp_path):
    user = [{"role": "user", "content": "q"}]
    reply = [{"role": "assistant", "content": "a"}]
    records = [
        {"prompt": [{"role": "tool", "content": "x"}], "chosen": reply, "rejected": "b"},
        {"prompt": user, "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"},
        {"prompt": user, "chosen": reply, "rejected": [{"role": "assistant"}]},
        {"prompt": user, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "prefill"}],
         "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "  "}], "chosen": "a", "rejected": "b"},
        {"prompt": user, "chosen": reply, "rejected": "b"},
    ]
    rejects = tmp_path / "rejects.jsonl"
    pairs, report = load_preferences(write_jsonl(tmp_path / "m.jsonl", records), rejects_path=rejects)
    assert len(pairs) == 1
    assert [(r["reason"], r["field"]) for r in read_rejects(rejects)] == [
        ("unknown role prompt", "prompt"), ("unknown role chosen", "chosen"), ("bad message rejected", "rejected"),
        ("not an assistant reply chosen", "chosen"), ("prompt ends with assistant prompt", "prompt"),
        ("empty prompt", "prompt")]


# --- HH-RLHF dialogue pairs ---------------------------------------------------------------------------------------

def test_hh_pairs_prompt_is_the_common_prefix_cut_at_a_turn(tmp_path):
    records = [
        {"chosen": HH + " Mix flour, water and yeast.", "rejected": HH + " Buy it."},
        # the replies share their first words: the prompt still ends at the last "\n\nAssistant:"
        {"chosen": HH + " Mix flour and water.", "rejected": HH + " Mix sand and water."},
        # quirk: a reply that itself contains "Human:" / "Assistant:" (splitting at the last marker would fail)
        {"chosen": HH + " Sure.\n\nAssistant: Here is more.", "rejected": HH + " Human: no"},
        # quirk: an empty chosen reply (4 of them in hh-rlhf harmless-base)
        {"chosen": HH + " ", "rejected": HH + " Something."},
        {"chosen": HH + " Same.", "rejected": HH + " Same. "},
        {"chosen": "Paris", "rejected": "Lyon"},
    ]
    rejects = tmp_path / "r.jsonl"
    pairs, report = load_preferences(write_jsonl(tmp_path / "hh.jsonl", records), rejects_path=rejects)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (HH, "Mix flour, water and yeast.", "Buy it."),
        (HH, "Mix flour and water.", "Mix sand and water."),
        (HH, "Sure.\n\nAssistant: Here is more.", "Human: no")]
    assert report.skipped == {"empty chosen": 1, "identical chosen and rejected": 1, "no shared prompt": 1}
    assert [(r["origin"].rsplit(":", 1)[1], r["field"]) for r in read_rejects(rejects)] == [
        ("4", "chosen"), ("5", "chosen,rejected"), ("6", "chosen,rejected")]


def test_hh_multi_turn_prompt_keeps_earlier_turns(tmp_path):
    history = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant:"
    record = {"chosen": history + " Why did the chicken...", "rejected": history + " No."}
    pairs, _ = load_preferences(write_jsonl(tmp_path / "hh.jsonl", [record]))
    assert pairs[0].prompt == history and pairs[0].chosen == "Why did the chicken..."


# --- pointwise ratings and Taskmaster ----------------------------------------------------------------------------

def test_pointwise_labels(tmp_path):
    labels = [1, 0, 1.0, 0.0, True, False, "1", "0", "true", "FALSE", 2, -1, 0.5, "yes", None]
    records = [{"prompt": f"q{i}", "response": "r", "label": label} for i, label in enumerate(labels)]
    rejects = tmp_path / "r.jsonl"
    rated, report = load_preferences(write_jsonl(tmp_path / "p.jsonl", records), rejects_path=rejects)
    assert all(isinstance(r, RatedResponse) for r in rated)
    assert [r.label for r in rated] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert report.kind == "pointwise"
    assert report.skipped == {"bad label label": 4, "missing field label": 1}


def _taskmaster_record(generation: dict, reward=1.0) -> dict:
    context = [{"role": "agent", "text": "Welcome! What can I get you?"},
               {"role": "user", "text": "A latte"},
               {"role": "agent", "api": {"get_menu_items": {"query": "latte"}}},
               {"role": "api", "response": {"get_menu_items": {"items": [{"name": "Latte"}]}}}]
    return {"conversation_id": "dlg-1", "context": json.dumps(context), "generation": json.dumps(generation),
            "reward": reward}


TASKMASTER_PROMPT = ('Agent: Welcome! What can I get you?\nUser: A latte\n'
                     'API call: {"get_menu_items": {"query": "latte"}}\n'
                     'API result: {"get_menu_items": {"items": [{"name": "Latte"}]}}\nAgent:')


def test_taskmaster_records_are_detected_and_rendered(tmp_path):
    records = [_taskmaster_record({"role": "agent", "text": "One latte, coming up."}),
               _taskmaster_record({"role": "agent", "api": {"add_order_item": {"menu_item_id": "latte-1"}}}, 0.0),
               _taskmaster_record({"role": "agent"}),
               {**_taskmaster_record({"role": "agent", "text": "x"}), "context": '[{"role": "user", "text": "hi"'},
               {**_taskmaster_record({"role": "agent", "text": "x"}),
                "context": json.dumps([{"role": "bot", "text": "?"}])},
               _taskmaster_record({"role": "agent", "text": "ok"}, reward=0.5),
               {**_taskmaster_record({"role": "agent", "text": "x"}), "context": "[]"}]
    (tmp_path / "reward_00.json").write_text(json.dumps(records))
    rated, report = load_preferences(str(tmp_path / "reward_00.json"))
    assert rated[0] == RatedResponse(TASKMASTER_PROMPT, "One latte, coming up.", 1.0, f"{tmp_path}/reward_00.json#0")
    assert rated[1].response == 'API call: {"add_order_item": {"menu_item_id": "latte-1"}}'
    assert rated[1].label == 0.0
    assert report.kind == "pointwise"
    assert report.skipped == {"bad turn generation": 1, "malformed json context": 1, "unknown role context": 1,
                              "bad label reward": 1, "empty context": 1}


def test_taskmaster_columns_mapping(tmp_path):
    record = _taskmaster_record({"role": "agent", "text": "Sure."})
    renamed = {"dialogue": record["context"], "reply": record["generation"], "thumbs": 1}
    rated, _ = load_preferences(write_jsonl(tmp_path / "t.jsonl", [renamed]),
                                columns={"context": "dialogue", "generation": "reply", "label": "thumbs"})
    assert rated[0].prompt == TASKMASTER_PROMPT and rated[0].response == "Sure."


# --- PandaLM voted pairs, columns mapping -----------------------------------------------------------------------

def _panda(idx, votes, response1="Short answer.", response2="A longer answer.", instruction="Answer.", inp="2+2?"):
    return {"idx": idx, "instruction": instruction, "input": inp, "response1": response1, "response2": response2,
            "annotator1": votes[0], "annotator2": votes[1], "annotator3": votes[2]}


def test_pandalm_mapping_majority_ties_and_bad_records(tmp_path):
    records = [_panda(0, [1, 1, 0]), _panda(1, [2, 2, 2], inp=""), _panda(2, [1, 2, 2]),
               _panda(3, [0, 0, 1]), _panda(4, [1, 2, 0]),                     # ties: majority 0, no majority
               _panda(5, [1, 1, 1], response1=True), _panda(6, [2, 2, 0], response2=""),
               _panda(7, [1, 1, 3]), _panda(8, ["2", "2", "1"])]
    (tmp_path / "testset.json").write_text(json.dumps(records))
    rejects = tmp_path / "rejects.jsonl"
    pairs, report = load_preferences(str(tmp_path / "testset.json"), columns=PANDALM_COLUMNS, rejects_path=rejects)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Answer.\n\n2+2?", "Short answer.", "A longer answer."),
        ("Answer.", "A longer answer.", "Short answer."),
        ("Answer.\n\n2+2?", "A longer answer.", "Short answer."),
        ("Answer.\n\n2+2?", "A longer answer.", "Short answer.")]
    assert report.skipped == {"tie": 2, "wrong type response1": 1, "empty response2": 1, "bad vote annotator3": 1}
    assert report.total == 9 and report.kept == 4
    assert {r["origin"].rsplit("#", 1)[1]: r["field"] for r in read_rejects(rejects)} == {
        "3": "annotator1,annotator2,annotator3", "4": "annotator1,annotator2,annotator3", "5": "response1",
        "6": "response2", "7": "annotator3"}


def test_votes_need_a_strict_majority(tmp_path):
    records = [{"q": "p", "a": "x", "b": "y", "v1": 1, "v2": 2},            # 1 of 2 is no majority
               {"q": "p", "a": "x", "b": "y", "v1": 2, "v2": 2},
               {"q": "p", "a": "x", "b": "y", "v1": [1, 1], "v2": [2, 2]},  # list cells hold several votes
               {"q": "p", "a": "x", "b": "y", "v1": [1, 1], "v2": 2}]
    columns = {"prompt": "q", "response_a": "a", "response_b": "b", "votes": ["v1", "v2"]}
    pairs, report = load_preferences(write_jsonl(tmp_path / "v.jsonl", records), columns=columns)
    assert [(p.chosen, p.origin[-1]) for p in pairs] == [("y", "2"), ("x", "4")]
    assert report.skipped == {"tie": 2}


@pytest.mark.parametrize("kind_records,columns", [
    ([{"question": "q", "chosen": "a", "rejected": "b"}], {"prompt": "question"}),
    ([{"question": "q", "response": "a", "thumbs": "true"}], {"prompt": "question", "label": "thumbs"}),
    ([{"question": "q", "response_a": "a", "response_b": "b", "votes": 2}], {"prompt": "question"}),
    ([{"good": "\n\nHuman: q\n\nAssistant: a", "bad": "\n\nHuman: q\n\nAssistant: b"}],
     {"chosen": "good", "rejected": "bad"}),
])
def test_simple_renames_work_for_every_kind(tmp_path, kind_records, columns):
    records, report = load_preferences(write_jsonl(tmp_path / "r.jsonl", kind_records), columns=columns)
    assert report.kept == 1
    assert "q" in str(records[0].prompt)


def test_columns_errors(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [pair()])
    with pytest.raises(DataError, match="unknown field 'question'"):
        load_preferences(source, columns={"question": "prompt"})
    with pytest.raises(DataError, match="'prompt' must map to a column name"):
        load_preferences(source, columns={"prompt": ""})
    with pytest.raises(DataError, match="kind must be"):
        load_preferences(source, kind="prompts")


def test_kind_overrides_detection(tmp_path):
    both = {"prompt": "q", "chosen": "a", "rejected": "b", "response": "a", "label": 1}
    source = write_jsonl(tmp_path / "both.jsonl", [both])
    assert isinstance(load_preferences(source)[0][0], PreferencePair)
    rated, report = load_preferences(source, kind="pointwise")
    assert isinstance(rated[0], RatedResponse) and report.kind == "pointwise"
    pairs_only = write_jsonl(tmp_path / "pairs.jsonl", [pair()])
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: cannot tell the format from the fields chosen, prompt"):
        load_preferences(pairs_only, kind="pointwise")


def test_a_few_bad_first_records_do_not_mislead_detection(tmp_path):
    records = [{"chosen": "a", "rejected": "b"}, "[1]", pair(), pair("p2")]  # first lacks its prompt
    pairs, report = load_preferences(write_jsonl(tmp_path / "p.jsonl", records))
    assert [p.prompt for p in pairs] == ["Say hi", "p2"]
    assert report.skipped == {"missing field prompt": 1, "not an object": 1}


# --- validation, rejects file, errors --------------------------------------------------------------------------

def test_every_bad_record_is_counted_and_written_to_rejects(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(pair()).encode(),                                   # 1 kept
             b'{"prompt": "a", "chosen": ',                                  # 2 malformed json
             b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',      # 3 latin-1 byte: invalid utf-8
             json.dumps(pair(chosen=None)).encode(),                         # 4 null = missing
             json.dumps({"prompt": "q", "rejected": "b"}).encode(),          # 5 missing
             json.dumps(pair(prompt=7)).encode(),                            # 6 wrong type
             json.dumps(pair(rejected=" \n\t")).encode(),                    # 7 empty
             json.dumps(pair(chosen="same", rejected="same ")).encode(),     # 8 identical
             b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}',      # 9 lone surrogate escape
             b'["not", "an", "object"]',                                     # 10
             json.dumps(pair(extra={"deep": [1, 2]})).encode()]              # 11 kept (extra fields ignored)
    path.write_bytes(b"\n".join(lines) + b"\n")
    rejects = tmp_path / "out" / "rejects.jsonl"
    pairs, report = load_preferences(str(path), rejects_path=rejects)
    assert [p.origin for p in pairs] == [f"{path}:1", f"{path}:11"]
    rows = read_rejects(rejects)
    assert [(r["origin"], r["reason"], r["field"]) for r in rows] == [
        (f"{path}:2", "malformed json", None), (f"{path}:3", "invalid utf-8", None),
        (f"{path}:4", "missing field chosen", "chosen"), (f"{path}:5", "missing field chosen", "chosen"),
        (f"{path}:6", "wrong type prompt", "prompt"), (f"{path}:7", "empty rejected", "rejected"),
        (f"{path}:8", "identical chosen and rejected", "chosen,rejected"),
        (f"{path}:9", "invalid utf-8 prompt", "prompt"), (f"{path}:10", "not an object", None)]
    assert rows[1]["record"] == repr(lines[2] + b"\n")          # undecodable bytes are shown as a repr
    assert rows[0]["record"] == '{"prompt": "a", "chosen": \n'
    assert rows[7]["record"] == '{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n'
    assert report.total == 11 == report.kept + sum(report.skipped.values())
    assert report.rejects_path == rejects
    # rejects_path=None: same counts, no file
    _, quiet = load_preferences(str(path))
    assert quiet.skipped == report.skipped and quiet.rejects_path is None


def test_enormous_lines_and_fields_are_skipped_without_losing_neighbours(tmp_path):
    huge = "x" * (data.MAX_TEXT + 1)
    path = tmp_path / "big.jsonl"
    write_jsonl(path, [pair(), pair(chosen=huge), pair("p3")])
    rejects = tmp_path / "r.jsonl"
    pairs, report = load_preferences(str(path), rejects_path=rejects)
    assert [p.origin for p in pairs] == [f"{path}:1", f"{path}:3"]
    assert report.skipped == {"line too long": 1}
    assert len(read_rejects(rejects)[0]["record"]) == data.REJECT_CLIP
    # in a JSON array the record parses, and the field is refused by size
    (tmp_path / "big.json").write_text(json.dumps([pair(), pair(rejected=huge)]))
    _, report = load_preferences(str(tmp_path / "big.json"))
    assert report.skipped == {"too long rejected": 1}


def test_rejected_records_are_clipped(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(), pair(chosen="", rejected="y" * 5000)])
    rejects = tmp_path / "r.jsonl"
    load_preferences(path, rejects_path=rejects)
    record = read_rejects(rejects)[0]["record"]
    assert len(record) == 2000 and record.endswith("…")


def test_invalid_utf8_inside_json_array_and_csv_costs_one_record(tmp_path):
    body = json.dumps([pair("p1"), pair("BAD"), pair("p3")]).encode().replace(b"BAD", b"b\xffd")
    (tmp_path / "a.json").write_bytes(body)
    pairs, report = load_preferences(str(tmp_path / "a.json"))
    assert [p.prompt for p in pairs] == ["p1", "p3"] and report.skipped == {"invalid utf-8 prompt": 1}
    (tmp_path / "a.csv").write_bytes(b"prompt,chosen,rejected\np1,a,b\np\xff2,a,b\np3,a,b\n")
    pairs, report = load_preferences(str(tmp_path / "a.csv"))
    assert [p.origin.rsplit(":", 1)[1] for p in pairs] == ["2", "4"]
    assert report.skipped == {"invalid utf-8 prompt": 1}


def test_csv_rows_with_the_wrong_number_of_cells(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,chosen,rejected\nq,a,b\nq,a\nq,a,b,extra\n")
    rejects = tmp_path / "r.jsonl"
    pairs, report = load_preferences(str(tmp_path / "a.csv"), rejects_path=rejects)
    assert len(pairs) == 1 and report.skipped == {"malformed csv": 2}
    assert [r["origin"].rsplit(":", 1)[1] for r in read_rejects(rejects)] == ["3", "4"]


def test_whole_file_problems_raise_data_error_naming_the_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or directory"):
        load_preferences(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        load_preferences(str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json: empty file"):
        load_preferences(str(tmp_path / "empty.json"))
    (tmp_path / "notes.md").write_text("# hi")
    with pytest.raises(DataError, match=r"notes\.md: unsupported file type '\.md'"):
        load_preferences(str(tmp_path / "notes.md"))
    (tmp_path / "prompts.txt").write_text("hi\n")
    with pytest.raises(DataError, match=r"prompts\.txt: unsupported file type '\.txt'"):
        load_preferences(str(tmp_path / "prompts.txt"))
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"corrupt\.jsonl\.gz: cannot read it"):
        load_preferences(str(tmp_path / "corrupt.jsonl.gz"))
    whole = gzip.compress("".join(json.dumps(pair(f"p{i}")) + "\n" for i in range(50)).encode())
    (tmp_path / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"truncated\.jsonl\.gz: cannot read it after \d+ records"):
        load_preferences(str(tmp_path / "truncated.jsonl.gz"))
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match=r"corrupt\.parquet: cannot read it as Parquet"):
        load_preferences(str(tmp_path / "corrupt.parquet"))


def test_all_rejected_names_file_line_field_and_reasons(tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", [pair(chosen=""), pair(chosen=""), pair(prompt=3)])
    rejects = tmp_path / "r.jsonl"
    with pytest.raises(DataError) as caught:
        load_preferences(source, rejects_path=rejects)
    message = str(caught.value)
    assert f"{source}: all 3 records were rejected (empty chosen: 2, wrong type prompt: 1)" in message
    assert f"first: {source}:1 field chosen: empty chosen" in message
    assert str(rejects) in message and len(read_rejects(rejects)) == 3


def test_limit_counts_kept_records(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [pair("a"), pair(chosen=""), pair("b"), pair("c")])
    pairs, report = load_preferences(source, limit=2)
    assert [p.prompt for p in pairs] == ["a", "b"]
    assert (report.total, report.kept, report.skipped) == (3, 2, {"empty chosen": 1})
    with pytest.raises(DataError, match="limit"):
        load_preferences(source, limit=0)


def test_summary_lists_kept_skips_and_rejects_file(tmp_path):
    report = LoadReport("pairs.jsonl", "pairs", 10, 7, collections.Counter({"tie": 2, "empty chosen": 1}),
                        Path("rejects.jsonl"))
    assert report.summary() == ("pairs.jsonl: kept 7 of 10 records (pairs)\n  skipped 2: tie\n"
                                "  skipped 1: empty chosen\n  rejected records written to rejects.jsonl")
    assert LoadReport("p", "pairs", 3, 3).summary() == "p: kept 3 of 3 records (pairs)"


# --- Hugging Face datasets ----------------------------------------------------------------------------------------

def test_hugging_face_dataset_saved_as_parquet_and_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]} for i in range(3)]
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "train.parquet"))
    pairs, report = load_preferences(str(tmp_path / "train.parquet"))
    assert [p.prompt[0]["content"] for p in pairs] == ["q0", "q1", "q2"] and pairs[0].chosen == "yes"
    dataset.save_to_disk(str(tmp_path / "saved"))
    pairs, _ = load_preferences(str(tmp_path / "saved"))
    assert len(pairs) == 3 and pairs[2].origin == f"{tmp_path}/saved#2"
    datasets.DatasetDict({"train": dataset, "test": dataset.select([1])}).save_to_disk(str(tmp_path / "dd"))
    pairs, report = load_preferences(f"{tmp_path}/dd:test")
    assert [p.prompt[0]["content"] for p in pairs] == ["q1"] and report.total == 1


def test_columnar_messages_from_a_sequence_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features({"prompt": datasets.Sequence(message), "chosen": datasets.Sequence(message),
                                  "rejected": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"prompt": [{"role": ["user"], "content": ["hi"]}],
                                          "chosen": [{"role": ["assistant"], "content": ["hello"]}],
                                          "rejected": ["go away"]}, features=features)
    dataset.save_to_disk(str(tmp_path / "seq"))
    pairs, _ = load_preferences(str(tmp_path / "seq"))
    assert pairs[0].prompt == [{"role": "user", "content": "hi"}] and pairs[0].chosen == "hello"


def test_hub_ids_go_through_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([pair("p0"), pair("p1", chosen="")])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    pairs, report = load_preferences("someone/prefs:test")
    assert calls == [("someone/prefs", "test")]
    assert pairs[0].origin == "someone/prefs:test#0" and report.skipped == {"empty chosen": 1}
    load_preferences("someone/prefs")
    assert calls[-1] == ("someone/prefs", "train")

    def failing(name, split):
        raise FileNotFoundError("Dataset 'someone/prefs' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="someone/prefs: cannot load it as a Hugging Face dataset"):
        load_preferences("someone/prefs")


def test_unreachable_hub_fails_fast_without_calling_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not be called"))
    with pytest.raises(DataError, match="someone/prefs: not a local file or directory, and the Hugging Face Hub"):
        load_preferences("someone/prefs")


def test_paths_that_are_not_hub_ids_never_reach_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: pytest.fail("no Hub probe for paths"))
    for source in (str(tmp_path / "x.jsonl"), "./data/x", "../x", "a/b/c", "pairs.jsonl.gz"):
        with pytest.raises(DataError, match="no such file or directory"):
            load_preferences(source)


# --- prompts ------------------------------------------------------------------------------------------------------

def test_load_prompts_from_every_kind_of_source(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"first prompt\n\n   \nsecond\r\nbad \xff byte\nfirst prompt\n")
    prompts, report = load_prompts(str(tmp_path / "p.txt"))
    assert prompts == ["first prompt", "second", "first prompt"]          # no deduplication
    assert report.kind == "prompts" and report.skipped == {"invalid utf-8": 1} and report.total == 4

    source = write_jsonl(tmp_path / "pairs.jsonl", [pair("q1"), {"prompt": [{"role": "user", "content": "q2"}]},
                                                    {"prompt": ""}])
    prompts, report = load_prompts(source)
    assert prompts == ["q1", [{"role": "user", "content": "q2"}]] and report.skipped == {"empty prompt": 1}

    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH + " A", "rejected": HH + " B"},
                                             {"chosen": HH + " ", "rejected": HH + " B"}])
    assert load_prompts(hh)[0] == [HH, HH]     # an empty reply does not matter for the prompt

    (tmp_path / "tm.json").write_text(json.dumps([_taskmaster_record({"role": "agent", "text": "x"})]))
    assert load_prompts(str(tmp_path / "tm.json"))[0] == [TASKMASTER_PROMPT]

    (tmp_path / "panda.json").write_text(json.dumps([_panda(0, [0, 0, 0]), _panda(1, [1, 1, 1], inp="")]))
    assert load_prompts(str(tmp_path / "panda.json"), column="instruction,input")[0] == ["Answer.\n\n2+2?", "Answer."]

    (tmp_path / "q.csv").write_text("question,id\nWhy?,1\nHow?,2\n")
    assert load_prompts(str(tmp_path / "q.csv"), column="question")[0] == ["Why?", "How?"]

    (tmp_path / "strings.json").write_text(json.dumps(["one", "two", 3, "  ", "\ud800"]))
    prompts, report = load_prompts(str(tmp_path / "strings.json"))
    assert prompts == ["one", "two"]
    assert report.skipped == {"not an object": 1, "empty prompt": 1, "invalid utf-8 prompt": 1}


def test_load_prompts_limit_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    assert load_prompts(str(tmp_path / "p.txt"), limit=2)[0] == ["a", "b"]
    with pytest.raises(DataError, match="column must be"):
        load_prompts(str(tmp_path / "p.txt"), column="a,b,c")
    source = write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}])
    with pytest.raises(DataError, match=r"x\.jsonl:1: cannot tell the format from the fields text"):
        load_prompts(source)


# --- splitting ----------------------------------------------------------------------------------------------------

def test_split_is_deterministic_complete_and_keeps_prompts_together():
    records = [PreferencePair(f"prompt {i // 3}", "a", "b", f"f:{i}") for i in range(30)]
    train, validation = split_train_validation(records, 0.2, seed=7)
    assert (train, validation) == split_train_validation(records, 0.2, seed=7)
    assert sorted(r.origin for r in train + validation) == sorted(r.origin for r in records)
    assert len(validation) == 6
    assert not {r.prompt for r in train} & {r.prompt for r in validation}
    assert [records.index(r) for r in validation] == sorted(records.index(r) for r in validation)
    assert split_train_validation(records, 0.2, seed=8) != (train, validation)


def test_split_edge_cases():
    assert split_train_validation(["a", "b"], 0.01, seed=0)[1] != []        # at least one when fraction > 0
    assert split_train_validation(["a"], 0.5, seed=0) == (["a"], [])
    assert split_train_validation(["a", "b", "c"], 0.0, seed=0) == (["a", "b", "c"], [])
    same_prompt = [RatedResponse("p", f"r{i}", 1.0, str(i)) for i in range(10)]
    train, validation = split_train_validation(same_prompt, 0.3, seed=1)   # one group: split records instead
    assert len(validation) == 3 and len(train) == 7
    big_groups = [PreferencePair(f"p{i // 5}", "a", "b", str(i)) for i in range(10)]
    train, validation = split_train_validation(big_groups, 0.1, seed=3)    # groups larger than the target
    assert len(validation) == 5 and len(train) == 5
    with pytest.raises(ValueError):
        split_train_validation(["a", "b"], 1.0, seed=0)


# --- rendering and encoding ---------------------------------------------------------------------------------------

def test_render_prompt(tiny_tokenizer):
    assert render_prompt(tiny_tokenizer, "\n\nHuman: hi\n\nAssistant:") == "\n\nHuman: hi\n\nAssistant:"
    assert render_prompt(tiny_tokenizer, [{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_render_prompt_without_chat_template_is_a_data_error():
    from conftest import make_tokenizer
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        render_prompt(tokenizer, [{"role": "user", "content": "hi"}])


EOS = 258


def test_encode_example_fits(tiny_tokenizer):
    example = encode_example(tiny_tokenizer, "Q: hi", "ok", max_length=16)
    assert example == EncodedExample([48, 25, 220, 71, 72, 78, 74, EOS], 5, False)
    # a response that already ends with eos gets no second one
    assert encode_example(tiny_tokenizer, "Q: hi", "ok<|im_end|>", 16) == example
    exact = encode_example(tiny_tokenizer, "Q: hi", "ok", max_length=8)
    assert exact == EncodedExample([48, 25, 220, 71, 72, 78, 74, EOS], 5, False)


def test_encode_example_cuts_the_prompt_from_the_left(tiny_tokenizer):
    example = encode_example(tiny_tokenizer, "Q: hi", "ok", max_length=6)
    assert example == EncodedExample([220, 71, 72, 78, 74, EOS], 3, True)
    # exactly room for one prompt token
    assert encode_example(tiny_tokenizer, "Q: hi", "ok", max_length=4) == EncodedExample([72, 78, 74, EOS], 1, True)


def test_encode_example_cuts_a_long_response_from_the_right(tiny_tokenizer):
    # response + eos = 7 tokens > max_length - 1: keep 1 prompt token, then the first 4 response tokens, no eos
    example = encode_example(tiny_tokenizer, "Q: hi", "abcdef", max_length=5)
    assert example == EncodedExample([72, 64, 65, 66, 67], 1, True)
    # response without eos fits max_length - 1 exactly: the eos is what gets dropped
    assert encode_example(tiny_tokenizer, "Q: hi", "abcdef", max_length=7) == \
        EncodedExample([72, 64, 65, 66, 67, 68, 69], 1, True)


def test_encode_example_with_chat_messages(tiny_tokenizer):
    prompt = [{"role": "user", "content": "hi"}]
    example = encode_example(tiny_tokenizer, prompt, "ok", max_length=64)
    rendered = tiny_tokenizer.encode(render_prompt(tiny_tokenizer, prompt), add_special_tokens=False)
    assert example.input_ids == rendered + [78, 74, EOS]
    assert example.response_start == len(rendered) and rendered[0] == 257   # <|im_start|> is one special token
    with pytest.raises(ValueError):
        encode_example(tiny_tokenizer, prompt, "ok", max_length=1)


# --- real data (skipped when /work/shared/data is absent) ----------------------------------------------------------

def _shared(path: str) -> Path:
    full = SHARED_DATA / path
    if not full.exists():
        pytest.skip(f"shared data {full} not present")
    return full


def test_real_hh_rlhf_harmless(tmp_path):
    source = _shared("hh-rlhf-harmless/pairs.jsonl.gz")
    pairs, report = load_preferences(str(source), rejects_path=tmp_path / "r.jsonl")
    assert (report.total, report.kept) == (1812, 1810)
    assert report.skipped == {"empty chosen": 2}
    assert all(p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:") for p in pairs)
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in pairs)
    # the quirk record whose chosen reply contains "\n\nAssistant:" keeps the shared prompt
    quirk = next(p for p in pairs if "\n\nAssistant:" in p.chosen)
    raw = json.loads(gzip.open(source, "rt").readlines()[int(quirk.origin.rsplit(":", 1)[1]) - 1])
    assert raw["chosen"] == f"{quirk.prompt} {quirk.chosen}" and raw["rejected"] == f"{quirk.prompt} {quirk.rejected}"
    prompts, _ = load_prompts(str(source))
    assert len(prompts) == 1812


def test_real_taskmaster_coffee():
    source = _shared("taskmaster-coffee")
    rated, report = load_preferences(str(source))
    assert (report.total, report.kept, report.kind) == (3228, 3222, "pointwise")
    assert report.skipped == {"empty context": 6}       # replies rated with an empty conversation "[]"
    assert collections.Counter(r.label for r in rated) == {1.0: 2769, 0.0: 453}
    assert all(r.prompt.endswith("\nAgent:") for r in rated)
    assert sum(r.response.startswith("API call: {") for r in rated) == 2433
    assert rated[0].origin.endswith("reward_00.json#0") and rated[-1].origin.split("/")[-1].startswith("reward_06")


def test_real_pandalm_with_mapping(tmp_path):
    source = _shared("pandalm/testset-v1.json")
    pairs, report = load_preferences(str(source), columns=PANDALM_COLUMNS, rejects_path=tmp_path / "r.jsonl")
    assert report.total == 999
    assert report.skipped == {"tie": 105, "empty response1": 29, "empty response2": 23, "wrong type response1": 4,
                              "wrong type response2": 2}
    assert report.kept == 836 == len(pairs)
    train, validation = split_train_validation(pairs, 0.1, seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in validation}
