"""The run report: run_dir/report/index.html, PNG plots beside it, and summary.md with the same figures.

Plots are drawn from the rows of metrics.jsonl, each only when its metrics were logged; the evaluation part comes
from evaluation.json and samples.jsonl (`perlhf eval`), and every key of those may be missing. The page has no
scripts and no external assets: images are referenced by relative path, so the directory can be zipped, mailed,
or opened from disk. All text from the run (prompts, replies, judge names) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import sys
from datetime import datetime
from pathlib import Path

MAX_SAMPLES = 20
PHASES = ["generate", "score", "reference", "update"]  # time/* metrics, in the order an RL step runs them
GOOD, BAD, NEUTRAL = "#2e7d32", "#c62828", "#78909c"  # win-rate bars: CI above 50%, below 50%, straddling it

# (file, title, panels); a panel is (y label, [(metric, legend label), ...]). Drawn when any metric is present.
CURVES = [
    ("reward.png", "Reward and KL to the anchor", [
        ("reward", [("reward/score", "reward model score"), ("reward/return", "return (score - KL penalty)")]),
        ("KL per response", [("reward/kl", "KL(policy || anchor)")]),
    ]),
    ("length.png", "Responses", [
        ("tokens", [("policy/response_length", "mean response length")]),
        ("rate", [("policy/eos_rate", "responses that end (eos)")]),
    ]),
    ("losses.png", "Losses", [  # one panel each: a value loss can be 100x the policy loss
        ("policy loss", [("loss/policy", "policy")]),
        ("value loss", [("loss/value", "value")]),
        ("loss", [("train/loss", "train"), ("eval/loss", "validation")]),
    ]),
    ("accuracy.png", "Reward model accuracy", [
        ("pairwise accuracy", [("train/accuracy", "train"), ("eval/accuracy", "validation"),
                               ("eval/shorter_baseline", "prefer-the-shorter baseline")]),
    ]),
    ("entropy.png", "Policy entropy", [("nats per token", [("policy/entropy", "entropy")])]),
]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _number(value) -> float | None:
    """A finite float, or None for anything missing, NaN or not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value, spec: str = ".3g") -> str:
    value = _number(value)
    return "–" if value is None else format(value, spec)


def _pct(value) -> str:
    return _fmt(value, ".1%")


def _series(metrics: list[dict], name: str) -> tuple[list[float], list[float]]:
    points = [(row.get("step"), _number(row.get(name))) for row in metrics if name in row]
    points = [(s, v) for s, v in points if _number(s) is not None and v is not None]
    return [float(s) for s, _ in points], [v for _, v in points]


def _smooth(values: list[float]) -> list[float]:
    """Trailing mean over ~5% of the run: RL curves are noisy, the trend is what a reader looks for."""
    window = max(1, len(values) // 20)
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def _figure(width: float, height: float):
    # A bare Figure (no pyplot): no global state, no GUI backend, saved through Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _style(axis) -> None:
    axis.grid(True, alpha=0.3)
    axis.spines[["top", "right"]].set_visible(False)


# ---------------------------------------------------------------------------------------------------------------
# Plots: each returns the file name it wrote, or None when there was nothing to draw


def _plot_curves(directory: Path, metrics: list[dict], file: str, title: str, panels) -> str | None:
    present = [(label, [(m, l) for m, l in lines if _series(metrics, m)[1]]) for label, lines in panels]
    present = [(label, lines) for label, lines in present if lines]
    if not present:
        return None
    figure = _figure(4.2 * len(present), 3.2)
    axes = figure.subplots(1, len(present), squeeze=False)[0]
    for axis, (label, lines) in zip(axes, present):
        for index, (metric, legend) in enumerate(lines):
            steps, values = _series(metrics, metric)
            color = "0.45" if "baseline" in metric else f"C{index}"
            if len(values) > 20:
                axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                axis.plot(steps, _smooth(values), color=color, linewidth=2, label=f"{legend} (smoothed)")
            else:
                axis.plot(steps, values, color=color, linewidth=2, marker="o", markersize=3, label=legend,
                          linestyle="--" if "baseline" in metric else "-")
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        _style(axis)
        axis.legend(fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.savefig(directory / file)
    return file


def _plot_time_split(directory: Path, metrics: list[dict]) -> str | None:
    logged = {k.removeprefix("time/") for row in metrics for k in row if k.startswith("time/")}
    order = [p for p in PHASES if p in logged] + sorted(logged - set(PHASES))
    means = []
    for phase in order:
        values = _series(metrics, f"time/{phase}")[1]
        if values:
            means.append((phase, sum(values) / len(values)))
    total = sum(seconds for _, seconds in means)
    if not means or total <= 0:
        return None
    figure = _figure(8, 2.2)
    axis = figure.subplots()
    left = 0.0
    for index, (phase, seconds) in enumerate(means):
        axis.barh([0], [seconds], left=left, color=f"C{index}", edgecolor="white",
                  label=f"{phase}: {seconds:.2f} s ({seconds / total:.0%})")
        if seconds / total > 0.12:  # a label inside only where it fits; the legend has them all
            axis.text(left + seconds / 2, 0, f"{phase}\n{seconds / total:.0%}", ha="center", va="center",
                      color="white", fontsize=9)
        left += seconds
    axis.set_yticks([])
    axis.set_xlabel("mean seconds per step")
    axis.set_xlim(0, total)
    axis.spines[["top", "right", "left"]].set_visible(False)
    figure.legend(loc="outside lower center", ncol=min(4, len(means)), fontsize=8, frameon=False)
    axis.set_title(f"Where the time goes: {total:.2f} s per step on average", fontsize=11)
    figure.savefig(directory / "time.png")
    return "time.png"


def _plot_win_rates(directory: Path, judges: dict) -> str | None:
    rows = [(name, j) for name, j in judges.items() if isinstance(j, dict) and _number(j.get("win_rate")) is not None]
    if not rows:
        return None
    figure = _figure(7, 1.2 + 0.55 * len(rows))
    axis = figure.subplots()
    for y, (name, judge) in enumerate(rows):
        rate = _number(judge["win_rate"])
        low, high = _number(judge.get("ci_low")), _number(judge.get("ci_high"))
        color = GOOD if low is not None and low > 0.5 else BAD if high is not None and high < 0.5 else NEUTRAL
        axis.barh([y], [rate], color=color, height=0.6)
        if low is not None and high is not None:
            axis.errorbar([rate], [y], xerr=[[rate - low], [high - rate]], color="black", capsize=4, linewidth=1)
        controlled = _number(judge.get("length_controlled_win_rate"))
        if controlled is not None:
            axis.plot([controlled], [y], marker="D", color="white", markeredgecolor="black", markersize=6,
                      label="policy not longer" if y == 0 else None)
        axis.text((high if high is not None else rate) + 0.015, y, f"{rate:.0%}", va="center", fontsize=9)
    axis.axvline(0.5, color="black", linestyle="--", linewidth=1, label="50%: no better than the anchor")
    axis.set_yticks(range(len(rows)), [name for name, _ in rows])
    axis.invert_yaxis()  # first judge on top, as in the table
    axis.set_xlim(0, 1)
    axis.xaxis.set_major_formatter("{x:.0%}")
    axis.set_xlabel("policy win rate against the anchor (95% CI)")
    axis.spines[["top", "right"]].set_visible(False)
    figure.legend(loc="outside upper center", ncol=2, fontsize=8, frameon=False)
    figure.savefig(directory / "win_rate.png")
    return "win_rate.png"


# ---------------------------------------------------------------------------------------------------------------
# Tables, as (header, rows of plain strings): the HTML and the Markdown render the same figures


def _judge_table(evaluation: dict) -> tuple[list[str], list[list[str]]]:
    header = ["judge", "win rate", "95% CI", "wins / ties / losses", "n", "win rate where the policy is not longer"]
    rows = []
    for name, j in (evaluation.get("judges") or {}).items():
        j = j if isinstance(j, dict) else {}
        ci = f"{_pct(j.get('ci_low'))} – {_pct(j.get('ci_high'))}" if "ci_low" in j or "ci_high" in j else "–"
        counts = " / ".join(str(j.get(k, "–")) for k in ("wins", "ties", "losses"))
        rows.append([str(name), _pct(j.get("win_rate")), ci, counts, str(j.get("n", "–")),
                     _pct(j.get("length_controlled_win_rate"))])
    return header, rows


def _figures_table(evaluation: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    if isinstance(evaluation.get("kl"), dict) and "mean" in evaluation["kl"]:
        rows.append(["mean KL to the anchor (per response)", _fmt(evaluation["kl"]["mean"])])
    length = evaluation.get("length") if isinstance(evaluation.get("length"), dict) else {}
    if "policy_mean" in length or "anchor_mean" in length:
        rows.append(["mean response length, policy / anchor (tokens)",
                     f"{_fmt(length.get('policy_mean'), '.1f')} / {_fmt(length.get('anchor_mean'), '.1f')}"])
    if "reward_length_correlation" in evaluation:
        rows.append(["correlation of reward with length", _fmt(evaluation["reward_length_correlation"], "+.2f")])
    if "sft_validation_loss" in evaluation:
        rows.append(["SFT anchor's validation loss (per target token)", _fmt(evaluation["sft_validation_loss"])])
    if "reward_model_accuracy" in evaluation:
        rows.append(["reward model accuracy", _pct(evaluation["reward_model_accuracy"])])
    for key, label in (("prompts", "prompts evaluated"), ("anchor", "anchor")):
        if key in evaluation:
            rows.append([label, str(evaluation[key])])
    return ["figure", "value"], rows


def _metrics_table(metrics: list[dict]) -> tuple[list[str], list[list[str]]]:
    names = sorted({k for row in metrics for k in row if k != "step"})
    rows = []
    for name in names:
        steps, values = _series(metrics, name)
        if values:
            tail = values[-max(1, len(values) // 10):]  # one logged value is noisy; the tail mean is what was reached
            rows.append([name, _fmt(values[0], ".4g"), _fmt(values[-1], ".4g"), _fmt(sum(tail) / len(tail), ".4g"),
                         str(int(steps[-1]))])
    return ["metric", "first", "last", "mean of the last 10%", "last step"], rows


# ---------------------------------------------------------------------------------------------------------------
# HTML and Markdown


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f6f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff8e1; border-left: 4px solid #f9a825; padding: 0.5em 0.8em; margin: 0.5em 0; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
table.samples td { white-space: pre-wrap; word-break: break-word; max-width: 380px; }
.win { font-weight: bold; color: #2e7d32; }
"""


def _html_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i >= numeric_from else ""}>{html.escape(cell)}</td>'
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_text(text: str) -> str:
    """Markdown renders inline HTML: escape it, so a judge named <script> stays text there too."""
    return html.escape(str(text), quote=False)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cells(values):
        return "| " + " | ".join(_md_text(v).replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    return "\n".join([cells(header), "|" + "---|" * len(header)] + [cells(row) for row in rows])


def _image(file: str, alt: str) -> str:
    return f'<img src="{html.escape(file)}" alt="{html.escape(alt)}">'


def _samples_html(samples: list[dict]) -> str:
    shown = [s for s in samples if isinstance(s, dict)][:MAX_SAMPLES]
    judges = list(dict.fromkeys(name for s in shown for name in (s.get("scores") or {})))
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["#", "prompt", "policy", "anchor"] + judges)
    rows = []
    for i, sample in enumerate(shown, 1):
        cells = [str(i)] + [html.escape(str(sample.get(k, ""))) for k in ("prompt", "policy", "anchor")]
        cells = [f"<td>{c}</td>" for c in cells]
        for name in judges:
            score = (sample.get("scores") or {}).get(name) or {}
            policy, anchor = _number(score.get("policy")), _number(score.get("anchor"))
            mark = " class=win" if policy is not None and anchor is not None and policy > anchor else ""
            cells.append(f"<td class=num><span{mark}>{_fmt(policy)}</span> vs {_fmt(anchor)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = f"<p class=meta>First {len(shown)} of {len(samples)} prompts. Scores: policy vs anchor; bold where the " \
           "policy wins.</p>"
    return f"{note}<table class=samples><tr>{header}</tr>{''.join(rows)}</table>"


def write_report(run_dir: str | Path, *, metrics: list[dict], evaluation: dict | None, samples: list[dict],
                 title: str) -> Path:
    """Write run_dir/report/index.html (+ PNGs, summary.md) and return the path of index.html."""
    directory = Path(run_dir) / "report"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.png"):  # a plot that is not drawn this time must not linger from a last report
        stale.unlink()
    metrics = [row for row in metrics or [] if isinstance(row, dict)]
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    samples = samples or []

    plots = [(_plot_curves(directory, metrics, file, heading, panels), heading) for file, heading, panels in CURVES]
    plots.append((_plot_time_split(directory, metrics), "Time per step, by phase"))
    plots = [(file, heading) for file, heading in plots if file]
    win_plot = _plot_win_rates(directory, evaluation.get("judges") or {})
    judges, figures, last = _judge_table(evaluation), _figures_table(evaluation), _metrics_table(metrics)
    notes = [str(n) for n in evaluation.get("notes") or []]

    written = datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class=meta>{html.escape(str(Path(run_dir)))} · written {written}</p>"]
    if evaluation:
        parts.append("<h2>Evaluation: policy against the anchor</h2>")
        parts += [f"<div class=note>{html.escape(n)}</div>" for n in notes]
        if judges[1]:
            parts.append(_html_table(*judges))
        if win_plot:
            parts.append(_image(win_plot, "win rate per judge with 95% confidence intervals"))
        if figures[1]:
            parts.append(_html_table(*figures, numeric_from=2))
    elif any("reward/score" in row for row in metrics):  # an RL run: say how to get the missing half
        parts.append("<p>No evaluation yet: <code>perlhf eval</code> adds win rates against the anchor.</p>")
    parts.append("<h2>Training</h2>")
    if not plots:
        parts.append("<p>No training metrics were logged.</p>")
    parts += [f"<h3>{html.escape(heading)}</h3>{_image(file, heading)}" for file, heading in plots]
    if last[1]:
        parts.append("<h3>Logged metrics</h3>" + _html_table(*last))
    if samples:
        parts.append("<h2>Samples</h2>" + _samples_html(samples))
    parts.append("</body></html>")
    page = directory / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")

    markdown = [f"# {_md_text(title)}", ""]
    if judges[1]:
        markdown += ["## Evaluation", "", _md_table(*judges), ""]
    if figures[1]:
        markdown += [_md_table(*figures), ""]
    markdown += [f"> {_md_text(n)}\n" for n in notes]
    if win_plot:
        markdown += [f"![win rate]({win_plot})", ""]
    if last[1]:
        markdown += ["## Training", "", _md_table(*last), ""]
    markdown += [f"![{heading}]({file})\n" for file, heading in plots]
    (directory / "summary.md").write_text("\n".join(markdown).rstrip() + "\n", encoding="utf-8")
    return page


def print_summary(evaluation: dict | None) -> str:
    """A few lines for the terminal: win rate per judge, KL, lengths, notes."""
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    lines = []
    for name, j in (evaluation.get("judges") or {}).items():
        j = j if isinstance(j, dict) else {}
        line = f"{name}: win rate {_pct(j.get('win_rate'))} (95% CI {_pct(j.get('ci_low'))}-{_pct(j.get('ci_high'))}"
        line += f", n={j['n']})" if "n" in j else ")"
        if _number(j.get("length_controlled_win_rate")) is not None:
            line += f"; where the policy is not longer {_pct(j['length_controlled_win_rate'])}"
        lines.append(line)
    if isinstance(evaluation.get("kl"), dict) and "mean" in evaluation["kl"]:
        lines.append(f"mean KL to the anchor {_fmt(evaluation['kl']['mean'])}")
    length = evaluation.get("length") if isinstance(evaluation.get("length"), dict) else {}
    if length:
        lines.append(f"mean length: policy {_fmt(length.get('policy_mean'), '.1f')}, "
                     f"anchor {_fmt(length.get('anchor_mean'), '.1f')} tokens")
    lines += [f"note: {n}" for n in evaluation.get("notes") or []]
    return "\n".join(lines) if lines else "no evaluation results"


# ---------------------------------------------------------------------------------------------------------------
# Command line: perlhf report RUN_DIR


def _read_json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _run(args) -> int:
    from perlhf.metrics import read_metrics

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"perlhf: error: {run_dir} is not a directory", file=sys.stderr)
        return 2
    results = Path(args.evaluation or run_dir)
    evaluation = None
    if (results / "evaluation.json").exists():
        evaluation = json.loads((results / "evaluation.json").read_text(encoding="utf-8"))
    page = write_report(run_dir, metrics=read_metrics(run_dir), evaluation=evaluation,
                        samples=_read_json_lines(results / "samples.jsonl"), title=args.title or run_dir.resolve().name)
    print(print_summary(evaluation))
    print(f"perlhf: report written to {page}")
    return 0


def register_cli(parser) -> None:
    """`perlhf report RUN_DIR`: call with the sub-command's own parser."""
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--evaluation", default=None,
                        help="directory holding evaluation.json and samples.jsonl (default: the run directory)")
    parser.add_argument("--title", default=None, help="page title (default: the run directory's name)")
    parser.set_defaults(run=_run)
