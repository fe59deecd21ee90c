"""SQLite storage for labelling: prompts, sampled responses, pairs, labellers, what each was shown, answers.

One file, WAL mode, foreign keys on, and every change in one transaction, so a crash or restart loses nothing
that was acknowledged. Each thread has its own connection: that makes the store safe to use from the web
server's thread pool and from a CLI command running beside it.

Vocabulary: a pair has responses `a` and `b` (for an adapter comparison, `a` comes from the first adapter).
A labeller sees them as "left"/"right" in an order drawn per labeller (`swapped`), and answers are stored
both ways: `choice` in pair terms (a, b, tie, both_bad) and `swapped`, the order that was shown.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = "2"
CHOICES = ("a", "b", "tie", "both_bad")
SHOWN_CHOICES = ("left", "right", "tie", "both_bad")
MAX_COMMENT = 2000
MAX_NAME = 64
# A pair served but not yet answered holds one of its K places for this long, so concurrent labellers
# spread over pairs instead of all answering the same one; after that someone else may take the place.
CLAIM_SECONDS = 15 * 60

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE labellers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    created_at REAL NOT NULL,
    disabled_at REAL,  -- set: no token, link or session of theirs works; their answers stay
    last_seen_at REAL
);
CREATE TABLE runs (id INTEGER PRIMARY KEY, created_at REAL NOT NULL, info TEXT NOT NULL);
CREATE TABLE prompts (
    id INTEGER PRIMARY KEY,
    run_id INTEGER REFERENCES runs(id),
    prompt TEXT NOT NULL  -- JSON: the original string or message list
);
CREATE TABLE responses (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL,
    model TEXT NOT NULL,
    adapter TEXT NOT NULL,  -- adapter path, or "base"
    info TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    response_a INTEGER NOT NULL REFERENCES responses(id),
    response_b INTEGER NOT NULL REFERENCES responses(id),
    labels_wanted INTEGER NOT NULL DEFAULT 1 CHECK (labels_wanted >= 1),
    -- answers not undone, kept in step by answer() and undo() in their transactions: finding open pairs
    -- then needs no per-pair count, which mattered once tens of thousands of pairs were done
    live_answers INTEGER NOT NULL DEFAULT 0 CHECK (live_answers >= 0),
    created_at REAL NOT NULL,
    CHECK (response_a <> response_b)
);
CREATE TABLE assignments (
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    labeller_id INTEGER NOT NULL REFERENCES labellers(id),
    swapped INTEGER NOT NULL CHECK (swapped IN (0, 1)),  -- 1: response b was shown on the left
    served_at REAL NOT NULL,
    PRIMARY KEY (pair_id, labeller_id)
);
CREATE TABLE answers (
    id INTEGER PRIMARY KEY,
    pair_id INTEGER NOT NULL,
    labeller_id INTEGER NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    swapped INTEGER NOT NULL CHECK (swapped IN (0, 1)),
    comment TEXT NOT NULL DEFAULT '' CHECK (length(comment) <= 2000),
    created_at REAL NOT NULL,
    undone_at REAL,  -- undo keeps the row as history; only rows with NULL here count
    FOREIGN KEY (pair_id, labeller_id) REFERENCES assignments(pair_id, labeller_id)
);
-- The guard against duplicates, whatever the server does: one live answer per labeller and pair.
CREATE UNIQUE INDEX answers_live ON answers(pair_id, labeller_id) WHERE undone_at IS NULL;
CREATE INDEX answers_by_labeller ON answers(labeller_id, id);
CREATE INDEX assignments_by_labeller ON assignments(labeller_id, served_at);
CREATE INDEX pairs_by_prompt ON pairs(prompt_id);
CREATE INDEX responses_by_prompt ON responses(prompt_id);
-- Everything known about an answer in one row, for people who open the file with sqlite3.
CREATE VIEW answer_log AS
SELECT ans.id AS answer_id, ans.pair_id, l.name AS labeller, ans.choice, ans.comment,
       datetime(ans.created_at, 'unixepoch') AS answered_at_utc, ans.undone_at IS NOT NULL AS undone,
       CASE ans.swapped WHEN 1 THEN 'b,a' ELSE 'a,b' END AS shown_order,
       ra.model AS model_a, ra.adapter AS adapter_a, rb.model AS model_b, rb.adapter AS adapter_b
FROM answers ans
JOIN labellers l ON l.id = ans.labeller_id
JOIN pairs p ON p.id = ans.pair_id
JOIN responses ra ON ra.id = p.response_a
JOIN responses rb ON rb.id = p.response_b;
"""

# Added in schema 2: single-use sign-in links, server-side sessions, and a record of admin actions.
SCHEMA_2 = """
CREATE TABLE invites (
    id INTEGER PRIMARY KEY,
    labeller_id INTEGER NOT NULL REFERENCES labellers(id),
    code_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    labeller_id INTEGER NOT NULL REFERENCES labellers(id),
    secret_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE admin_log (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    labeller TEXT NOT NULL,  -- a name, not an id: the entry outlives a removed labeller
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX invites_by_labeller ON invites(labeller_id);
CREATE INDEX sessions_by_labeller ON sessions(labeller_id);
"""
MIGRATIONS = {  # from schema version: SQL that brings it to the next one
    "1": "ALTER TABLE labellers ADD COLUMN disabled_at REAL;\nALTER TABLE labellers ADD COLUMN last_seen_at REAL;\n"
         + SCHEMA_2,
}
# last_seen_at is written at most this often per labeller, so that reads stay reads.
SEEN_EVERY = 60.0


class StoreError(Exception):
    """A request the store refuses; `status` is the HTTP status the web app answers with."""

    status = 400


class NotFound(StoreError):
    status = 404


class Forbidden(StoreError):
    status = 403


class Conflict(StoreError):
    status = 409


def export_lines(records: list[dict[str, Any]]) -> str:
    """JSON Lines. U+2028, U+2029 and U+0085 are escaped: JSON allows them raw in strings, but tools that split
    lines the Unicode way (Python's str.splitlines, some editors and JS tools) would cut a record in two. The
    other separators splitlines knows are control characters, which json.dumps escapes already."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\u0085", "\\u0085")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens are 256 random bits, so a plain SHA-256 is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


LABELLER_COLUMNS = "l.id, l.name, l.is_admin, l.token_hash, l.last_seen_at"


@dataclass(frozen=True)
class Labeller:
    id: int
    name: str
    is_admin: bool
    token_hash: str
    last_seen_at: float | None = None
    session: str | None = None  # the hash of the browser session this came by, None for a token


def _labeller(row: sqlite3.Row | None, session: str | None = None) -> Labeller | None:
    if row is None:
        return None
    return Labeller(row["id"], row["name"], bool(row["is_admin"]), row["token_hash"], row["last_seen_at"], session)


@dataclass
class Response:
    text: str
    model: str
    adapter: str = "base"
    info: dict[str, Any] = field(default_factory=dict)


def model_label(model: str, adapter: str) -> str:
    return model if adapter == "base" else f"{model} + {adapter}"


class LabelStore:
    def __init__(self, path: str | Path, durable: bool = True):
        self.path = Path(path)
        # durable: every commit reaches the disk before it returns (synchronous=FULL), so an answer the page
        # acknowledged survives even a power cut. Human answers are slow and precious, so that is the default;
        # durable=False (synchronous=NORMAL, still crash-safe for the process) is for bulk loads and tests.
        self.durable = durable
        self._local = threading.local()
        # Writers in this process queue here rather than in SQLite's busy handler, which polls with sleeps
        # of up to 100 ms and made tail latency ten times worse under load. Other processes still get the
        # busy handler (timeout below).
        self._write_lock = threading.Lock()

    # -- opening ---------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, create: bool = False, durable: bool = True) -> tuple["LabelStore", str | None]:
        """Open the database; with create=True make it if missing. Returns (store, admin token if just made)."""
        store = cls(path, durable)
        if not store.path.exists():
            if not create:
                raise StoreError(f"{path}: no such label database (create one with `perlhf label init --db {path}`)")
            store.path.parent.mkdir(parents=True, exist_ok=True)
            # Created 0600 before SQLite touches it: SQLite gives the WAL and SHM files the database's mode,
            # and the file holds token hashes, answers and comments.
            try:
                os.close(os.open(store.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass  # made meanwhile by another process; _initialise sorts out who fills it
        try:
            token = store._initialise() if create else None
            store._migrate()
            store._check_schema()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{path}: not a perlhf label database ({err})") from None
        return store, token

    def _initialise(self) -> str | None:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            # WAL lets the server read while a CLI command writes; the setting is stored in the file.
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("BEGIN IMMEDIATE")
            exists = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
            if exists:
                con.execute("ROLLBACK")
                return None
            for statement in (SCHEMA + SCHEMA_2).split(";\n"):
                if statement.strip():
                    con.execute(statement)
            con.execute("INSERT INTO meta VALUES ('schema', ?), ('secret', ?)", (SCHEMA_VERSION, secrets.token_hex(32)))
            token = new_token()
            con.execute("INSERT INTO labellers (name, token_hash, is_admin, created_at) VALUES ('admin', ?, 1, ?)",
                        (hash_token(token), time.time()))
            con.execute("COMMIT")
            return token
        finally:
            con.close()

    def _migrate(self) -> None:
        """Bring an older database to SCHEMA_VERSION, one step per transaction."""
        with self._tx(write=True) as con:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            while row is not None and row[0] in MIGRATIONS:
                for statement in MIGRATIONS[row[0]].split(";\n"):
                    if statement.strip():
                        con.execute(statement)
                row = (str(int(row[0]) + 1),)
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema'", row)

    def _check_schema(self) -> None:
        with self._tx() as con:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None or row[0] != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: label database schema {row and row[0]!r}, expected {SCHEMA_VERSION}")

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection. Kept open: closing the last connection to a WAL database checkpoints
        and deletes the WAL, about 10 ms each time, which per request would dominate everything else."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA synchronous = " + ("FULL" if self.durable else "NORMAL"))
            self._local.con = con
        return con

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction. Writers take the lock up front (IMMEDIATE) so that a read-then-write such as
        "find a free pair, then claim it" cannot interleave with another writer."""
        con = self._connection()
        with self._write_lock if write else nullcontext():
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def secret(self) -> bytes:
        with self._tx() as con:
            return bytes.fromhex(con.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0])

    # -- labellers, links and sessions ----------------------------------------------------------------------
    #
    # Three secrets, each stored only as a SHA-256: a labeller's *token* (long-lived, for scripts as
    # `Authorization: Bearer`; rotated by `labellers rotate`), a sign-in *link* code (single use, expires), and a
    # browser *session* (the cookie; expires, revoked by sign-out, rotate, disable and remove).

    def add_labeller(self, name: str, is_admin: bool = False, actor: str = "") -> str:
        """Create a labeller; returns their token."""
        name = name.strip()
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise StoreError(f"labeller name must be 1 to {MAX_NAME} printable characters")
        token = new_token()
        with self._tx(write=True) as con:
            if con.execute("SELECT 1 FROM labellers WHERE name = ?", (name,)).fetchone() is not None:
                raise Conflict(f"labeller {name!r} exists; `perlhf label labellers rotate {name}` gives them a new "
                               "token, `labellers link` a new sign-in link")
            con.execute("INSERT INTO labellers (name, token_hash, is_admin, created_at) VALUES (?, ?, ?, ?)",
                        (name, hash_token(token), int(is_admin), time.time()))
            self._log(con, actor, "add", name, "admin" if is_admin else "labeller")
        return token

    def rotate(self, name: str, admin: bool | None = None, actor: str = "") -> str:
        """A new token for a labeller, ending their sessions and unused links; admin=None keeps their role,
        True or False sets it. Returns the new token."""
        token = new_token()
        with self._tx(write=True) as con:
            row = self._named(con, name)
            role = bool(row["is_admin"]) if admin is None else admin
            if row["is_admin"] and not role:
                self._keep_an_admin(con, row)
            con.execute("UPDATE labellers SET token_hash = ?, is_admin = ? WHERE id = ?",
                        (hash_token(token), int(role), row["id"]))
            self._end_access(con, row["id"])
            self._log(con, actor, "rotate", row["name"], "admin" if role else "labeller")
        return token

    def invite(self, name: str, hours: float = 72.0, actor: str = "") -> str:
        """A single-use sign-in link code for a labeller, valid for `hours`."""
        if not hours > 0:
            raise StoreError("link lifetime must be positive")
        code, now = new_token(), time.time()
        with self._tx(write=True) as con:
            row = self._named(con, name)
            if row["disabled_at"] is not None:
                raise Conflict(f"labeller {row['name']!r} is disabled; `labellers enable` them first")
            con.execute("INSERT INTO invites (labeller_id, code_hash, created_at, expires_at) VALUES (?, ?, ?, ?)",
                        (row["id"], hash_token(code), now, now + hours * 3600))
            self._log(con, actor, "link", row["name"], f"valid {hours:g} h")
        return code

    def labeller_for_invite(self, code: str | None) -> Labeller | None:
        """Whom an unused, unexpired link signs in (without using it up)."""
        if not code or len(code) > 128:
            return None
        with self._tx() as con:
            row = con.execute(f"SELECT {LABELLER_COLUMNS} FROM invites i JOIN labellers l ON l.id = i.labeller_id "
                              "WHERE i.code_hash = ? AND i.used_at IS NULL AND i.expires_at > ? "
                              "AND l.disabled_at IS NULL", (hash_token(code), time.time())).fetchone()
        return _labeller(row)

    def sign_in(self, code: str | None, session_days: float = 30.0) -> tuple[Labeller, str] | None:
        """Use up a link and open a session; returns (labeller, session secret), None if the link is not valid.
        Checking and using happen in one write transaction, so a link signs in once even when clicked twice."""
        who = self.labeller_for_invite(code)
        if who is None:
            return None
        secret, now = new_token(), time.time()
        with self._tx(write=True) as con:
            used = con.execute("UPDATE invites SET used_at = ? WHERE code_hash = ? AND used_at IS NULL "
                               "AND expires_at > ?", (now, hash_token(code), now)).rowcount
            if not used:
                return None
            con.execute("INSERT INTO sessions (labeller_id, secret_hash, created_at, expires_at) VALUES (?, ?, ?, ?)",
                        (who.id, hash_token(secret), now, now + session_days * 86400))
            con.execute("UPDATE labellers SET last_seen_at = ? WHERE id = ?", (now, who.id))
        return who, secret

    def labeller_for_session(self, secret: str | None) -> Labeller | None:
        """The labeller of a live session (not expired, not revoked, labeller not disabled)."""
        if not secret or len(secret) > 128:
            return None
        with self._tx() as con:
            row = con.execute(f"SELECT {LABELLER_COLUMNS}, s.secret_hash FROM sessions s "
                              "JOIN labellers l ON l.id = s.labeller_id WHERE s.secret_hash = ? "
                              "AND s.revoked_at IS NULL AND s.expires_at > ? AND l.disabled_at IS NULL",
                              (hash_token(secret), time.time())).fetchone()
        return self._seen(_labeller(row, session=row and row["secret_hash"]))

    def labeller_for_token(self, token: str | None) -> Labeller | None:
        if not token or len(token) > 128:
            return None
        wanted = hash_token(token)
        with self._tx() as con:
            row = con.execute(f"SELECT {LABELLER_COLUMNS} FROM labellers l WHERE l.token_hash = ? "
                              "AND l.disabled_at IS NULL", (wanted,)).fetchone()
        # The lookup is by hash, which leaks nothing useful through timing; compare again in constant time anyway.
        if row is None or not hmac.compare_digest(row["token_hash"], wanted):
            return None
        return self._seen(_labeller(row))

    def end_session(self, session: str) -> None:
        """Sign out: `session` is the session's hash (Labeller.session)."""
        with self._tx(write=True) as con:
            con.execute("UPDATE sessions SET revoked_at = ? WHERE secret_hash = ? AND revoked_at IS NULL",
                        (time.time(), session))

    def sign_out(self, name: str, actor: str = "") -> int:
        """End every session of a labeller (their token and unused links keep working); returns how many."""
        with self._tx(write=True) as con:
            row = self._named(con, name)
            ended = self._end_access(con, row["id"], links=False)
            self._log(con, actor, "sign-out", row["name"], f"{ended} sessions")
        return ended

    def set_disabled(self, name: str, disabled: bool, actor: str = "") -> None:
        """Disable (nothing of theirs authenticates; answers stay and count) or enable a labeller."""
        with self._tx(write=True) as con:
            row = self._named(con, name)
            if disabled and row["is_admin"]:
                self._keep_an_admin(con, row)
            con.execute("UPDATE labellers SET disabled_at = ? WHERE id = ?",
                        (time.time() if disabled else None, row["id"]))
            if disabled:
                self._end_access(con, row["id"])
            self._log(con, actor, "disable" if disabled else "enable", row["name"])

    def demote(self, name: str, actor: str = "") -> None:
        with self._tx(write=True) as con:
            row = self._named(con, name)
            if row["is_admin"]:
                self._keep_an_admin(con, row)
            con.execute("UPDATE labellers SET is_admin = 0 WHERE id = ?", (row["id"],))
            self._log(con, actor, "demote", row["name"])

    def remove(self, name: str, with_answers: bool = False, actor: str = "") -> int:
        """Delete a labeller. One with answers is refused unless with_answers (their answers go too, and the
        pairs they answered open up again); `disable` keeps the answers instead. Returns answers deleted."""
        with self._tx(write=True) as con:
            row = self._named(con, name)
            if row["is_admin"]:
                self._keep_an_admin(con, row)
            answers = con.execute("SELECT count(*) FROM answers WHERE labeller_id = ?", (row["id"],)).fetchone()[0]
            if answers and not with_answers:
                raise Conflict(f"labeller {row['name']!r} has {answers} answers: `labellers disable` keeps them, "
                               "`labellers remove --with-answers` deletes them too")
            con.execute("UPDATE pairs SET live_answers = live_answers - (SELECT count(*) FROM answers a WHERE "
                        "a.pair_id = pairs.id AND a.labeller_id = :me AND a.undone_at IS NULL) WHERE id IN "
                        "(SELECT pair_id FROM answers WHERE labeller_id = :me)", {"me": row["id"]})
            for table in ("answers", "assignments", "sessions", "invites"):
                con.execute(f"DELETE FROM {table} WHERE labeller_id = ?", (row["id"],))
            con.execute("DELETE FROM labellers WHERE id = ?", (row["id"],))
            self._log(con, actor, "remove", row["name"], f"{answers} answers deleted" if answers else "")
        return answers

    def labellers(self) -> list[dict[str, Any]]:
        """Everyone, with role, state, answers (not undone), open sessions and when last seen."""
        with self._tx() as con:
            rows = con.execute(
                "SELECT l.name, l.is_admin, l.created_at, l.disabled_at, l.last_seen_at, "
                "(SELECT count(*) FROM answers a WHERE a.labeller_id = l.id AND a.undone_at IS NULL) AS answers, "
                "(SELECT count(*) FROM sessions s WHERE s.labeller_id = l.id AND s.revoked_at IS NULL "
                " AND s.expires_at > :now) AS sessions, "
                "(SELECT max(created_at) FROM answers a WHERE a.labeller_id = l.id) AS last_answer "
                "FROM labellers l ORDER BY l.id", {"now": time.time()}).fetchall()
        return [{"name": r["name"], "admin": bool(r["is_admin"]), "disabled": r["disabled_at"] is not None,
                 "answers": r["answers"], "sessions": r["sessions"], "created_at": r["created_at"],
                 "last_seen_at": r["last_seen_at"], "last_answer_at": r["last_answer"]} for r in rows]

    def admin_log(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest admin actions, newest first."""
        with self._tx() as con:
            rows = con.execute("SELECT at, actor, action, labeller, detail FROM admin_log ORDER BY id DESC LIMIT ?",
                               (limit,)).fetchall()
        return [dict(r) for r in rows]

    def _named(self, con: sqlite3.Connection, name: str) -> sqlite3.Row:
        row = con.execute("SELECT * FROM labellers WHERE name = ?", (name.strip(),)).fetchone()
        if row is None:
            raise NotFound(f"no labeller {name.strip()!r} (`perlhf label labellers` lists them)")
        return row

    def _keep_an_admin(self, con: sqlite3.Connection, row: sqlite3.Row) -> None:
        """Refuse to take admin rights from the last enabled admin: nobody could manage the database then."""
        others = con.execute("SELECT count(*) FROM labellers WHERE is_admin = 1 AND disabled_at IS NULL AND id != ?",
                             (row["id"],)).fetchone()[0]
        if not others:
            raise Conflict(f"{row['name']!r} is the only admin; make another one first "
                           "(`perlhf label add-labeller NAME --admin`)")

    def _end_access(self, con: sqlite3.Connection, labeller_id: int, links: bool = True) -> int:
        now = time.time()
        ended = con.execute("UPDATE sessions SET revoked_at = ? WHERE labeller_id = ? AND revoked_at IS NULL "
                            "AND expires_at > ?", (now, labeller_id, now)).rowcount
        if links:
            con.execute("UPDATE invites SET expires_at = ? WHERE labeller_id = ? AND used_at IS NULL "
                        "AND expires_at > ?",
                        (now, labeller_id, now))
        return ended

    @staticmethod
    def _log(con: sqlite3.Connection, actor: str, action: str, name: str, detail: str = "") -> None:
        con.execute("INSERT INTO admin_log (at, actor, action, labeller, detail) VALUES (?, ?, ?, ?, ?)",
                    (time.time(), actor or "unknown", action, name, detail))

    def _seen(self, who: Labeller | None) -> Labeller | None:
        """Note that a labeller was seen, at most every SEEN_EVERY seconds (a write per request would cost a
        durable commit each time)."""
        if who is not None and (who.last_seen_at or 0) < time.time() - SEEN_EVERY:
            with self._tx(write=True) as con:
                con.execute("UPDATE labellers SET last_seen_at = ? WHERE id = ?", (time.time(), who.id))
        return who

    # -- filling the queue -----------------------------------------------------------------------------------

    def new_run(self, info: dict[str, Any]) -> int:
        with self._tx(write=True) as con:
            return con.execute("INSERT INTO runs (created_at, info) VALUES (?, ?)",
                               (time.time(), json.dumps(info))).lastrowid

    def add_prompt(self, prompt: str | list[dict], responses: list[Response], pairs: list[tuple[int, int]],
                   labels_wanted: int = 1, run_id: int | None = None) -> list[int]:
        """Store one prompt, its responses, and pairs given as index pairs into `responses`; returns pair ids."""
        if labels_wanted < 1:
            raise StoreError("labels per pair must be at least 1")
        now = time.time()
        with self._tx(write=True) as con:
            prompt_id = con.execute("INSERT INTO prompts (run_id, prompt) VALUES (?, ?)",
                                    (run_id, json.dumps(prompt, ensure_ascii=False))).lastrowid
            ids = [con.execute("INSERT INTO responses (prompt_id, text, model, adapter, info) VALUES (?, ?, ?, ?, ?)",
                               (prompt_id, r.text, r.model, r.adapter, json.dumps(r.info))).lastrowid
                   for r in responses]
            return [con.execute("INSERT INTO pairs (prompt_id, response_a, response_b, labels_wanted, created_at) "
                                "VALUES (?, ?, ?, ?, ?)", (prompt_id, ids[i], ids[j], labels_wanted, now)).lastrowid
                    for i, j in pairs]

    def add_pair(self, prompt: str | list[dict], a: Response, b: Response, labels_wanted: int = 1) -> int:
        return self.add_prompt(prompt, [a, b], [(0, 1)], labels_wanted)[0]

    # -- labelling -------------------------------------------------------------------------------------------

    def next_pair(self, who: Labeller, labels_per_pair: int | None = None) -> dict[str, Any] | None:
        """The pair this labeller should see now: one served and not answered yet (an undone one first),
        else the oldest pair that still needs answers and that they have never seen. None when nothing is left."""
        now = time.time()
        with self._tx(write=True) as con:
            row = con.execute(
                "SELECT s.pair_id, s.swapped FROM assignments s WHERE s.labeller_id = ? AND NOT EXISTS "
                "(SELECT 1 FROM answers a WHERE a.pair_id = s.pair_id AND a.labeller_id = s.labeller_id "
                " AND a.undone_at IS NULL) ORDER BY s.served_at DESC, s.pair_id DESC LIMIT 1", (who.id,)).fetchone()
            if row is None:
                free = con.execute(
                    "SELECT p.id FROM pairs p WHERE p.live_answers < coalesce(:k, p.labels_wanted) AND NOT EXISTS "
                    "(SELECT 1 FROM assignments s WHERE s.pair_id = p.id AND s.labeller_id = :me) "
                    "AND (SELECT count(*) FROM assignments s WHERE s.pair_id = p.id AND (s.served_at > :cutoff "
                    "     OR EXISTS (SELECT 1 FROM answers a WHERE a.pair_id = s.pair_id "
                    "                AND a.labeller_id = s.labeller_id AND a.undone_at IS NULL)))"
                    "    < coalesce(:k, p.labels_wanted) ORDER BY p.id LIMIT 1",
                    {"me": who.id, "cutoff": now - CLAIM_SECONDS, "k": labels_per_pair}).fetchone()
                if free is None:
                    return None
                swapped = secrets.randbelow(2)
                con.execute("INSERT INTO assignments (pair_id, labeller_id, swapped, served_at) VALUES (?, ?, ?, ?)",
                            (free[0], who.id, swapped, now))
                row = (free[0], swapped)
            pair_id, swapped = row[0], row[1]
            pair = con.execute(
                "SELECT pr.prompt, ra.text AS a, rb.text AS b FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id "
                "JOIN responses ra ON ra.id = p.response_a JOIN responses rb ON rb.id = p.response_b "
                "WHERE p.id = ?", (pair_id,)).fetchone()
        left, right = (pair["b"], pair["a"]) if swapped else (pair["a"], pair["b"])
        # Which model wrote which response is left out on purpose: labelling is blind.
        return {"id": pair_id, "prompt": json.loads(pair["prompt"]), "left": left, "right": right}

    def answer(self, who: Labeller, pair_id: int, shown_choice: str, comment: str = "") -> int:
        """Record an answer given in shown terms (left/right/tie/both_bad); returns the answer id."""
        if shown_choice not in SHOWN_CHOICES:
            raise StoreError(f"choice must be one of {', '.join(SHOWN_CHOICES)}")
        if len(comment) > MAX_COMMENT:
            raise StoreError(f"comment is longer than {MAX_COMMENT} characters")
        with self._tx(write=True) as con:
            if con.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                raise NotFound(f"no pair {pair_id}")
            served = con.execute("SELECT swapped FROM assignments WHERE pair_id = ? AND labeller_id = ?",
                                 (pair_id, who.id)).fetchone()
            if served is None:
                raise Forbidden(f"pair {pair_id} was not served to you")
            swapped = served[0]
            choice = shown_choice
            if shown_choice in ("left", "right"):
                choice = "a" if (shown_choice == "left") != bool(swapped) else "b"
            try:
                answer_id = con.execute("INSERT INTO answers (pair_id, labeller_id, choice, swapped, comment, "
                                        "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                                        (pair_id, who.id, choice, swapped, comment, time.time())).lastrowid
            except sqlite3.IntegrityError:
                raise Conflict(f"pair {pair_id} is answered already; undo first to change the answer") from None
            con.execute("UPDATE pairs SET live_answers = live_answers + 1 WHERE id = ?", (pair_id,))
            return answer_id

    def undo(self, who: Labeller) -> int | None:
        """Withdraw this labeller's latest answer and put its pair first in their queue; returns the pair id."""
        now = time.time()
        with self._tx(write=True) as con:
            row = con.execute("SELECT id, pair_id FROM answers WHERE labeller_id = ? AND undone_at IS NULL "
                              "ORDER BY id DESC LIMIT 1", (who.id,)).fetchone()
            if row is None:
                return None
            con.execute("UPDATE answers SET undone_at = ? WHERE id = ?", (now, row["id"]))
            con.execute("UPDATE pairs SET live_answers = live_answers - 1 WHERE id = ?", (row["pair_id"],))
            con.execute("UPDATE assignments SET served_at = ? WHERE pair_id = ? AND labeller_id = ?",
                        (now, row["pair_id"], who.id))
            return row["pair_id"]

    def progress(self, who: Labeller, labels_per_pair: int | None = None) -> dict[str, int]:
        """done: this labeller's answers; total: done plus the pairs still open to them."""
        with self._tx() as con:
            done = con.execute("SELECT count(*) FROM answers WHERE labeller_id = ? AND undone_at IS NULL",
                               (who.id,)).fetchone()[0]
            # Open to me: pairs still short of K answers that I have not answered, plus pairs I hold
            # (served, unanswered) that others have filled meanwhile. Counted that way round, only the
            # first count touches every pair.
            args = {"me": who.id, "k": labels_per_pair}
            still_open = con.execute("SELECT count(*) FROM pairs WHERE live_answers < coalesce(:k, labels_wanted)",
                                     args).fetchone()[0]
            mine_open = con.execute(
                "SELECT count(*) FROM answers a JOIN pairs p ON p.id = a.pair_id WHERE a.labeller_id = :me "
                "AND a.undone_at IS NULL AND p.live_answers < coalesce(:k, p.labels_wanted)", args).fetchone()[0]
            held_full = con.execute(
                "SELECT count(*) FROM assignments s JOIN pairs p ON p.id = s.pair_id WHERE s.labeller_id = :me "
                "AND p.live_answers >= coalesce(:k, p.labels_wanted) AND NOT EXISTS (SELECT 1 FROM answers a "
                "WHERE a.pair_id = s.pair_id AND a.labeller_id = :me AND a.undone_at IS NULL)", args).fetchone()[0]
        return {"done": done, "total": done + still_open - mine_open + held_full}

    def last_comment(self, who: Labeller, pair_id: int) -> dict[str, str] | None:
        """The most recent undone answer of this labeller on a pair, in shown terms, to pre-fill the page."""
        with self._tx() as con:
            row = con.execute("SELECT choice, swapped, comment FROM answers WHERE labeller_id = ? AND pair_id = ? "
                              "AND undone_at IS NOT NULL ORDER BY id DESC LIMIT 1", (who.id, pair_id)).fetchone()
        if row is None:
            return None
        return {"choice": _shown(row["choice"], row["swapped"]), "comment": row["comment"]}

    # -- reading it all back ---------------------------------------------------------------------------------

    def _live_answers(self, con: sqlite3.Connection) -> list[sqlite3.Row]:
        return con.execute(
            "SELECT ans.pair_id, ans.labeller_id, l.name, ans.choice, ans.swapped, ans.created_at "
            "FROM answers ans JOIN labellers l ON l.id = ans.labeller_id "
            "WHERE ans.undone_at IS NULL ORDER BY ans.pair_id, ans.id").fetchall()

    def export(self, min_labels: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Pairs for `perlhf rm train` by the rule in docs/label.md: the answer with the most votes wins if it is
        strictly ahead of every other answer; a win for a or b is exported, anything else is skipped and counted."""
        if min_labels < 1:
            raise StoreError("--min-labels must be at least 1")
        with self._tx() as con:
            votes: dict[int, Counter[str]] = {}
            for row in self._live_answers(con):
                votes.setdefault(row["pair_id"], Counter())[row["choice"]] += 1
            pairs = con.execute(
                "SELECT p.id, pr.prompt, ra.text AS a, rb.text AS b FROM pairs p "
                "JOIN prompts pr ON pr.id = p.prompt_id JOIN responses ra ON ra.id = p.response_a "
                "JOIN responses rb ON rb.id = p.response_b ORDER BY p.id").fetchall()
        records: list[dict[str, Any]] = []
        skipped = Counter({k: 0 for k in ("unlabelled", "too_few_labels", "identical_responses", "tie", "both_bad",
                                          "no_majority")})
        for pair in pairs:
            count = votes.get(pair["id"], Counter())
            outcome = decide(count, min_labels)
            if outcome in ("a", "b") and pair["a"] == pair["b"]:
                outcome = "identical_responses"
            if outcome == "a":
                records.append({"prompt": json.loads(pair["prompt"]), "chosen": pair["a"], "rejected": pair["b"]})
            elif outcome == "b":
                records.append({"prompt": json.loads(pair["prompt"]), "chosen": pair["b"], "rejected": pair["a"]})
            else:
                skipped[outcome] += 1
        summary = {"pairs": len(pairs), "exported": len(records), "skipped": dict(skipped), "min_labels": min_labels}
        return records, summary

    def stats(self, labels_per_pair: int | None = None) -> dict[str, Any]:
        with self._tx() as con:
            answers = self._live_answers(con)
            pairs = {r["id"]: r for r in con.execute(
                "SELECT p.id, p.labels_wanted, ra.model AS model_a, ra.adapter AS adapter_a, "
                "rb.model AS model_b, rb.adapter AS adapter_b FROM pairs p "
                "JOIN responses ra ON ra.id = p.response_a JOIN responses rb ON rb.id = p.response_b")}
            people = con.execute("SELECT id, name, is_admin FROM labellers ORDER BY id").fetchall()
            undone = con.execute("SELECT count(*) FROM answers WHERE undone_at IS NOT NULL").fetchone()[0]
        by_pair: dict[int, list[sqlite3.Row]] = {}
        for row in answers:
            by_pair.setdefault(row["pair_id"], []).append(row)
        complete = sum(1 for pid, rows in by_pair.items()
                       if len(rows) >= (labels_per_pair or pairs[pid]["labels_wanted"]))

        per_person: dict[int, dict[str, Any]] = {
            p["id"]: {"name": p["name"], "admin": bool(p["is_admin"]), "answers": 0, "a": 0, "b": 0, "tie": 0,
                      "both_bad": 0, "left": 0, "right": 0, "agree": 0, "compared": 0, "last_answer": None}
            for p in people}
        for row in answers:
            person = per_person[row["labeller_id"]]
            person["answers"] += 1
            person[row["choice"]] += 1
            if row["choice"] in ("a", "b"):
                person[_shown(row["choice"], row["swapped"])] += 1
            person["last_answer"] = max(person["last_answer"] or 0, row["created_at"])
        for rows in by_pair.values():
            for mine in rows:
                for other in rows:
                    if other is not mine:
                        per_person[mine["labeller_id"]]["compared"] += 1
                        per_person[mine["labeller_id"]]["agree"] += mine["choice"] == other["choice"]
        for person in per_person.values():
            decisive = person["left"] + person["right"]
            # A labeller who picks "left" far from half the time is reading position, not content.
            person["left_rate"] = person["left"] / decisive if decisive else None
            person["agreement"] = person["agree"] / person["compared"] if person["compared"] else None

        models: dict[str, Counter[str]] = {}
        for row in answers:
            pair = pairs[row["pair_id"]]
            a, b = model_label(pair["model_a"], pair["adapter_a"]), model_label(pair["model_b"], pair["adapter_b"])
            if a == b:
                continue  # two samples of one model say nothing about models
            for name, won, lost in ((a, "a", "b"), (b, "b", "a")):
                tally = models.setdefault(name, Counter())
                tally["wins" if row["choice"] == won else "losses" if row["choice"] == lost else row["choice"]] += 1
        return {
            "pairs": len(pairs), "answers": len(answers), "undone_answers": undone,
            "pairs_with_answers": len(by_pair), "pairs_complete": complete,
            "agreement": agreement([[r["choice"] for r in rows] for rows in by_pair.values()]),
            "labellers": list(per_person.values()),
            "models": [{"model": name, **{k: tally[k] for k in ("wins", "losses", "tie", "both_bad")}}
                       for name, tally in sorted(models.items())],
        }


def _shown(choice: str, swapped: int) -> str:
    if choice not in ("a", "b"):
        return choice
    return "left" if (choice == "a") != bool(swapped) else "right"


def decide(votes: Counter[str], min_labels: int = 1) -> str:
    """The outcome of one pair's answers: a, b, tie, both_bad, or a reason to skip it."""
    total = sum(votes.values())
    if total == 0:
        return "unlabelled"
    if total < min_labels:
        return "too_few_labels"
    ranked = votes.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return "no_majority"
    return ranked[0][0]


def agreement(ratings: list[list[str]]) -> dict[str, Any]:
    """Agreement between labellers over pairs with two or more answers: the fraction of answer couples on the
    same pair that match, and Fleiss' kappa (the form that allows a different number of raters per item)."""
    items = [r for r in ratings if len(r) >= 2]
    if not items:
        return {"pairs": 0, "pairwise": None, "fleiss_kappa": None}
    agree = couples = 0
    totals: Counter[str] = Counter()
    p_items = []
    for r in items:
        counts = Counter(r)
        n = len(r)
        same = sum(c * (c - 1) for c in counts.values())
        agree += same
        couples += n * (n - 1)
        p_items.append(same / (n * (n - 1)))
        totals.update(counts)
    n_all = sum(totals.values())
    p_bar = sum(p_items) / len(p_items)
    p_e = sum((c / n_all) ** 2 for c in totals.values())
    kappa = None if p_e >= 1 else (p_bar - p_e) / (1 - p_e)
    return {"pairs": len(items), "pairwise": agree / couples, "fleiss_kappa": kappa}
