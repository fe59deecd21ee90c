"""The HTML run report: plots that exist and are PNGs, escaped text, and no crash on partial inputs."""

import argparse
import json
import math

from perlhf.report import print_summary, register_cli, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rl_metrics(steps: int = 30) -> list[dict]:
    return [{"step": s, "reward/score": 1 - math.exp(-s / 10), "reward/kl": s / 20, "reward/return": 0.9 - s / 100,
             "policy/response_length": 20 + s / 3, "policy/eos_rate": 0.8, "policy/entropy": 2 - s / 30,
             "loss/policy": 0.1, "loss/value": 1 / s, "time/generate": 2.0, "time/score": 0.5, "time/reference": 0.4,
             "time/update": 1.1, "memory/peak_mb": 900.0} for s in range(1, steps + 1)]


EVALUATION = {
    "judges": {
        "reward_model": {"win_rate": 0.7, "ci_low": 0.6, "ci_high": 0.8, "wins": 44, "ties": 2, "losses": 18, "n": 64,
                         "length_controlled_win_rate": 0.65},
        "judge:<img src=x onerror=alert(1)>": {"win_rate": 0.4, "ci_low": 0.3, "ci_high": 0.52, "wins": 25, "ties": 1,
                                               "losses": 38, "n": 64, "length_controlled_win_rate": None},
    },
    "kl": {"mean": 1.5}, "length": {"policy_mean": 30.0, "anchor_mean": 25.0},
    "reward_length_correlation": 0.6, "reward_model_accuracy": 0.7, "notes": ["Rewards track <length>."],
}

SAMPLES = [{"prompt": f"Tell me <script>alert({i})</script>", "policy": "A & B", "anchor": "plain",
            "scores": {"reward_model": {"policy": 1.0, "anchor": 0.5}}} for i in range(25)]


def test_full_report_writes_html_markdown_and_valid_pngs(tmp_path):
    page = write_report(tmp_path, metrics=rl_metrics(), evaluation=EVALUATION, samples=SAMPLES, title="run <1>")
    assert page == tmp_path / "report" / "index.html"
    text = page.read_text(encoding="utf-8")
    images = {p.name for p in page.parent.glob("*.png")}
    assert {"reward.png", "length.png", "losses.png", "entropy.png", "time.png", "win_rate.png"} <= images
    assert "accuracy.png" not in images  # an RL run logs no reward-model accuracy
    for name in images:
        assert (page.parent / name).read_bytes().startswith(PNG_SIGNATURE)
        assert f'src="{name}"' in text  # relative paths: the directory stands on its own
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "&lt;script&gt;alert(0)&lt;/script&gt;" in text and "A &amp; B" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "run &lt;1&gt;" in text
    assert "alert(19)" in text and "alert(20)" not in text  # the first 20 samples only
    assert "70.0%" in text and "60.0% – 80.0%" in text and "Rewards track &lt;length&gt;." in text

    summary = (page.parent / "summary.md").read_text(encoding="utf-8")
    assert "| reward_model | 70.0% | 60.0% – 80.0% | 44 / 2 / 18 | 64 | 65.0% |" in summary
    assert "<img" not in summary and "![win rate](win_rate.png)" in summary


def test_reward_model_run_without_evaluation(tmp_path):
    metrics = [{"step": s, "train/loss": 0.7 - s / 100, "train/accuracy": 0.5 + s / 100} for s in range(5, 50, 5)]
    metrics.append({"step": 45, "eval/accuracy": 0.8, "eval/shorter_baseline": 0.55})
    page = write_report(tmp_path, metrics=metrics, evaluation=None, samples=[], title="rm")
    images = {p.name for p in page.parent.glob("*.png")}
    assert images == {"losses.png", "accuracy.png"}
    text = page.read_text(encoding="utf-8")
    assert "Evaluation" not in text and "perlhf eval" not in text  # a reward-model run has no policy to evaluate


def test_missing_keys_and_odd_values_do_not_crash(tmp_path):
    partial = {"judges": {"a": {"win_rate": float("nan"), "n": 0}, "b": {"win_rate": 0.6}, "c": {}},
               "kl": {}, "length": {"policy_mean": None}, "reward_length_correlation": None, "notes": []}
    samples = [{"prompt": "only a prompt"}, {"policy": "x", "scores": {"gold": {"policy": None}}}]
    metrics = [{"step": 1}, {"step": 2, "reward/score": float("nan")}, {"step": 3, "reward/score": 0.5},
               {"loss/value": 1}]  # no step: skipped
    page = write_report(tmp_path, metrics=metrics, evaluation=partial, samples=samples, title="partial")
    assert {p.name for p in page.parent.glob("*.png")} == {"reward.png", "win_rate.png"}  # only judge b has a rate
    assert "only a prompt" in page.read_text(encoding="utf-8")
    assert "b: win rate 60.0%" in print_summary(partial)

    # A re-render with less data leaves no stale plot behind.
    write_report(tmp_path, metrics=[], evaluation={}, samples=[], title="empty")
    assert not list(page.parent.glob("*.png"))
    assert print_summary(None) == "no evaluation results"


def test_print_summary_lines():
    lines = print_summary(EVALUATION).splitlines()
    assert lines[0] == "reward_model: win rate 70.0% (95% CI 60.0%-80.0%, n=64); where the policy is not longer 65.0%"
    assert "mean KL to the anchor 1.5" in lines and lines[-1] == "note: Rewards track <length>."


def test_command_line_reads_the_run_directory(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rl_metrics(5)))
    (tmp_path / "evaluation.json").write_text(json.dumps(EVALUATION))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SAMPLES[:3]))
    parser = argparse.ArgumentParser()
    register_cli(parser)
    args = parser.parse_args([str(tmp_path), "--title", "my run"])
    assert args.run(args) == 0
    assert "report written to" in capsys.readouterr().out
    text = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "<title>my run</title>" in text and "alert(2)" in text
