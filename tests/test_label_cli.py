"""`perlhf label` commands: init, add-labeller, generate (base, adapter, adapter comparison), export, stats."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from perlhf.label import generate as generate_module
from perlhf.label.app import create_app
from perlhf.label.cli import main
from perlhf.label.generate import pair_indices
from perlhf.label.store import LabelStore

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and on a busy 2-core machine two threads spinning against
    each other made these tests 30 times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two different random LoRA adapters for the tiny model, saved the PEFT way."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    paths = []
    for seed in (1, 2):
        import torch

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        peft.save_pretrained(root / f"adapter{seed}")
        paths.append(str(root / f"adapter{seed}"))
    return paths


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Repeat {SCRIPT}"}, {"prompt": [{"role": "user", "content": "Hello?"}]}, {"prompt": "Count"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(db, sql, *args):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def test_init_and_add_labeller_print_links(tmp_path, capsys):
    db = tmp_path / "l.db"
    assert main(["init", "--db", str(db), "--base-url", "https://label.example/"]) == 0
    out = capsys.readouterr().out
    admin = out.split("Admin token, for scripts (shown once, keep it secret): ")[1].split()[0]
    link = out.split("admin sign-in link")[1]
    assert "https://label.example/signin?invite=" in link and admin not in link  # the link carries no token
    assert LabelStore.open(db)[0].labeller_for_token(admin).is_admin
    assert main(["init", "--db", str(db)]) == 0
    assert "exists already" in capsys.readouterr().out

    app = create_app(str(db), allowed_hosts=["testserver"])
    assert main(["add-labeller", "ann", "--db", str(db)]) == 0
    link = capsys.readouterr().out.strip().split()[-1]
    assert link.startswith("http://127.0.0.1:8000/signin?invite=")
    code = link.split("invite=")[1]
    browser = TestClient(app)
    assert browser.get(link.replace("http://127.0.0.1:8000", "")).status_code == 200
    assert browser.post("/signin", data={"invite": code}).status_code == 200
    assert browser.get("/api/me").json()["name"] == "ann"
    assert TestClient(app).post("/signin", data={"invite": code}).status_code == 401  # once only
    assert main(["add-labeller", "ann", "--db", str(db)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["add-labeller", "ann", "--rotate", "--admin", "--show-token", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "/signin?invite=" in out and "token for scripts" in out
    assert browser.get("/api/me").status_code == 401  # rotation ended ann's session
    assert LabelStore.open(db)[0].labeller_for_token(out.split()[-1]).is_admin
    # add-labeller on a new database creates it and prints its admin token too
    assert main(["add-labeller", "bob", "--db", str(tmp_path / "new.db")]) == 0
    assert "Admin token" in capsys.readouterr().out


def test_labellers_list_and_manage(tmp_path, capsys):
    db = tmp_path / "l.db"
    store, admin = LabelStore.open(db, create=True, durable=False)
    from perlhf.label.store import Response

    store.add_pair("p", Response("x", "m"), Response("y", "m"))
    ann = store.labeller_for_token(store.add_labeller("ann", actor="test"))
    store.answer(ann, store.next_pair(ann)["id"], "left")
    store.add_labeller("bob", is_admin=True, actor="test")
    run = lambda *argv: main(["labellers", *argv, "--db", str(db)])  # noqa: E731

    assert run("--json") == 0
    people = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert people["ann"]["answers"] == 1 and people["ann"]["last_seen_at"] is not None
    assert people["bob"]["admin"] and people["bob"]["last_seen_at"] is None
    assert run() == 0 and "ann" in capsys.readouterr().out  # `labellers` alone lists
    assert main(["labellers", "--db", str(db), "list"]) == 0 and "labeller" in capsys.readouterr().out

    assert run("link", "ann") == 0 and "/signin?invite=" in capsys.readouterr().out
    assert run("rotate", "bob") == 0  # keeps bob an admin
    assert LabelStore.open(db)[0].labellers()[2]["admin"]
    assert run("rotate", "bob", "--no-admin", "--show-token") == 0
    token = capsys.readouterr().out.split()[-1]
    assert not LabelStore.open(db)[0].labeller_for_token(token).is_admin
    assert run("rotate", "bob", "--admin") == 0 and run("demote", "bob") == 0
    assert run("demote", "admin") == 2 and "only admin" in capsys.readouterr().err  # someone must stay admin
    assert run("disable", "ann") == 0 and LabelStore.open(db)[0].labeller_for_token(admin) is not None
    assert run("remove", "ann") == 2 and "has 1 answers" in capsys.readouterr().err
    assert run("enable", "ann") == 0 and run("sign-out", "ann") == 0
    assert run("remove", "ann", "--with-answers") == 0 and run("remove", "bob") == 0
    assert run("remove", "nobody") == 2 and "no labeller 'nobody'" in capsys.readouterr().err
    assert [p["name"] for p in LabelStore.open(db)[0].labellers()] == ["admin"]
    capsys.readouterr()
    assert run("log", "--limit", "100") == 0
    actions = [line.split()[3:5] for line in capsys.readouterr().out.splitlines()]
    assert actions[:3] == [["remove", "bob"], ["remove", "ann"], ["sign-out", "ann"]]
    assert ["demote", "bob"] in actions and ["disable", "ann"] in actions and ["rotate", "bob"] in actions


def test_commands_refuse_bad_input(tmp_path, prompts, tiny_model_dir, adapters, capsys):
    missing = str(tmp_path / "missing.db")
    assert main(["export", "--db", missing, "--output", str(tmp_path / "x.jsonl")]) == 2
    assert main(["stats", "--db", missing]) == 2
    assert main(["serve", "--db", missing, "--port", "0"]) == 2
    assert "no such label database" in capsys.readouterr().err
    db = str(tmp_path / "l.db")
    base = ["generate", "--db", db, "--model", tiny_model_dir, "--prompts", str(prompts)]
    for extra, message in [
        (["--adapter", adapters[0], "--adapters", *adapters], "not both"),
        (["--adapters", adapters[0]], "two or more"),
        (["--responses-per-prompt", "1"], "at least 2"),
        (["--adapters", "base", *adapters], "number of sources"),
        (["--adapter", str(tmp_path)], "not a LoRA adapter directory"),
        (["--top-p", "0"], "--top-p"),
    ]:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert main(["generate", "--db", db, "--model", tiny_model_dir, "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_pair_indices():
    assert pair_indices([0, 0, 0]) == [(0, 1), (0, 2), (1, 2)]
    assert pair_indices([0, 1]) == [(0, 1)]
    assert pair_indices([1, 0]) == [(1, 0)]  # response a from the source named first
    assert pair_indices([0, 1, 0, 1]) == [(0, 1), (0, 3), (2, 1), (2, 3)]


def test_generate_compares_adapters_and_records_sources(tmp_path, prompts, tiny_model_dir, adapters, capsys):
    db = tmp_path / "l.db"
    argv = ["generate", "--db", str(db), "--model", tiny_model_dir, "--prompts", str(prompts), "--adapters",
            *adapters, "--max-new-tokens", "4", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3",
            "--labels-per-pair", "2", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "queued 3 pairs (6 responses to 3 prompts)" in out and "Admin token" in out
    pairs = rows(db, "SELECT ra.adapter, rb.adapter, ra.model, p.labels_wanted, ra.info FROM pairs p "
                     "JOIN responses ra ON ra.id = p.response_a JOIN responses rb ON rb.id = p.response_b")
    resolved = [str(Path(a).resolve()) for a in adapters]
    assert [(a, b, m, k) for a, b, m, k, _ in pairs] == [(resolved[0], resolved[1], tiny_model_dir, 2)] * 3
    info = json.loads(pairs[0][4])
    assert info["temperature"] == 1.0 and info["top_p"] == 0.9 and info["finish"] in ("eos", "length")
    assert 0 <= info["tokens"] <= 4
    run = json.loads(rows(db, "SELECT info FROM runs")[0][0])
    assert run["sources"] == resolved and run["model"] == tiny_model_dir
    prompts_stored = [json.loads(p) for (p,) in rows(db, "SELECT prompt FROM prompts ORDER BY id")]
    assert prompts_stored == [f"Repeat {SCRIPT}", [{"role": "user", "content": "Hello?"}], "Count"]

    # The same seed gives the same samples; the base model and a policy adapter each work alone too.
    again = tmp_path / "again.db"
    assert main([*argv[:2], str(again), *argv[3:]]) == 0
    texts = "SELECT text FROM responses ORDER BY id"
    assert rows(db, texts) == rows(again, texts)
    assert main(["generate", "--db", str(db), "--model", tiny_model_dir, "--prompts", str(prompts), "--adapter",
                 adapters[0], "--responses-per-prompt", "3", "--max-new-tokens", "2", "--limit", "2"]) == 0
    assert main(["generate", "--db", str(db), "--model", tiny_model_dir, "--prompts", str(prompts),
                 "--adapters", "base", adapters[1], "--max-new-tokens", "2", "--limit", "1"]) == 0
    capsys.readouterr()
    by_run = rows(db, "SELECT pr.run_id, ra.adapter, rb.adapter FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id "
                      "JOIN responses ra ON ra.id = p.response_a JOIN responses rb ON rb.id = p.response_b "
                      "WHERE pr.run_id > 1")
    assert [(r, a, b) for r, a, b in by_run] == [(2, resolved[0], resolved[0])] * 6 + [(3, "base", resolved[1])]


def test_markup_goes_through_generate_page_and_export_intact(tmp_path, prompts, tiny_model_dir, monkeypatch,
                                                             capsys):
    """A model that answers with markup: stored as is, served as JSON text, exported unchanged."""
    def fake_sample(model, tokenizer, prompt_ids, count, config, eos):
        return [[{"text": f"{SCRIPT} {k}", "finish": "eos", "tokens": 3} for k in range(count)] for _ in prompt_ids]

    monkeypatch.setattr(generate_module, "_sample", fake_sample)
    db = tmp_path / "l.db"
    assert main(["generate", "--db", str(db), "--model", tiny_model_dir, "--prompts", str(prompts),
                 "--limit", "1"]) == 0
    admin = capsys.readouterr().out.split("keep it secret): ")[1].split()[0]
    client = TestClient(create_app(str(db), allowed_hosts=["testserver"]), headers={"Authorization": f"Bearer {admin}"})
    pair = client.post("/api/next", json={}).json()["pair"]
    assert pair["prompt"] == f"Repeat {SCRIPT}" and {pair["left"], pair["right"]} == {f"{SCRIPT} 0", f"{SCRIPT} 1"}
    client.post("/api/answer", json={"pair_id": pair["id"], "choice": "left"}).raise_for_status()
    out = tmp_path / "pairs.jsonl"
    assert main(["export", "--db", str(db), "--output", str(out)]) == 0
    assert "exported 1 of 1 pairs" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"prompt": f"Repeat {SCRIPT}", "chosen": pair["left"],
                                           "rejected": pair["right"]}


def test_export_and_stats_commands(tmp_path, capsys):
    db = tmp_path / "l.db"
    store, _ = LabelStore.open(db, create=True, durable=False)
    from perlhf.label.store import Response

    for i in range(3):
        store.add_pair(f"p{i}", Response("x", "m"), Response("y", "m", "/ad"), labels_wanted=2)
    ann, bob = (store.labeller_for_token(store.add_labeller(n)) for n in ("ann", "bob"))
    for who, choices in ((ann, ("left", "tie", "both_bad")), (bob, ("left",))):
        for choice in choices:
            store.answer(who, store.next_pair(who)["id"], choice)
    capsys.readouterr()
    assert main(["export", "--db", str(db), "--output", "-", "--min-labels", "1"]) == 0
    captured = capsys.readouterr()
    exported = [json.loads(line) for line in captured.out.splitlines()]
    assert len(exported) <= 1 and "skipped: " in captured.err
    assert main(["export", "--db", str(db), "--output", str(tmp_path / "sub" / "p.jsonl"), "--min-labels", "2"]) == 0
    assert "min labels 2" in capsys.readouterr().err and (tmp_path / "sub" / "p.jsonl").exists()
    assert main(["export", "--db", str(db), "--output", "x", "--min-labels", "0"]) == 2
    assert main(["stats", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "answers: 4" in out and "ann" in out and "m + /ad" in out
    assert main(["stats", "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answers"] == 4


def test_wired_into_the_perlhf_command(tmp_path, capsys):
    from perlhf.cli import main as perlhf_main

    assert perlhf_main(["label", "init", "--db", str(tmp_path / "l.db")]) == 0
    assert "Admin token" in capsys.readouterr().out


def test_chat_wrapping_and_identical_responses(tmp_path, prompts, tiny_model_dir, monkeypatch, capsys):
    seen = []

    def fake_sample(model, tokenizer, prompt_ids, count, config, eos):
        texts = tokenizer.batch_decode(prompt_ids)
        seen.extend(texts)
        # The first prompt gets two identical (empty) responses, the others two different ones.
        return [[{"text": "" if "Repeat" in text else f"reply {k}", "finish": "eos", "tokens": 1}
                 for k in range(count)] for text in texts]

    monkeypatch.setattr(generate_module, "_sample", fake_sample)
    db = tmp_path / "l.db"
    assert main(["generate", "--db", str(db), "--model", tiny_model_dir, "--prompts", str(prompts), "--chat"]) == 0
    out = capsys.readouterr().out
    assert "queued 2 pairs (6 responses to 3 prompts)" in out and "1 pairs of identical responses left out" in out
    assert all(text.startswith("<|im_start|>user\n") for text in seen)  # through the chat template
    stored = [json.loads(p) for (p,) in rows(db, "SELECT prompt FROM prompts ORDER BY id")]
    assert stored == [[{"role": "user", "content": f"Repeat {SCRIPT}"}], [{"role": "user", "content": "Hello?"}],
                      [{"role": "user", "content": "Count"}]]
