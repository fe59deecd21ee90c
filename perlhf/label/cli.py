"""`perlhf label ...`: init, generate, add-labeller, labellers (list and manage), serve, stats, export.

`register(subparsers)` is called by perlhf.cli for the `label` group; `python -m perlhf.label` runs the same
commands on their own (handy where the rest of perlhf is not wanted, e.g. a labelling server).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import getpass
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
from perlhf.label.store import LabelStore, StoreError, export_lines

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
LINK_HOURS = 72.0


@dataclass
class ServeConfig:
    db: str = field("labels.db", "label database")
    host: str = field("127.0.0.1", "address to listen on; anything but loopback exposes the page to the network")
    port: int = field(8000, "port (0 picks a free one)")
    labels_per_pair: int | None = field(None, "answers wanted per pair; overrides what generate stored")
    stop_after: float | None = field(None, "stop serving after this many seconds (scripts, demos)")
    allowed_hosts: list[str] | None = field(None, "Host header names answered, e.g. label.example.org; "
                                                  "default: 127.0.0.1, localhost, [::1] and --host")
    session_days: float = field(30.0, "a browser stays signed in this long after using its link")
    forwarded_allow_ips: list[str] | None = field(None, "proxies whose X-Forwarded-Proto/-For are believed "
                                                        "(uvicorn's setting); default: 127.0.0.1 and ::1")
    limit_concurrency: int = field(200, "connections and requests at once; above it new requests get 503")
    timeout_keep_alive: int = field(5, "seconds an idle connection is kept between requests")
    header_timeout: float = field(10.0, "seconds a connection has to send a complete request head")

    def validate(self) -> None:
        check(0 <= self.port <= 65535, "port", "must be in 0..65535")
        check(self.labels_per_pair is None or self.labels_per_pair >= 1, "labels_per_pair", "must be at least 1")
        check(self.stop_after is None or self.stop_after > 0, "stop_after", "must be positive")
        check(self.session_days > 0, "session_days", "must be positive")
        check(self.limit_concurrency >= 1, "limit_concurrency", "must be at least 1")
        check(self.timeout_keep_alive >= 1, "timeout_keep_alive", "must be at least 1")
        check(self.header_timeout > 0, "header_timeout", "must be positive")
        for host in self.allowed_hosts or ():
            check(host and ("*" not in host[1:]) and (not host.startswith("*") or host.startswith("*.")),
                  "allowed_hosts", f"{host!r}: a name, an address, or a wildcard like *.example.org")


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
        print(f"perlhf: created {db}. Admin token, for scripts (shown once, keep it secret): {admin_token}")
        link = store.invite("admin", LINK_HOURS, actor())
        print(f"perlhf: admin sign-in link (works once, for {LINK_HOURS:g} hours): {signin_url(base_url, link)}")
    return store


def actor() -> str:
    """Who ran a command, for the admin log."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name anywhere in the environment
        return "cli"


def signin_url(base_url: str, code: str) -> str:
    return f"{base_url.rstrip('/')}/signin?invite={code}"


def print_link(store: LabelStore, name: str, args: argparse.Namespace, token: str | None = None) -> None:
    code = store.invite(name, args.link_hours, actor())
    print(f"perlhf: sign-in link for {name.strip()} (personal, works once, for {args.link_hours:g} hours): "
          f"{signin_url(args.base_url, code)}")
    if token is not None and args.show_token:
        print(f"perlhf: token for scripts (Authorization: Bearer; shown once, keep it secret): {token}")


# -- actions ---------------------------------------------------------------------------------------------------

def run_init(args: argparse.Namespace) -> int:
    existed = Path(args.db).exists()
    open_store(args.db, args.base_url)
    if existed:
        print(f"perlhf: {args.db} exists already; its admin token was printed when it was made. "
              f"For a new admin link: perlhf label labellers link admin --db {args.db}")
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
    if args.rotate:
        token = store.rotate(args.name, args.admin, actor())
    else:
        token = store.add_labeller(args.name, is_admin=bool(args.admin), actor=actor())
    print_link(store, args.name, args, token)
    return 0


def run_labellers(args: argparse.Namespace) -> int:
    """`perlhf label labellers [ACTION]`: list (the default) or manage labellers; every change is logged."""
    action = getattr(args, "labellers_action", None) or "list"
    store = open_store(args.db, create=False)
    who = actor()
    if action == "list":
        people = store.labellers()
        if args.json:
            print(json.dumps(people, indent=2))
            return 0
        print(f"{'labeller':<20} {'role':<8} {'state':<8} {'answers':>7} {'sessions':>8}  {'last seen':<16} "
              f"{'last answer':<16}")
        for p in people:
            print(f"{p['name'][:20]:<20} {'admin' if p['admin'] else 'labeller':<8} "
                  f"{'disabled' if p['disabled'] else 'active':<8} {p['answers']:>7} {p['sessions']:>8}  "
                  f"{_when(p['last_seen_at']):<16} {_when(p['last_answer_at']):<16}")
    elif action == "link":
        print_link(store, args.name, args)
    elif action == "rotate":
        token = store.rotate(args.name, args.admin, who)
        print(f"perlhf: new token for {args.name}; their sessions, old links and old token no longer work")
        print_link(store, args.name, args, token)
    elif action == "sign-out":
        print(f"perlhf: ended {store.sign_out(args.name, who)} sessions of {args.name}")
    elif action in ("disable", "enable"):
        store.set_disabled(args.name, action == "disable", who)
        print(f"perlhf: {args.name} {action}d" + ("; their answers stay" if action == "disable" else ""))
    elif action == "demote":
        store.demote(args.name, who)
        print(f"perlhf: {args.name} is no longer an admin")
    elif action == "remove":
        deleted = store.remove(args.name, args.with_answers, who)
        print(f"perlhf: removed {args.name}" + (f" and their {deleted} answers" if deleted else ""))
    elif action == "log":
        for entry in store.admin_log(args.limit):
            print(f"{_when(entry['at'])}  {entry['actor']:<16} {entry['action']:<9} {entry['labeller']:<20} "
                  f"{entry['detail']}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from perlhf.label.app import LOOPBACK_HOSTS, create_app
    from perlhf.label.server import HeaderTimeoutH11

    config = cfg.build(ServeConfig, args)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    allowed = config.allowed_hosts or list(dict.fromkeys(
        [*LOOPBACK_HOSTS, *([host] if config.host not in ("0.0.0.0", "::") else [])]))
    app = create_app(config.db, config.labels_per_pair, allowed, config.session_days)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
        sock.listen(2048)  # before the address is printed, so whoever reads it can connect at once
    except OSError as err:
        sock.close()
        raise ConfigError(f"--host {config.host} --port {config.port}: cannot listen there ({err})") from None
    port = sock.getsockname()[1]
    if not _is_loopback(config.host):
        print(f"perlhf: WARNING: listening on {config.host}, reachable from the network. Links and sessions travel "
              "in clear text unless a reverse proxy adds HTTPS in front (docs/label.md).", file=sys.stderr)
    HeaderTimeoutH11.header_timeout = config.header_timeout
    server = uvicorn.Server(uvicorn.Config(
        app, http=HeaderTimeoutH11, log_level="warning",
        access_log=False,  # the sign-in link carries a code in its query string
        limit_concurrency=config.limit_concurrency, timeout_keep_alive=config.timeout_keep_alive,
        h11_max_incomplete_event_size=16 * 1024,  # request line plus headers; h11's default, stated
        timeout_graceful_shutdown=5, server_header=False,
        proxy_headers=True, forwarded_allow_ips=config.forwarded_allow_ips))
    if config.stop_after:
        timer = threading.Timer(config.stop_after, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    print(f"perlhf: labelling page on http://{host}:{port}/ (labellers open their link from add-labeller; "
          f"admin page at /admin; answering Host: {', '.join(allowed)}). Ctrl+C stops.", flush=True)
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
    lines = export_lines(records)
    if config.output == "-":
        sys.stdout.write(lines)
    else:
        # Written beside and renamed, so a reader never sees half a file; 0600 like the database it comes from.
        target = Path(config.output)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.unlink(missing_ok=True)  # a leftover from a crash could have other permissions
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as out:
            out.write(lines)
        os.replace(partial, target)
    skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in summary["skipped"].items() if n) or "none"
    print(f"perlhf: exported {summary['exported']} of {summary['pairs']} pairs to {config.output} "
          f"(min labels {config.min_labels}); skipped: {skipped}", file=sys.stderr)
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


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

    def link_options(parser: argparse.ArgumentParser, token: bool = False) -> None:
        parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="where the page is served, for the link")
        parser.add_argument("--link-hours", type=float, default=LINK_HOURS,
                            help=f"the link works once, within this many hours (default: {LINK_HOURS:g})")
        if token:
            parser.add_argument("--show-token", action="store_true",
                                help="also print the token scripts send as Authorization: Bearer")

    labeller = add("add-labeller", run_add_labeller, "add a labeller and print their sign-in link")
    labeller.add_argument("name", help="labeller's name, shown on the admin page")
    labeller.add_argument("--db", default="labels.db", help="label database (default: labels.db)")
    labeller.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None,
                          help="may see the admin page and export (with --rotate: --no-admin drops it; "
                               "neither keeps it)")
    labeller.add_argument("--rotate", action="store_true", help="an existing labeller: same as `labellers rotate`")
    link_options(labeller, token=True)

    manage = add("labellers", run_labellers, "list labellers (last seen, answers), or manage one: link, rotate, "
                                             "sign-out, disable, enable, demote, remove, log")
    manage.add_argument("--db", default="labels.db", help="label database (default: labels.db)")
    manage.add_argument("--json", action="store_true", help="list as JSON")
    actions = manage.add_subparsers(dest="labellers_action")

    def action(name: str, help: str, named: bool = True) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help, description=help)
        if named:
            parser.add_argument("name", help="the labeller")
        # SUPPRESS: given after the action it counts, and otherwise the one before it is kept
        parser.add_argument("--db", default=argparse.SUPPRESS, help="label database (default: labels.db)")
        return parser

    action("list", "everyone, with role, state, answers, open sessions, last seen", named=False).add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="as JSON")
    link_options(action("link", "a new sign-in link (nothing else changes)"))
    rotate = action("rotate", "a new token; ends their sessions and unused links, prints a new link")
    rotate.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None,
                        help="--admin makes them an admin, --no-admin drops it; neither keeps their role")
    link_options(rotate, token=True)
    action("sign-out", "end all their browser sessions (token and unused links keep working)")
    action("disable", "nothing of theirs signs in any more; their answers stay and count")
    action("enable", "undo disable (they need a new link: `labellers link`)")
    action("demote", "no longer an admin")
    action("remove", "delete them; refused if they have answers, unless --with-answers").add_argument(
        "--with-answers", action="store_true", help="delete their answers too (their pairs open up again)")
    action("log", "the admin actions recorded, newest first", named=False).add_argument(
        "--limit", type=int, default=50, help="entries to show (default: 50)")

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
