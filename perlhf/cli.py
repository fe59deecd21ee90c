"""The `perlhf` command. Each sub-command builds its config dataclass from YAML + flags and calls the library."""

from __future__ import annotations

import argparse
import sys

from perlhf.config import ConfigError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perlhf", description="Parameter-Efficient RLHF with LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True)

    from perlhf import reward

    rm = commands.add_parser("rm", help="reward models: train, eval, score").add_subparsers(dest="action", required=True)
    reward.register_cli(rm)

    from perlhf.rl import trainer

    rl = commands.add_parser("rl", help="RL: train a policy adapter against a reward model")
    trainer.register_cli(rl.add_subparsers(dest="action", required=True))

    from perlhf.label.cli import register as register_label

    label = commands.add_parser("label", help="collect human preferences in a web page")
    register_label(label.add_subparsers(dest="action", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except ConfigError as err:
        print(f"perlhf: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("perlhf: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
