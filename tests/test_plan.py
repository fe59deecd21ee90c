"""`perlhf plan`: parameter counts equal the real model's, the activation probe equals what the whole model keeps
for backward, and the trainers act on the plan (gradient checkpointing when a run would not fit, the expected
peak printed at start)."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES, save_tiny_model
from perlhf.plan import GIB, PlanConfig, activations, count_shapes, decoder_layers, meta_model, plan, probe_layer


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer) -> dict:
    root = tmp_path_factory.mktemp("plan")
    return {arch: save_tiny_model(arch, root / arch, tiny_tokenizer) for arch in ARCHITECTURES}


def _saved_bytes(model, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Bytes of every distinct tensor autograd keeps for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        from perlhf.backbone import last_hidden

        last_hidden(model, ids, mask)
    return sum(storages.values())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parameter_counts_equal_the_real_models(models, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from perlhf.backbone import Backbone, lora_config

    config = AutoConfig.from_pretrained(models[arch])
    shapes = count_shapes(meta_model(config), 4, "all-linear")
    real = AutoModelForCausalLM.from_pretrained(models[arch])
    assert shapes.quantizable + shapes.other == sum(p.numel() for p in real.parameters())
    peft = Backbone.with_adapter(real, "probe", lora_config(real, 4, 8.0, 0.0, "all-linear")).model
    assert shapes.lora == sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_activation_probe_equals_what_the_whole_model_keeps_for_backward(models, arch):
    """One layer probed at lengths 32 and 64, scaled to 2 layers, 3 sequences and length 96, against the real
    model's saved tensors at that shape (the hidden-state working set of backward left out of both)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from perlhf.backbone import Backbone, lora_config

    config = AutoConfig.from_pretrained(models[arch])
    model = meta_model(config)
    probe = probe_layer(type(decoder_layers(model)[0]), config, 4, "all-linear", 4)
    shapes = count_shapes(model, 4, "all-linear")
    sequences, length = 3, 96
    predicted = activations(shapes, probe, sequences, length, False, 4) - 2 * sequences * length * shapes.hidden * 4

    real = AutoModelForCausalLM.from_pretrained(models[arch])
    model = Backbone.with_adapter(real, "probe", lora_config(real, 4, 8.0, 0.0, "all-linear")).model
    model.train()
    ids = torch.randint(0, 200, (sequences, length))
    mask = torch.ones(sequences, length, dtype=torch.long)
    mask[1, 80:] = 0  # padding: the mask path, as in training
    measured = _saved_bytes(model, ids, mask)
    print(f"{arch}: predicted {predicted:.0f} bytes, measured {measured} ({predicted / measured - 1:+.1%})")
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


def test_a_4bit_plan_counts_the_quantized_weights(models):
    pytest.importorskip("bitsandbytes")
    from perlhf.models import load_model

    planned = plan(PlanConfig(model=models["llama"], task="rm", quantize="4bit", device="cpu"))
    plain = plan(PlanConfig(model=models["llama"], task="rm", device="cpu"))
    real = load_model(models["llama"], device="cpu", quantize="4bit", verbose=False).model.get_memory_footprint()
    assert planned["perlhf"]["weights"] < plain["perlhf"]["weights"]
    assert planned["perlhf"]["weights"] == pytest.approx(real, rel=0.05)


def test_a_quantized_cpu_plan_counts_the_weights_file_read_while_quantizing(models):
    """On CPU the weights file stays resident while bitsandbytes quantizes from it: the load's own peak is the file
    plus the quantized weights, planned as the part beyond the run's peak (none when training needs more)."""
    from pathlib import Path

    part = "loading: the weights file, read while quantizing (beyond the run's own peak)"
    llama_8b = str(Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "llama-3-8b")  # saved in bf16
    small = dict(model=llama_8b, task="rl", quantize="4bit", batch_size=1, max_prompt_length=8, max_new_tokens=4,
                 dtype="bfloat16")
    on_cpu = plan(PlanConfig(device="cpu", **small))
    assert on_cpu["perlhf"]["total"] == pytest.approx(on_cpu["perlhf"]["weights"] + 2 * on_cpu["parameters"])
    assert part not in plan(PlanConfig(device="cuda", **small))["perlhf"]  # host pages, not GPU memory
    big = plan(PlanConfig(model=models["llama"], task="rm", quantize="4bit", device="cpu", batch_size=64,
                          max_length=512))["perlhf"]
    assert big[part] == 0  # the tiny model's activations outweigh its file


def test_the_plan_says_whether_it_fits(models, capsys):
    from perlhf.cli import main

    assert main(["plan", "--model", models["llama"], "--task", "rl", "--device", "cpu", "--memory", "1GB"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", "--model", models["llama"], "--task", "rm", "--device", "cpu", "--memory", "1MB"]) == 2
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "classic (separate models, full tuning)" in out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_an_rloo_plan_counts_the_reference_logits_beside_the_kept_sampling_graph(models, checkpointing):
    """RLOO keeps the sampling-time forward's graph for its update (rl.trainer.reuses_sampling_pass), with or
    without checkpointing, and the reference pass's logits live beside it: float32 logits over each sequence's new
    tokens and the one before them. PPO reuses nothing, so the two plans differ by exactly those logits."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(models["llama"]).vocab_size
    shape = dict(model=models["llama"], task="rl", device="cpu", batch_size=3, samples_per_prompt=2,
                 max_prompt_length=10, max_new_tokens=5, gradient_checkpointing=checkpointing)
    update = "update activations and logits"
    rloo, ppo = (plan(PlanConfig(algorithm=name, **shape))["details"][update] for name in ("rloo", "ppo"))
    assert rloo - ppo == 3 * 2 * (5 + 1) * vocab * 4


def test_rm_train_turns_checkpointing_on_only_when_the_run_would_not_fit(models, tmp_path, monkeypatch, capsys):
    import json

    import perlhf.plan as planning
    from perlhf.reward import RewardConfig, train_reward_model

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": f"no {i}"}) + "\n"
                             for i in range(20)))

    def run(name: str, **options) -> str:
        train_reward_model(RewardConfig(model=models["llama"], data=str(pairs), output_dir=str(tmp_path / name),
                                        max_steps=1, eval_steps=0, save_steps=1, device="cpu", **options))
        return capsys.readouterr().out

    import perlhf.models

    returned = []  # recorded, not done: the fixed threshold would slow every later test in this process
    monkeypatch.setattr(perlhf.models, "return_freed_memory", lambda *threshold: returned.append(threshold))
    out = run("roomy")
    assert "gradient checkpointing on" not in out and "expected peak memory" in out
    assert "gradient_checkpointing: false" in (tmp_path / "roomy" / "training_config.yaml").read_text()
    assert not returned and "memory is tight" not in out

    monkeypatch.setattr(planning, "available_memory", lambda device: 0.01 * GIB)
    out = run("tight")
    assert "gradient checkpointing on: without it the run would need" in out
    assert "gradient_checkpointing: true" in (tmp_path / "tight" / "training_config.yaml").read_text()
    assert returned == [()] and "memory is tight here: freed memory goes back to the system" in out
    out = run("asked", gradient_checkpointing=False)  # an explicit choice is kept
    assert "gradient_checkpointing: false" in (tmp_path / "asked" / "training_config.yaml").read_text()
    assert returned == [(), ()]  # memory is as tight as before


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_fsdp_plan_holds_a_share_of_the_base_per_process(models, arch):
    """Each of 4 processes: a quarter of the decoder layers' weights, two layers gathered whole (the one running
    and the next), and the rest (embedding, norms, LM head) a quarter too, or whole where the LM head is tied to
    the embedding (llama here; `parallel.shard` leaves a tied pair out). Counted by hand from the real model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models[arch])
    layers = decoder_layers(model)
    in_layers = sum(p.numel() for p in layers.parameters())
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    rest = sum(p.numel() for p in model.parameters()) - in_layers  # tied weights counted once by parameters()
    other = rest + in_layers - linear  # the layers' norms count with the rest
    tied = model.config.tie_word_embeddings
    expected = (linear / 4 + 2 * linear / len(layers) + (other if tied else other / 4)) * 4  # fp32
    sharded = plan(PlanConfig(model=models[arch], task="rl", device="cpu", processes=4, fsdp=True))
    whole = plan(PlanConfig(model=models[arch], task="rl", device="cpu", processes=4))
    assert sharded["perlhf"]["weights"] == pytest.approx(expected)
    assert whole["perlhf"]["weights"] == pytest.approx((linear + other) * 4)
    assert sharded["classic"]["total"] < whole["classic"]["total"]  # the classic layout sharded as ZeRO-3 runs it


def test_planning_leaves_the_seeded_generator_where_it_was(models):
    """A trainer plans before it initialises its adapter: the plan's probe must not draw from the run's generator."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    plan(PlanConfig(model=models["llama"], task="rm", device="cpu", batch_size=2, max_length=16))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("task", ["rm", "sft", "rl"])
def test_a_plan_gives_the_other_checkpointing_setting_as_its_own_plan_would(models, task, monkeypatch):
    """A trainer decides on checkpointing from one plan (one probe of a decoder layer, a full one for a big model):
    the plan's `other_checkpointing` layout is the plan made with the other setting, part for part."""
    import perlhf.plan as planning

    shape = dict(model=models["llama"], task=task, device="cpu", batch_size=2)
    for ckpt in (False, True):
        assert plan(PlanConfig(gradient_checkpointing=ckpt, **shape))["other_checkpointing"] == \
            plan(PlanConfig(gradient_checkpointing=not ckpt, **shape))["perlhf"]
    probes = []
    real_probe = planning.probe_layer
    monkeypatch.setattr(planning, "probe_layer", lambda *a, **k: probes.append(1) or real_probe(*a, **k))
    from perlhf.reward import RewardConfig

    planning.choose_checkpointing(RewardConfig(model=models["llama"], data="unused"), "rm", torch.device("cpu"),
                                  verbose=False, batch_size=2, max_length=16)
    assert probes == [1]
