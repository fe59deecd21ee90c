"""`perlhf demo`: the whole PERL loop on the embedded default model, with a simulated human.

1. Prompts written for perlhf (below) are split three ways: reward-model prompts, RL prompts, held-out prompts.
2. The anchor (the untouched model) samples four responses per reward-model prompt.
3. A simulated human, `gold_preference`, compares every two of them (near-ties skipped and counted). The reward
   model sees only these pairwise labels.
4. A LoRA reward model is trained on the pairs (held-out accuracy reported).
5. A LoRA policy is trained with RL against the reward model only.
6. The gold preference, which RL never saw, judges the policy against the anchor on held-out prompts,
   so the report shows honestly whether RL improved the policy or only hacked the reward model.
7. A report and the exported adapters are written to the run directory.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from perlhf import config as cfg
from perlhf.config import field
from perlhf.models import DEFAULT_MODEL

ACTIVITIES = [
    "sleep better", "save money on groceries", "learn a new language", "keep houseplants alive", "start running",
    "cook rice", "write a cover letter", "stay focused while studying", "make friends in a new city",
    "reduce screen time", "prepare for a job interview", "clean a cast iron pan", "drink more water",
    "learn to play guitar", "organise a small kitchen", "take better photos with a phone", "speak in public",
    "remember names", "stop procrastinating", "pack for a weekend trip", "brew good coffee", "care for a puppy",
    "fix a squeaky door", "start a vegetable garden", "keep a journal", "read more books", "wake up earlier",
    "make a budget", "stay warm in winter", "learn to swim", "bake bread", "write a thank-you note",
    "choose a good password", "back up my photos", "lower my electricity bill", "study for a maths exam",
    "make my bike last longer", "keep my desk tidy", "cook a healthy breakfast", "deal with stress at work",
    "plan a birthday party", "improve my handwriting", "learn to draw", "get better at chess",
    "teach a child to ride a bike", "keep bread fresh", "be a better listener", "travel on a small budget",
]
# One tip per activity, written for perlhf: the replies `perlhf demo --sft` fine-tunes the anchor on.
TIPS = {
    "sleep better": "Go to bed at the same time every night and keep screens out of the bedroom.",
    "save money on groceries": "Plan your meals for the week and shop with a list.",
    "learn a new language": "Practise a little every day and speak it aloud from the start.",
    "keep houseplants alive": "Water them only when the top of the soil is dry, and give them bright light.",
    "start running": "Begin with short, easy runs three times a week and add a few minutes each week.",
    "cook rice": "Rinse it, simmer one cup with two cups of water under a lid, then let it rest.",
    "write a cover letter": "Say why you want this job and show one result that proves you can do it.",
    "stay focused while studying": "Work in 25-minute blocks with your phone in another room.",
    "make friends in a new city": "Join a weekly club or class so you see the same people often.",
    "reduce screen time": "Turn off most notifications and keep your phone out of reach at meals.",
    "prepare for a job interview": "Research the company and practise answering common questions out loud.",
    "clean a cast iron pan": "Scrub it with hot water, dry it on the stove, and rub in a little oil.",
    "drink more water": "Keep a full bottle beside you and refill it every time it is empty.",
    "learn to play guitar": "Learn three basic chords and practise switching between them every day.",
    "organise a small kitchen": "Keep only what you use often on the counter and store the rest by use.",
    "take better photos with a phone": "Use natural light, clean the lens, and keep the horizon straight.",
    "speak in public": "Know your opening lines well and rehearse the talk out loud several times.",
    "remember names": "Repeat the name when you hear it and use it once in the conversation.",
    "stop procrastinating": "Start with a task so small that it takes only two minutes.",
    "pack for a weekend trip": "Lay out outfits for each day, then pack only those and a spare shirt.",
    "brew good coffee": "Use freshly ground beans and water just below boiling.",
    "care for a puppy": "Feed it on a schedule, take it outside often, and reward good behaviour.",
    "fix a squeaky door": "Put a few drops of oil on the hinge pins and swing the door a few times.",
    "start a vegetable garden": "Start small with easy plants like lettuce and beans in a sunny spot.",
    "keep a journal": "Write three sentences each night about your day.",
    "read more books": "Carry a book with you and read a few pages whenever you wait.",
    "wake up earlier": "Move your alarm earlier by fifteen minutes each week and get morning light.",
    "make a budget": "List your income and fixed costs, then set a limit for everything else.",
    "stay warm in winter": "Wear layers, cover your head, and keep your feet dry.",
    "learn to swim": "Take lessons with a teacher and practise floating and breathing first.",
    "bake bread": "Follow a simple recipe and let the dough rise until it doubles in size.",
    "write a thank-you note": "Name the gift or favour, say how it helped you, and keep it short.",
    "choose a good password": "Use a long phrase of random words and a different one for every site.",
    "back up my photos": "Keep one copy on an external drive and another in cloud storage.",
    "lower my electricity bill": "Switch to LED bulbs and turn off devices you are not using.",
    "study for a maths exam": "Work through past papers and check every mistake you make.",
    "make my bike last longer": "Keep the chain clean and oiled and the tyres at the right pressure.",
    "keep my desk tidy": "Spend two minutes clearing it at the end of each day.",
    "cook a healthy breakfast": "Make oats with fruit or eggs with vegetables.",
    "deal with stress at work": "Take short breaks, breathe slowly, and talk to someone you trust.",
    "plan a birthday party": "Pick a date and place first, then invite guests early.",
    "improve my handwriting": "Write slowly and practise a few lines every day.",
    "learn to draw": "Draw simple objects from life for ten minutes every day.",
    "get better at chess": "Solve a few chess puzzles every day and review the games you lose.",
    "teach a child to ride a bike": "Remove the pedals at first so the child learns to balance.",
    "keep bread fresh": "Store it in a bread bin or freeze slices you will not eat soon.",
    "be a better listener": "Let the other person finish and ask a question about what they said.",
    "travel on a small budget": "Travel off season, stay in hostels, and cook some of your own meals.",
}
TEMPLATES = [
    "What is one good way to {a}?", "Give me a tip to {a}.", "How can I {a}?", "Any advice on how to {a}?",
    "I want to {a}. Where should I start?", "In one sentence, how can I {a}?", "Give me one short tip to {a}.",
    "Briefly: how do I {a}?",
]
STOPWORDS = set("a an the to of on in for my and i how can what is one good way give me tip any advice want "
                "where should start with at your you it be do get make keep".split())
RUDE = ("stupid", "idiot", "shut up", "dumb", "hate you", "whatever", "ugh")


def demo_prompts() -> list[str]:
    return [t.format(a=a) for a in ACTIVITIES for t in TEMPLATES]


def demo_sft_examples(prompts: list[str]) -> list[dict]:
    """prompt/completion records: each demo prompt answered with the tip written for its activity."""
    tip = {t.format(a=a): TIPS[a] for a in ACTIVITIES for t in TEMPLATES}
    return [{"prompt": [{"role": "user", "content": p}], "completion": tip[p]} for p in prompts]


def _user_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def gold_preference(prompt, response: str) -> float:
    """The simulated human: wants a short, finished reply that stays on topic and is polite.

    + 1.0 when the reply is finished (ends with . ! or ?), rather than cut off mid-sentence
    - 0.03 for every word beyond 15 (concise), and - 0.5 for a reply under 5 words (too short to help)
    + 0.5 times the fraction of the prompt's content words that the reply uses (on-topic)
    - 1.0 for each rude phrase; an empty reply scores -2.
    """
    text = response.strip()
    words = re.findall(r"[A-Za-z']+", text)
    if not words:
        return -2.0
    score = 1.0 if text.endswith((".", "!", "?")) else 0.0
    score -= 0.03 * max(0, len(words) - 15) + (0.5 if len(words) < 5 else 0.0)
    topic = {w for w in re.findall(r"[a-z']+", _user_text(prompt).lower()) if w not in STOPWORDS and len(w) > 2}
    if topic:
        used = {w.lower() for w in words}
        score += 0.5 * sum(any(u.startswith(t[:5]) for u in used) for t in topic) / len(topic)
    lowered = text.lower()
    score -= sum(lowered.count(r) for r in RUDE)
    return round(score, 4)


@dataclass
class DemoConfig:
    model: str = field(DEFAULT_MODEL, "backbone")
    output_dir: str = field("runs/demo", "run directory")
    quick: bool = field(False, "every stage at a smaller size: a smoke test (about 2 minutes on 2 cores)")
    sft: bool = field(False, "first LoRA SFT of the anchor on perlhf's own prompts and written tips; pairs, RL and "
                             "evaluation then start from that SFT anchor (adds a stage: a few minutes more)")
    overwrite_output_dir: bool = field(False, "start over instead of reusing finished stages")
    algorithm: str = field("reinforce", "reinforce, rloo or ppo")
    seed: int = field(0, "random seed")
    device: str | None = field(None, "default: cuda if available")
    dtype: str | None = field(None, "default: bf16 on CUDA, fp32 on CPU")

    def sizes(self) -> dict:
        # Sized for a 2-core CPU (11-17 minutes measured, more on a slow host; --quick about 2): enough pairs
        # for the reward model to beat the prefer-the-shorter baseline, and enough RL steps to move the policy.
        if self.quick:
            return {"rm_prompts": 32, "eval_prompts": 16, "new_tokens": 32, "rm_steps": 10, "rl_steps": 4, "rl_batch": 8,
                    "sft_steps": 6}
        return {"rm_prompts": 128, "eval_prompts": 48, "new_tokens": 48, "rm_steps": 40, "rl_steps": 20, "rl_batch": 16,
                "sft_steps": 40}


def sample_preference_pairs(config: DemoConfig, prompts: list[str], path: Path, max_new_tokens: int,
                            samples_per_prompt: int = 4, min_gap: float = 0.25, anchor_adapter: Path | None = None
                            ) -> dict:
    """k anchor responses per prompt; every two of them whose gold scores differ by at least `min_gap` make a
    pair (as InstructGPT turned rankings of k responses into k(k-1)/2 pairs). Closer pairs are skipped and
    counted: a person asked to compare them would call it a tie."""
    from itertools import combinations

    from perlhf.models import load_model
    from perlhf.rl.rollout import encode_prompts, generate, prompt_and_response_lists

    loaded = load_model(config.model, device=config.device, dtype=config.dtype)
    model = loaded.model
    if anchor_adapter is not None:  # the SFT anchor samples: the adapter RL will start from
        from perlhf.backbone import Backbone

        backbone = Backbone(model)
        backbone.load_adapter("policy", anchor_adapter, trainable=False)
        model = backbone.model
    messages = [[{"role": "user", "content": p}] for p in prompts]
    encoded, _ = encode_prompts(loaded.tokenizer, messages, 256)
    torch.manual_seed(config.seed)
    kept, ties, per_call = 0, 0, max(1, 96 // samples_per_prompt)  # ~96 sequences a call: CPU generate is step-bound
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for start in range(0, len(encoded), per_call):
            batch = [ids for ids in encoded[start:start + per_call] for _ in range(samples_per_prompt)]
            rollout = generate(model, loaded.tokenizer, batch, max_new_tokens, temperature=1.0, top_p=0.95)
            texts = loaded.tokenizer.batch_decode(prompt_and_response_lists(rollout)[1], skip_special_tokens=True)
            for j, prompt in enumerate(messages[start:start + per_call]):
                scored = [(gold_preference(prompt, t.strip()), t.strip())
                          for t in texts[j * samples_per_prompt:(j + 1) * samples_per_prompt]]
                for (ga, a), (gb, b) in combinations(scored, 2):
                    if abs(ga - gb) < min_gap:
                        ties += 1
                        continue
                    chosen, rejected = (a, b) if ga > gb else (b, a)
                    handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
                    kept += 1
            print(f"perlhf: demo pairs {min(start + per_call, len(encoded))}/{len(encoded)} prompts sampled", flush=True)
    return {"pairs": kept, "ties_skipped": ties}


def run_demo(config: DemoConfig) -> dict:
    from perlhf.evaluate import EvalConfig, describe, evaluate_policy
    from perlhf.export import export_adapter
    from perlhf.metrics import read_metrics
    from perlhf.report import write_report
    from perlhf.reward import RewardConfig, train_reward_model
    from perlhf.rl.trainer import RLConfig, train_policy

    sizes, run = config.sizes(), Path(config.output_dir)
    if config.overwrite_output_dir and run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    prompts = demo_prompts()
    random.Random(config.seed).shuffle(prompts)
    n_rm, n_eval = sizes["rm_prompts"], sizes["eval_prompts"]
    rm_prompts, eval_prompts, rl_prompts = prompts[:n_rm], prompts[n_rm:n_rm + n_eval], prompts[n_rm + n_eval:]
    data = run / "data"
    data.mkdir(exist_ok=True)
    for name, items in (("rl_prompts", rl_prompts), ("eval_prompts", eval_prompts)):
        with (data / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for p in items:
                handle.write(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n")
    timings, started = {}, time.perf_counter()
    stages = 6 if config.sft else 5

    def stage(name: str):
        name = f"{len(timings) + 1}/{stages} {name}"
        print(f"\nperlhf demo: {name}", flush=True)
        timings[name] = time.perf_counter()

    sft_dir, sft_summary = None, None
    if config.sft:
        from perlhf.sft import SFTConfig, train_sft

        stage("LoRA SFT of the anchor on perlhf's prompts and written tips")
        with (data / "sft.jsonl").open("w", encoding="utf-8") as handle:
            for record in demo_sft_examples(rm_prompts + rl_prompts):  # never the held-out evaluation prompts
                handle.write(json.dumps(record) + "\n")
        sft_dir = run / "sft"
        sft_summary = train_sft(SFTConfig(
            model=config.model, data=str(data / "sft.jsonl"), output_dir=str(sft_dir), max_steps=sizes["sft_steps"],
            per_device_train_batch_size=8, learning_rate=5e-4, max_length=128, eval_steps=0,
            save_steps=sizes["sft_steps"], seed=config.seed, device=config.device, dtype=config.dtype))

    anchor_name = "the SFT anchor" if config.sft else "the anchor"
    stage(f"sampling preference pairs from {anchor_name}, labelled by the simulated human")
    pairs_path = data / "pairs.jsonl"
    pair_stats = json.loads((data / "pairs.json").read_text()) if (data / "pairs.json").exists() else None
    if pair_stats is None:
        pair_stats = sample_preference_pairs(config, rm_prompts, pairs_path, sizes["new_tokens"], anchor_adapter=sft_dir)
        (data / "pairs.json").write_text(json.dumps(pair_stats))
    print(f"perlhf: {pair_stats['pairs']} pairs, {pair_stats['ties_skipped']} ties skipped (the gold judge could not separate them)")

    stage("training the LoRA reward model on the labelled pairs")
    rm = train_reward_model(RewardConfig(
        model=config.model, data=str(pairs_path), output_dir=str(run / "reward_model"), validation_fraction=0.2,
        max_steps=sizes["rm_steps"], per_device_train_batch_size=8, max_length=160, eval_steps=0,
        save_steps=max(5, sizes["rm_steps"] // 2), seed=config.seed, device=config.device, dtype=config.dtype))

    stage(f"RL ({config.algorithm}) of a LoRA policy against the reward model, one shared backbone"
          + (", from the SFT adapter (the reference: a frozen copy of it)" if config.sft else ""))
    train_policy(RLConfig(
        model=config.model, reward_model=str(run / "reward_model"), prompts=str(data / "rl_prompts.jsonl"),
        policy_adapter=str(sft_dir) if sft_dir else None,
        algorithm=config.algorithm, output_dir=str(run / "policy_run"), max_steps=sizes["rl_steps"],
        batch_size=sizes["rl_batch"], max_new_tokens=sizes["new_tokens"], learning_rate=5e-4,
        value_learning_rate=5e-4, kl_coef=0.05, save_steps=max(2, sizes["rl_steps"] // 3), seed=config.seed,
        device=config.device, dtype=config.dtype))

    stage(f"evaluating the policy against {anchor_name} on held-out prompts")
    evaluation = evaluate_policy(EvalConfig(
        policy=str(run / "policy_run"), prompts=str(data / "eval_prompts.jsonl"), judges=["gold"],
        num_prompts=n_eval, batch_size=n_eval,  # one batch: CPU decoding is step-bound, 48 rows cost ~2x 16
        max_new_tokens=sizes["new_tokens"], output_dir=str(run), device=config.device,
        dtype=config.dtype, seed=config.seed + 1))
    evaluation["reward_model_accuracy"] = rm["final"].get("eval/accuracy")
    if sft_summary is not None:
        evaluation["sft_validation_loss"] = sft_summary["final"].get("eval/loss")
    print(describe(evaluation))

    stage("report and exported adapters")
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    export_adapter(run / "policy_run" / "policy", run / "export" / "policy_adapter", overwrite=True)
    export_adapter(run / "reward_model", run / "export" / "reward_adapter", overwrite=True)
    evaluation["timings_seconds"] = _durations(timings, time.perf_counter())
    evaluation["total_seconds"] = time.perf_counter() - started
    (run / "evaluation.json").write_text(json.dumps(evaluation, indent=2), encoding="utf-8")
    report = write_report(run, metrics=read_metrics(run / "policy_run"), evaluation=evaluation, samples=samples,
                          title="perlhf demo: PERL on " + config.model)
    gold = evaluation["judges"]["gold"]
    print(f"\nperlhf demo finished in {evaluation['total_seconds'] / 60:.1f} min. Reward model held-out accuracy "
          f"{evaluation['reward_model_accuracy']:.1%}; gold win rate of the policy vs the anchor {gold['win_rate']:.1%} "
          f"(95% CI {gold['ci_low']:.1%}-{gold['ci_high']:.1%}); mean KL {evaluation['kl']['mean']:.3f}.")
    print(f"perlhf demo: report {report}; adapters in {run / 'export'}")
    return evaluation


def _durations(marks: dict, end: float) -> dict:
    names = list(marks)
    return {n: round((marks[names[i + 1]] if i + 1 < len(names) else end) - marks[n], 1) for i, n in enumerate(names)}


def register_cli(parser) -> None:
    cfg.add_arguments(parser, DemoConfig)
    parser.set_defaults(run=lambda args: run_demo(cfg.build(DemoConfig, args)) and 0)
