"""The label store: queueing with K labels per pair, undo, export rule, agreement, durability, concurrency."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perlhf.label.store import (CHOICES, Conflict, Forbidden, LabelStore, NotFound, Response, StoreError, agreement,
                                decide)


@pytest.fixture
def store(tmp_path):
    # Not durable: these tests are about logic, and fsync on every commit would make them slow.
    store, token = LabelStore.open(tmp_path / "labels.db", create=True, durable=False)
    assert token and store.labeller_for_token(token).is_admin
    return store


def consistent(store) -> bool:
    """pairs.live_answers matches the answers table."""
    con = sqlite3.connect(store.path)
    try:
        return con.execute("SELECT count(*) FROM pairs p WHERE live_answers != (SELECT count(*) FROM answers a "
                           "WHERE a.pair_id = p.id AND a.undone_at IS NULL)").fetchone()[0] == 0
    finally:
        con.close()


def people(store, *names):
    return [store.labeller_for_token(store.add_labeller(name)) for name in names]


def fill(store, n, k=1, prompt="p"):
    return [store.add_pair(f"{prompt}{i}", Response(f"a{i}", "m"), Response(f"b{i}", "m", "/adapters/x"), k)
            for i in range(n)]


def test_database_is_wal_with_foreign_keys_and_hashed_tokens(store):
    token = store.add_labeller("ann")
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    hashes = [row[0] for row in con.execute("SELECT token_hash FROM labellers")]
    assert token not in hashes and all(len(h) == 64 for h in hashes)
    # The schema refuses an answer for a pair nobody was served, even bypassing the store.
    con.execute("PRAGMA foreign_keys = ON")
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO answers (pair_id, labeller_id, choice, swapped, created_at) VALUES (1, 1, 'a', 0, 0)")


def test_open_refuses_missing_or_foreign_files(tmp_path):
    with pytest.raises(StoreError, match="no such label database"):
        LabelStore.open(tmp_path / "missing.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    for create in (False, True):
        with pytest.raises(StoreError, match="not a perlhf label database"):
            LabelStore.open(tmp_path / "junk.db", create=create)
    # Opening an existing database with create=True makes no second admin.
    LabelStore.open(tmp_path / "x.db", create=True)
    assert LabelStore.open(tmp_path / "x.db", create=True)[1] is None


def test_bad_tokens_and_names(store):
    assert store.labeller_for_token("") is None
    assert store.labeller_for_token("nope") is None
    assert store.labeller_for_token("x" * 1000) is None
    store.add_labeller("ann")
    with pytest.raises(Conflict):
        store.add_labeller("ann")
    assert store.labeller_for_token(store.rotate("ann")).name == "ann"
    for bad in ("", "   ", "a\nb", "x" * 65):
        with pytest.raises(StoreError):
            store.add_labeller(bad)


def test_k_labels_per_pair_and_never_twice(store):
    fill(store, 3, k=2)
    ann, bob, cat = people(store, "ann", "bob", "cat")
    seen = {who.name: [] for who in (ann, bob, cat)}
    for _ in range(4):
        for who in (ann, bob, cat):
            pair = store.next_pair(who)
            if pair:
                seen[who.name].append(pair["id"])
                store.answer(who, pair["id"], "left")
    for ids in seen.values():
        assert len(ids) == len(set(ids))  # nobody sees a pair twice
    per_pair = Counter(i for ids in seen.values() for i in ids)
    assert per_pair == {1: 2, 2: 2, 3: 2}
    assert all(store.next_pair(who) is None for who in (ann, bob, cat))
    # A serve-time K overrides the generate-time one.
    assert store.next_pair(cat, labels_per_pair=3) is not None


def test_served_pair_is_held_and_shown_again_until_answered(store):
    fill(store, 2, k=1)
    ann, bob = people(store, "ann", "bob")
    first = store.next_pair(ann)
    assert store.next_pair(ann) == first  # reload shows the same pair, same order
    assert store.next_pair(bob)["id"] != first["id"]  # K=1 and ann holds it


def test_answer_validation(store):
    fill(store, 2)
    ann, bob = people(store, "ann", "bob")
    pair = store.next_pair(ann)
    with pytest.raises(NotFound):
        store.answer(ann, 999, "left")
    with pytest.raises(Forbidden):
        store.answer(bob, pair["id"], "left")  # served to ann, not bob
    with pytest.raises(StoreError):
        store.answer(ann, pair["id"], "a")  # the API speaks in shown terms
    with pytest.raises(StoreError):
        store.answer(ann, pair["id"], "left", "x" * 2001)
    store.answer(ann, pair["id"], "tie", "x" * 2000)
    with pytest.raises(Conflict):
        store.answer(ann, pair["id"], "left")


def test_shown_order_is_recorded_and_mapped(store):
    fill(store, 40)
    (ann,) = people(store, "ann")
    swaps = []
    while (pair := store.next_pair(ann)) is not None:
        swapped = pair["left"].startswith("b")
        swaps.append(swapped)
        store.answer(ann, pair["id"], "left")
    assert 5 < sum(swaps) < 35  # randomised per labeller, not fixed
    con = sqlite3.connect(store.path)
    rows = con.execute("SELECT a.choice, a.swapped, s.swapped FROM answers a JOIN assignments s "
                       "USING (pair_id, labeller_id) ORDER BY a.id").fetchall()
    assert [bool(r[1]) for r in rows] == swaps
    assert all(choice == ("b" if swapped else "a") and swapped == served for choice, swapped, served in rows)
    log = con.execute("SELECT labeller, shown_order, model_a, adapter_a, adapter_b FROM answer_log").fetchall()
    assert log[0][0] == "ann" and log[0][2:] == ("m", "base", "/adapters/x")


def test_undo_puts_the_pair_back_first_and_keeps_history(store):
    fill(store, 3)
    (ann,) = people(store, "ann")
    one = store.next_pair(ann)
    store.answer(ann, one["id"], "right", "first thought")
    two = store.next_pair(ann)
    assert store.undo(ann) == one["id"]
    assert store.next_pair(ann) == one  # same pair, same order
    assert store.last_comment(ann, one["id"]) == {"choice": "right", "comment": "first thought"}
    assert store.progress(ann) == {"done": 0, "total": 3}
    store.answer(ann, one["id"], "left")
    assert store.next_pair(ann) == two
    assert store.undo(ann) == one["id"] and store.undo(ann) is None
    con = sqlite3.connect(store.path)
    assert con.execute("SELECT count(*), count(undone_at) FROM answers").fetchone() == (2, 2)
    assert consistent(store)


def test_restart_loses_nothing(store):
    fill(store, 3)
    ann, bob = people(store, "ann", "bob")
    for who in (ann, bob):
        store.answer(who, store.next_pair(who)["id"], "left", f"by {who.name}")
    pending = store.next_pair(ann)
    again, _ = LabelStore.open(store.path, durable=False)  # as a restarted server would
    assert again.progress(ann) == store.progress(ann)
    assert again.next_pair(ann) == pending
    assert again.stats()["answers"] == 2


def test_progress_counts_done_and_open(store):
    fill(store, 4, k=2)
    ann, bob, cat = people(store, "ann", "bob", "cat")
    assert store.progress(ann) == {"done": 0, "total": 4}
    for who in (bob, cat):
        store.answer(who, store.next_pair(who)["id"], "left")
    assert store.progress(ann) == {"done": 0, "total": 3}  # pair 1 has its two answers


def test_progress_and_counters_match_a_brute_force_count(store):
    import random

    fill(store, 6, k=2)
    team = people(store, "ann", "bob", "cat")
    con = sqlite3.connect(store.path)
    rng = random.Random(0)

    def reference(who):
        done = con.execute("SELECT count(*) FROM answers WHERE labeller_id = ? AND undone_at IS NULL",
                           (who.id,)).fetchone()[0]
        open_to_me = con.execute(
            "SELECT count(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM answers a WHERE a.pair_id = p.id AND "
            "a.labeller_id = :me AND a.undone_at IS NULL) AND (EXISTS (SELECT 1 FROM assignments s WHERE "
            "s.pair_id = p.id AND s.labeller_id = :me) OR (SELECT count(*) FROM answers a WHERE a.pair_id = p.id "
            "AND a.undone_at IS NULL) < 2)", {"me": who.id}).fetchone()[0]
        return {"done": done, "total": done + open_to_me}

    for _ in range(60):
        who = rng.choice(team)
        action = rng.random()
        if action < 0.2:
            store.undo(who)
        else:
            pair = store.next_pair(who)  # sometimes only held, not answered
            if pair and action > 0.35:
                store.answer(who, pair["id"], rng.choice(["left", "right", "tie", "both_bad"]))
        assert consistent(store)
        for person in team:
            assert store.progress(person) == reference(person)


@pytest.mark.parametrize("votes, outcome", [
    ({}, "unlabelled"), ({"a": 1}, "a"), ({"b": 2, "a": 1}, "b"), ({"a": 1, "b": 1}, "no_majority"),
    ({"tie": 2, "a": 1}, "tie"), ({"both_bad": 1}, "both_bad"), ({"a": 2, "tie": 1, "b": 1}, "a"),
    ({"a": 1, "both_bad": 1}, "no_majority"),
])
def test_decide(votes, outcome):
    assert decide(Counter(votes)) == outcome


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(CHOICES), max_size=7), st.integers(1, 4))
def test_decide_properties(votes, min_labels):
    outcome = decide(Counter(votes), min_labels)
    if not votes:
        assert outcome == "unlabelled"
    elif len(votes) < min_labels:
        assert outcome == "too_few_labels"
    elif outcome in CHOICES:
        assert all(votes.count(outcome) > votes.count(other) for other in CHOICES if other != outcome)
    else:
        assert outcome == "no_majority"


def test_export_rule_and_summary(store):
    texts = {"win_a": ("good", "bad"), "win_b": ("bad", "good"), "tie": ("x", "y"), "both_bad": ("x", "y"),
             "split": ("x", "y"), "same": ("z", "z"), "one": ("good", "bad"), "none": ("x", "y")}
    ids = {name: store.add_pair([{"role": "user", "content": name}], Response(a, "m"), Response(b, "m"), 3)
           for name, (a, b) in texts.items()}
    plan = {"win_a": ("a", "a", "b"), "win_b": ("b", "b", "tie"), "tie": ("tie", "tie", "a"),
            "both_bad": ("both_bad", "both_bad", "a"), "split": ("a", "b", "tie"), "same": ("a", "a", "a"),
            "one": ("a", None, None)}
    team = people(store, "ann", "bob", "cat")
    for name, choices in plan.items():
        for who, choice in zip(team, choices):
            if choice is None:
                continue
            shown = store.next_pair(who)
            assert shown["id"] == ids[name]  # pairs come oldest first
            if choice in ("a", "b"):  # answer in pair terms, whatever order this labeller was shown
                choice = "left" if shown["left"] == texts[name][choice == "b"] else "right"
            store.answer(who, shown["id"], choice)
    records, summary = store.export()
    assert records == [
        {"prompt": [{"role": "user", "content": "win_a"}], "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "win_b"}], "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "one"}], "chosen": "good", "rejected": "bad"},
    ]
    assert summary["skipped"] == {"unlabelled": 1, "too_few_labels": 0, "identical_responses": 1, "tie": 1,
                                  "both_bad": 1, "no_majority": 1}
    records, summary = store.export(min_labels=2)
    assert len(records) == 2 and summary["skipped"]["too_few_labels"] == 1


def test_agreement_figures():
    assert agreement([["a"], []]) == {"pairs": 0, "pairwise": None, "fleiss_kappa": None}
    result = agreement([["a", "a"], ["a", "b"], ["b", "b", "b"]])
    assert result["pairs"] == 3
    assert result["pairwise"] == pytest.approx((2 + 0 + 6) / (2 + 2 + 6))
    # Fleiss: P_i = 1, 0, 1 -> 2/3; p_a = 3/7, p_b = 4/7
    pe = (3 / 7) ** 2 + (4 / 7) ** 2
    assert result["fleiss_kappa"] == pytest.approx((2 / 3 - pe) / (1 - pe))


def test_stats_per_labeller_and_model(store):
    pair = store.add_pair("p", Response("x", "m", "/A"), Response("y", "m", "/B"), 2)
    ann, bob = people(store, "ann", "bob")
    for who in (ann, bob):
        shown = store.next_pair(who)
        store.answer(who, pair, "left" if shown["left"] == "x" else "right")  # both prefer /A
    stats = store.stats()
    assert stats["agreement"]["pairwise"] == 1.0 and stats["pairs_complete"] == 1
    rows = {p["name"]: p for p in stats["labellers"]}
    assert rows["ann"]["a"] == 1 and rows["ann"]["agreement"] == 1.0 and rows["admin"]["answers"] == 0
    assert stats["models"] == [{"model": "m + /A", "wins": 2, "losses": 0, "tie": 0, "both_bad": 0},
                               {"model": "m + /B", "wins": 0, "losses": 2, "tie": 0, "both_bad": 0}]


def test_concurrent_labellers_get_distinct_pairs_and_lose_nothing(store):
    fill(store, 60, k=2)
    team = people(store, *[f"l{i}" for i in range(6)])
    errors = []

    def work(who):
        try:
            for _ in range(15):
                pair = store.next_pair(who)
                store.answer(who, pair["id"], "tie")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(who,)) for who in team]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    con = sqlite3.connect(store.path)
    assert con.execute("SELECT count(*) FROM answers").fetchone()[0] == 90
    assert con.execute("SELECT max(n) FROM (SELECT count(*) n FROM answers GROUP BY pair_id)").fetchone()[0] == 2
    assert consistent(store)
