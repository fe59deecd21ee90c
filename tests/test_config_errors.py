"""Bad input on the command line and in --config YAML files: every out-of-range value is refused with exit code 2
and one line naming the flag, before any training; bad YAML and unknown keys likewise. Also what happens when the
prompt is longer than the length limits, and the trust switches (--allow-pickle, --trust-remote-code).

All through `perlhf.cli.main([...])` in this process, as the `perlhf` command runs it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from perlhf.cli import main
from perlhf.config import ConfigError


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("config-errors")
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for i in range(40):
            # 12 prompts longer than 64 tokens (byte-level tokenizer: one token per byte), 28 short ones.
            prompt = f"Question {i}: " + ("please explain at length " * 4 if i % 10 < 3 else "why?")
            handle.write(json.dumps({"prompt": prompt, "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n")
    lines = [f"Tell me a long story about the number {i} please" if i < 5 else f"Hi {i}" for i in range(12)]
    (root / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"model": tiny_model_dir, "pairs": str(root / "pairs.jsonl"), "prompts": str(root / "prompts.txt"),
            "root": root}


@pytest.fixture(scope="module")
def reward_model(files) -> str:
    out = files["root"] / "rm"
    code, _, err = run(["rm", "train", "--model", files["model"], "--data", files["pairs"], "--output-dir", str(out),
                        "--max-steps", "1", "--per-device-train-batch-size", "4", "--eval-steps", "0",
                        "--device", "cpu"])
    assert code == 0, err[-2000:]
    return str(out)


def rm_argv(files: dict, out: Path, *extra: str) -> list[str]:
    return ["rm", "train", "--model", files["model"], "--data", files["pairs"], "--output-dir", str(out),
            "--max-steps", "1", "--per-device-train-batch-size", "4", "--eval-steps", "0", "--device", "cpu", *extra]


def rl_argv(files: dict, reward: str, out: Path, *extra: str) -> list[str]:
    return ["rl", "train", "--model", files["model"], "--reward-model", reward, "--prompts", files["prompts"],
            "--output-dir", str(out), "--max-steps", "1", "--batch-size", "4", "--max-new-tokens", "4",
            "--device", "cpu", *extra]


def assert_refused(code: int, out: str, err: str, flag: str, before_model: bool = True) -> None:
    assert code == 2, f"exit {code}, expected 2 naming {flag}; stderr: {err[-1500:]}"
    assert "perlhf: error: " in err, err[-1500:]
    message = err[err.index("perlhf: error: "):]  # what follows may quote a YAML parser's lines
    assert flag in message, f"the message does not name {flag}: {message}"
    assert "Traceback" not in err
    if before_model:  # a value that can be judged alone is judged before minutes go into loading a model
        assert "perlhf: model " not in out, "refused only after loading the model"


# ---------------------------------------------------------------------------------------------------------------
# Out-of-range values: exit 2, the flag named, nothing loaded


RM_BAD = [
    (["--lora-rank", "0"], "--lora-rank"),
    (["--lora-alpha", "0"], "--lora-alpha"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--max-length", "4"], "--max-length"),
    (["--max-steps", "0"], "--max-steps"),
    (["--per-device-train-batch-size", "0"], "--per-device-train-batch-size"),
    (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
    (["--validation-fraction", "1"], "--validation-fraction"),
    (["--save-total-limit", "0"], "--save-total-limit"),
    (["--eval-steps", "-1"], "--eval-steps"),
    (["--margin", "-1"], "--margin"),
    (["--kind", "triples"], "--kind"),
    # Not checked today: each is accepted and fails later with a traceback, or trains silently wrong.
    (["--max-grad-norm", "-1"], "--max-grad-norm"),      # a negative clip norm flips the gradient: ascent
    (["--max-grad-norm", "0"], "--max-grad-norm"),       # zeroes every gradient: nothing trains
    (["--warmup-ratio", "-0.5"], "--warmup-ratio"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio"),
    (["--weight-decay", "-1"], "--weight-decay"),        # ValueError traceback from AdamW
    (["--dtype", "float12"], "--dtype"),                 # ValueError traceback from resolve_dtype
    (["--lr-scheduler-type", "sawtooth"], "--lr-scheduler-type"),  # ValueError traceback after the model loads
    (["--limit", "0"], "--limit"),                       # refused, but the message says "limit", not the flag
]


@pytest.mark.parametrize("extra,flag", RM_BAD, ids=[" ".join(a) for a, _ in RM_BAD])
def test_rm_train_refuses_out_of_range_values(files, tmp_path, extra, flag):
    assert_refused(*run(rm_argv(files, tmp_path / "rm", *extra)), flag)


RL_BAD = [
    (["--lora-rank", "0"], "--lora-rank"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--value-learning-rate", "0"], "--value-learning-rate"),
    (["--algorithm", "dpo"], "--algorithm"),
    (["--mini-batch-size", "5"], "--mini-batch-size"),   # the rollout is 4 x 1
    (["--algorithm", "rloo", "--samples-per-prompt", "2", "--mini-batch-size", "9"], "--mini-batch-size"),
    (["--samples-per-prompt", "0"], "--samples-per-prompt"),
    (["--max-steps", "0"], "--max-steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--update-epochs", "0"], "--update-epochs"),
    (["--kl-coef", "-0.1"], "--kl-coef"),
    (["--kl-estimator", "k9"], "--kl-estimator"),
    (["--target-kl", "0"], "--target-kl"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-prompt-length", "0"], "--max-prompt-length"),
    (["--temperature", "0"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--save-steps", "0"], "--save-steps"),
    # An explicit k=1 with rloo is an error (leave-one-out needs another sample), not a silent k=2.
    (["--algorithm", "rloo", "--samples-per-prompt", "1"], "--samples-per-prompt"),
    # Not checked today: accepted, then a traceback or a silently wrong run.
    (["--lora-alpha", "0"], "--lora-alpha"),             # LoRA scale 0: the policy never moves
    (["--lora-alpha", "-16"], "--lora-alpha"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),      # gradient ascent
    (["--algorithm", "ppo", "--clip-range", "-0.2"], "--clip-range"),
    (["--algorithm", "ppo", "--value-clip-range", "-1"], "--value-clip-range"),
    (["--algorithm", "ppo", "--gamma", "1.5"], "--gamma"),
    (["--algorithm", "ppo", "--lam", "-0.5"], "--lam"),
    (["--value-coef", "-1"], "--value-coef"),            # the value head climbs its own loss
    (["--target-kl", "6", "--kl-horizon", "0"], "--kl-horizon"),  # ZeroDivisionError in the KL controller
    (["--batch-size", "30"], "--batch-size"),            # 12 prompts: a batch of 30 silently becomes 12
    (["--dtype", "float12"], "--dtype"),
    (["--lr-scheduler-type", "sawtooth"], "--lr-scheduler-type"),
    (["--limit", "0"], "--limit"),
]


@pytest.mark.parametrize("extra,flag", RL_BAD, ids=[" ".join(a) for a, _ in RL_BAD])
def test_rl_train_refuses_out_of_range_values(files, reward_model, tmp_path, extra, flag):
    needs_data = extra == ["--batch-size", "30"]  # judged against the prompts, which may be read after the model
    assert_refused(*run(rl_argv(files, reward_model, tmp_path / "rl", *extra)), flag, before_model=not needs_data)


def test_rloo_without_samples_per_prompt_takes_two():
    from perlhf import cli
    from perlhf import config as cfg
    from perlhf.rl.trainer import RLConfig

    args = cli._build_parser().parse_args(["rl", "train", "--reward-model", "x", "--prompts", "p.txt",
                                           "--algorithm", "rloo"])
    assert cfg.build(RLConfig, args).samples_per_prompt == 2
    args = cli._build_parser().parse_args(["rl", "train", "--reward-model", "x", "--prompts", "p.txt"])
    assert cfg.build(RLConfig, args).samples_per_prompt == 1


def test_the_python_api_validates_too(files, tmp_path):
    """RewardConfig(...) / RLConfig(...) built without the command line refuse what the command line refuses."""
    from perlhf.reward import RewardConfig
    from perlhf.rl.trainer import RLConfig

    with pytest.raises(ConfigError, match="--lora-rank"):
        RewardConfig(model=files["model"], data=files["pairs"], output_dir=str(tmp_path / "rm"), lora_rank=0)
    with pytest.raises(ConfigError, match="--samples-per-prompt"):
        RLConfig(reward_model="rm", prompts=files["prompts"], algorithm="rloo", samples_per_prompt=1)


def test_flag_type_errors_are_argparse_errors(files, tmp_path):
    code, _, err = run(rm_argv(files, tmp_path / "rm", "--max-steps", "ten"))
    assert code == 2 and "--max-steps" in err and "invalid int value" in err


# ---------------------------------------------------------------------------------------------------------------
# YAML: invalid files, unknown keys, wrong types


def yaml_case(files: dict, tmp_path: Path, text: str, trainer: str = "rm", reward: str = "") -> tuple:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    argv = rm_argv(files, tmp_path / "out") if trainer == "rm" else rl_argv(files, reward, tmp_path / "out")
    if "max_steps:" in text:  # let the file's value count: a flag would override it
        at = argv.index("--max-steps")
        del argv[at:at + 2]
    return run([*argv, "--config", str(path)]), str(path)


@pytest.mark.parametrize("text,needle", [
    ("lora_rank: [1\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("lora_rank: 4\nbogus_key: 1\nlearning_rat: 0.1\n", "unknown option(s) bogus_key, learning_rat"),
    ("lora_rank: 0\n", "--lora-rank"),
])
def test_rm_yaml_errors(files, tmp_path, text, needle):
    (result, path) = yaml_case(files, tmp_path, text)
    assert_refused(*result, needle)


def test_rl_yaml_unknown_key(files, reward_model, tmp_path):
    (result, path) = yaml_case(files, tmp_path, "algorithm: ppo\nkl_coeff: 0.1\n", "rl", reward_model)
    assert_refused(*result, "unknown option(s) kl_coeff")
    assert path in result[2]


def test_missing_yaml_file(files, tmp_path):
    assert_refused(*run([*rm_argv(files, tmp_path / "out"), "--config", str(tmp_path / "nope.yaml")]), "--config")


@pytest.mark.parametrize("text,needle", [
    ("learning_rate: eight\n", "learning_rate"),        # TypeError traceback today
    ("lora_rank: eight\n", "lora_rank"),                # TypeError traceback today
    ("max_steps: 2.5\n", "max_steps"),                  # accepted today: an int option given a fraction
    ("columns: prompt\n", "columns"),                   # ValueError traceback today
])
def test_yaml_values_of_the_wrong_type_are_refused(files, tmp_path, text, needle):
    (result, path) = yaml_case(files, tmp_path, text)
    assert_refused(*result, needle)


def test_yaml_scientific_notation_is_a_number(files, tmp_path):
    """PyYAML reads `1e-3` (no dot) as a string; a learning rate written that way must still work."""
    (code, out, err), _ = yaml_case(files, tmp_path, "learning_rate: 1e-3\nlora_dropout: 0\n")
    assert code == 0, err[-2000:]
    assert "lr 0.001" in out


def test_yaml_quoted_false_does_not_overwrite(files, tmp_path):
    """`overwrite_output_dir: "false"` is a string, and a non-empty string is truthy: it must not wipe the run."""
    out = tmp_path / "out"
    (code, _, err), _ = yaml_case(files, tmp_path, "max_steps: 1\n")
    assert code == 0, err[-2000:]
    marker = out / "checkpoints" / "step-00000001"
    assert marker.is_dir()
    (code, stdout, err), _ = yaml_case(files, tmp_path, 'overwrite_output_dir: "false"\nmax_steps: 1\n')
    assert "removed the previous run" not in stdout, "a quoted false wiped the run directory"
    assert code in (0, 2) and marker.is_dir()


# ---------------------------------------------------------------------------------------------------------------
# Prompts longer than the limits


def test_rm_max_length_shorter_than_the_prompt_keeps_the_response_and_counts(files, tmp_path, tiny_tokenizer):
    from perlhf.data import encode_example

    code, out, err = run(rm_argv(files, tmp_path / "rm", "--max-length", "64"))
    assert code == 0, err[-2000:]
    counts = re.search(r"truncated to --max-length 64: (\d+) training, (\d+) validation \(prompt cut from the left\)",
                       out)
    assert counts, out[-2000:]
    assert int(counts[1]) + int(counts[2]) == 12, counts[0]  # the 12 long prompts; the 28 short ones fit
    long_prompt = "Question 0: " + "please explain at length " * 4
    example = encode_example(tiny_tokenizer, long_prompt, "yes 0", 64)
    assert example.truncated and len(example.input_ids) == 64
    assert tiny_tokenizer.decode(example.input_ids[example.response_start:]) == "yes 0" + tiny_tokenizer.eos_token


def test_rl_prompts_longer_than_max_prompt_length_are_cut_and_counted(files, reward_model, tmp_path):
    code, out, err = run(rl_argv(files, reward_model, tmp_path / "rl", "--max-prompt-length", "24"))
    assert code == 0, err[-2000:]
    assert "5 cut to --max-prompt-length 24" in out


# ---------------------------------------------------------------------------------------------------------------
# Trust: pickle weights and remote code stay off unless asked for


@pytest.fixture(scope="module")
def pickle_only_model(files, tiny_model_dir) -> Path:
    from safetensors.torch import load_file

    directory = files["root"] / "pickle-only"
    directory.mkdir()
    for item in Path(tiny_model_dir).iterdir():
        if item.name != "model.safetensors":
            (directory / item.name).write_bytes(item.read_bytes())
    torch.save(load_file(str(Path(tiny_model_dir) / "model.safetensors")), directory / "pytorch_model.bin")
    return directory


def test_pickle_only_model_is_refused_without_allow_pickle(files, pickle_only_model, reward_model, tmp_path):
    for argv in (rm_argv(files, tmp_path / "rm"), rl_argv(files, reward_model, tmp_path / "rl")):
        argv[argv.index("--model") + 1] = str(pickle_only_model)
        code, out, err = run(argv)
        assert code == 2, err[-2000:]
        assert "--allow-pickle" in err and str(pickle_only_model.name) in err and "Traceback" not in err
    argv = rm_argv(files, tmp_path / "rm-allowed", "--allow-pickle")
    argv[argv.index("--model") + 1] = str(pickle_only_model)
    code, _, err = run(argv)
    assert code == 0, err[-2000:]


def test_trust_remote_code_is_off_by_default(files, tiny_model_dir, tmp_path):
    from perlhf.reward import RewardConfig
    from perlhf.rl.trainer import RLConfig

    for cls in (RewardConfig, RLConfig):
        fields = cls.__dataclass_fields__
        assert fields["trust_remote_code"].default is False and fields["allow_pickle"].default is False

    # A model directory whose config asks for its own code: the code must not run, and the refusal must name
    # the flag that would allow it.
    directory = tmp_path / "custom-code"
    directory.mkdir()
    for item in Path(tiny_model_dir).iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    (directory / "custom.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('CODE_RAN').write_text('yes')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n", encoding="utf-8")
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="custom-llama",
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (directory / "config.json").write_text(json.dumps(config))
    argv = rm_argv(files, tmp_path / "rm")
    argv[argv.index("--model") + 1] = str(directory)
    code, out, err = run(argv)
    assert not (directory / "CODE_RAN").exists(), "the model's own code ran without --trust-remote-code"
    assert code == 2 and "--trust-remote-code" in err and "Traceback" not in err, (code, err[-1500:])
