"""`perlhf label ...`: init, generate, add-labeller, serve, stats, export.

`register(subparsers)` is called by perlhf.cli for the `label` group; `python -m perlhf.label` runs the same
commands on their own (handy where the rest of perlhf is not wanted, e.g. a labelling server).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from perlhf import config as cfg
from perlhf.config import ConfigError, check, field
from perlhf.label.store import LabelStore, StoreError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass
class ServeConfig:
    db: str = field("labels.db", "label database")
    host: str = field("127.0.0.1", "address to listen on; anything but loopback exposes the page to the network")
    port: int = field(8000, "port (0 picks a free one)")
    labels_per_pair: int | None = field(None, "answers wanted per pair; overrides what generate stored")
    stop_after: float | None = field(None, "stop serving after this many seconds (scripts, demos)")

    def validate(self) -> None:
        check(0 <= self.port <= 65535, "port", "must be in 0..65535")
        check(self.labels_per_pair is None or self.labels_per_pair >= 1, "labels_per_pair", "must be at least 1")
        check(self.stop_after is None or self.stop_after > 0, "stop_after", "must be positive")


@dataclass
class ExportConfig:
    output: str | None = field(None, "pairs JSONL to write (`-` for standard output)")
    db: str = field("labels.db", "label database")
    min_labels: int = field(1, "export only pairs with at least this many answers")

    def validate(self) -> None:
        check(self.output is not None, "output", "is required")
        check(self.min_labels >= 1, "min_labels", "must be at least 1")


def _friendly(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Store refusals (missing database, duplicate name...) are user errors: report them as perlhf.cli does."""
    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except StoreError as err:
            raise ConfigError(str(err)) from None
    return wrapper


def open_store(db: str, base_url: str = DEFAULT_BASE_URL, create: bool = True) -> LabelStore:
    store, admin_token = LabelStore.open(db, create=create)
    if admin_token:
        print(f"perlhf: created {db}. Admin token (shown once, keep it secret): {admin_token}")
        print(f"perlhf: admin page: {base_url.rstrip('/')}/admin?token={admin_token}")
    return store


# -- actions ---------------------------------------------------------------------------------------------------

def run_init(args: argparse.Namespace) -> int:
    existed = Path(args.db).exists()
    open_store(args.db, args.base_url)
    if existed:
        print(f"perlhf: {args.db} exists already; its admin token was printed when it was made. "
              f"For a new admin link: perlhf label add-labeller NAME --admin --db {args.db}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from perlhf.label.generate import GenerateConfig, generate

    config = cfg.build(GenerateConfig, args)
    store = open_store(config.db)
    counts = generate(config, store)
    notes = [f"{n} {why}" for n, why in ((counts["skipped_long_prompts"], "prompts over --max-prompt-tokens skipped"),
                                        (counts["skipped_unrenderable"], "prompts the chat template refused skipped"),
                                        (counts["identical_pairs"], "pairs of identical responses left out")) if n]
    print(f"perlhf: queued {counts['pairs']} pairs ({counts['responses']} responses to {counts['prompts']} prompts) "
          f"in {config.db}" + (f"; {', '.join(notes)}" if notes else ""))
    return 0


def run_add_labeller(args: argparse.Namespace) -> int:
    store = open_store(args.db, args.base_url)
    token = store.add_labeller(args.name, is_admin=args.admin, rotate=args.rotate)
    page = "admin" if args.admin else ""
    print(f"perlhf: link for {args.name.strip()} (personal, do not share): {args.base_url.rstrip('/')}/{page}?token={token}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from perlhf.label.app import create_app

    config = cfg.build(ServeConfig, args)
    app = create_app(config.db, config.labels_per_pair)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"--host {config.host} --port {config.port}: cannot listen there ({err})") from None
    port = sock.getsockname()[1]
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    if not _is_loopback(config.host):
        print(f"perlhf: WARNING: listening on {config.host}, reachable from the network. Tokens travel in clear "
              "text unless a reverse proxy adds HTTPS in front.", file=sys.stderr)
    # The access log is off: the sign-in link carries the token in its query string.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    if config.stop_after:
        timer = threading.Timer(config.stop_after, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    print(f"perlhf: labelling page on http://{host}:{port}/ (labellers open their link from add-labeller; "
          f"admin page at /admin). Ctrl+C stops.", flush=True)
    server.run(sockets=[sock])
    return 0


def run_stats(args: argparse.Namespace) -> int:
    store = open_store(args.db, create=False)
    stats = store.stats(args.labels_per_pair)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"pairs: {stats['pairs']}, answers: {stats['answers']} (undone: {stats['undone_answers']}), "
          f"pairs with answers: {stats['pairs_with_answers']}, complete: {stats['pairs_complete']}")
    a = stats["agreement"]
    if a["pairs"]:
        kappa = "n/a" if a["fleiss_kappa"] is None else f"{a['fleiss_kappa']:.3f}"
        print(f"agreement: {a['pairwise']:.1%} over {a['pairs']} pairs with 2+ answers, Fleiss' kappa {kappa}")
    print(f"{'labeller':<20} {'answers':>7} {'a':>5} {'b':>5} {'tie':>5} {'bad':>5} {'left':>7} {'agrees':>7}")
    for p in stats["labellers"]:
        print(f"{p['name'][:20]:<20} {p['answers']:>7} {p['a']:>5} {p['b']:>5} {p['tie']:>5} {p['both_bad']:>5} "
              f"{_pct(p['left_rate']):>7} {_pct(p['agreement']):>7}")
    if stats["models"]:
        print(f"{'model':<50} {'wins':>5} {'losses':>6} {'tie':>5} {'bad':>5}")
        for m in stats["models"]:
            print(f"{m['model'][-50:]:<50} {m['wins']:>5} {m['losses']:>6} {m['tie']:>5} {m['both_bad']:>5}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    config = cfg.build(ExportConfig, args)
    store = open_store(config.db, create=False)
    records, summary = store.export(config.min_labels)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if config.output == "-":
        sys.stdout.write(lines)
    else:
        # Written beside and renamed, so a reader never sees half a file.
        target = Path(config.output)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(lines, encoding="utf-8")
        os.replace(partial, target)
    skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in summary["skipped"].items() if n) or "none"
    print(f"perlhf: exported {summary['exported']} of {summary['pairs']} pairs to {config.output} "
          f"(min labels {config.min_labels}); skipped: {skipped}", file=sys.stderr)
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- wiring ----------------------------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    def add(name: str, run: Callable, help: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help, description=help)
        parser.set_defaults(run=_friendly(run))
        return parser

    init = add("init", run_init, "create a label database and print its admin link")
    init.add_argument("--db", default="labels.db", help="label database (default: labels.db)")
    init.add_argument("--base-url", default=DEFAULT_BASE_URL, help="where the page will be served, for links")

    from perlhf.label.generate import GenerateConfig  # torch-free: the heavy imports are inside generate()

    cfg.add_arguments(add("generate", run_generate, "sample response pairs for prompts and queue them"), GenerateConfig)

    labeller = add("add-labeller", run_add_labeller, "add a labeller and print their personal link")
    labeller.add_argument("name", help="labeller's name, shown on the admin page")
    labeller.add_argument("--db", default="labels.db", help="label database (default: labels.db)")
    labeller.add_argument("--base-url", default=DEFAULT_BASE_URL, help="where the page is served, for the link")
    labeller.add_argument("--admin", action="store_true", help="may see the admin page and export")
    labeller.add_argument("--rotate", action="store_true", help="replace an existing labeller's token")

    cfg.add_arguments(add("serve", run_serve, "serve the labelling page"), ServeConfig)

    stats = add("stats", run_stats, "answers per labeller, agreement, model win counts")
    stats.add_argument("--db", default="labels.db", help="label database (default: labels.db)")
    stats.add_argument("--labels-per-pair", type=int, default=None, help="K for counting complete pairs")
    stats.add_argument("--json", action="store_true", help="print the figures as JSON")

    cfg.add_arguments(add("export", run_export, "write labelled pairs as JSONL for `perlhf rm train`"), ExportConfig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perlhf label", description="Collect human preferences in a web page.")
    register(parser.add_subparsers(dest="action", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ConfigError as err:
        print(f"perlhf: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
