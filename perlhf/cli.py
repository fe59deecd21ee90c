"""The `perlhf` command. Each sub-command builds its config dataclass from YAML + flags and calls the library."""

from __future__ import annotations

import argparse
import sys

from perlhf.config import ConfigError


def _build_parser() -> argparse.ArgumentParser:
    from perlhf import demo, evaluate, export, plan, report, reward, sft
    from perlhf.label.cli import register as register_label
    from perlhf.rl import trainer

    parser = argparse.ArgumentParser(prog="perlhf", description="Parameter-Efficient RLHF with LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo.register_cli(commands.add_parser("demo", help="the whole PERL loop on the default model"))
    sft_command = commands.add_parser("sft", help="supervised fine-tuning: the anchor that RL starts from")
    sft.register_cli(sft_command.add_subparsers(dest="action", required=True))
    rm = commands.add_parser("rm", help="reward models: train, eval, score")
    reward.register_cli(rm.add_subparsers(dest="action", required=True))
    rl = commands.add_parser("rl", help="RL: train a policy adapter against a reward model")
    trainer.register_cli(rl.add_subparsers(dest="action", required=True))
    evaluate.register_cli(commands.add_parser("eval", help="policy vs anchor: win rates, KL, length check"))
    export.register_cli(commands.add_parser("export", help="export an adapter, alone or merged into the model"))
    plan.register_cli(commands.add_parser("plan", help="will it fit? peak memory per part, before a run"))
    report.register_cli(commands.add_parser("report", help="HTML report of a run: curves, win rates, samples"))
    label = commands.add_parser("label", help="collect human preferences in a web page")
    register_label(label.add_subparsers(dest="action", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    from perlhf.data import DataError
    from perlhf.guards import OutputError, TrainingDiverged, UnsafeInputError
    from perlhf.models import ModelLoadError

    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (ConfigError, DataError, OutputError, UnsafeInputError, ModelLoadError, FileNotFoundError) as err:
        print(f"perlhf: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"perlhf: training stopped: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("perlhf: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
