"""Round trip: generate pairs with a model -> answer them over HTTP -> export -> `perlhf rm train` on the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from perlhf.cli import main
from perlhf.label.app import create_app


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and on a busy 2-core machine two threads spinning against
    each other made these tests 30 times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generate_label_export_train(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Question {i}: what comes after {i}?"} for i in range(5)]
    rows.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>!</b>"}]})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    db = tmp_path / "labels.db"

    assert main(["label", "generate", "--model", tiny_model_dir, "--prompts", str(prompts), "--db", str(db),
                 "--responses-per-prompt", "2", "--max-new-tokens", "8", "--seed", "1", "--device", "cpu"]) == 0
    assert "queued 6 pairs" in capsys.readouterr().out
    assert main(["label", "add-labeller", "ann", "--db", str(db)]) == 0
    link = capsys.readouterr().out.strip().split()[-1]

    client = TestClient(create_app(str(db), allowed_hosts=["testserver"]))
    client.get(link.split("8000", 1)[1]).raise_for_status()  # open the printed link
    client.post("/signin", data={"invite": link.split("invite=")[1]}).raise_for_status()  # press its button
    csrf = client.get("/api/me").json()["csrf"]
    state = client.post("/api/next", json={}, headers={"X-CSRF-Token": csrf}).json()
    assert state["progress"] == {"done": 0, "total": 6}
    answered = 0
    while state["pair"] is not None:
        choice = ("left", "right")[answered % 2]
        response = client.post("/api/answer", headers={"X-CSRF-Token": csrf},
                               json={"pair_id": state["pair"]["id"], "choice": choice})
        response.raise_for_status()
        state = response.json()
        answered += 1
    assert answered == 6 and state["progress"] == {"done": 6, "total": 6}

    pairs = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", str(db), "--output", str(pairs)]) == 0
    exported = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines()]
    assert 5 <= len(exported) <= 6  # a pair of identical samples would be skipped, and counted
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in exported)
    assert all(r["prompt"] in [row["prompt"] for row in rows] for r in exported)  # strings and message lists

    out = tmp_path / "rm"
    assert main(["rm", "train", "--model", tiny_model_dir, "--data", str(pairs), "--output-dir", str(out),
                 "--max-steps", "2", "--per-device-train-batch-size", "2", "--max-length", "64",
                 "--device", "cpu"]) == 0
    adapters = list(Path(out).rglob("adapter_config.json"))
    assert adapters, f"no adapter written under {out}"
    assert (adapters[0].parent / "adapter_model.safetensors").exists()
