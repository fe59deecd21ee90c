"""Training data: load preference pairs, pointwise ratings, SFT examples and prompts from files or Hugging Face
datasets; tokenize them.

Every record read is either kept or skipped with a counted reason (and written to an optional rejects file), so
`report.total == report.kept + sum(report.skipped.values())` always holds. Problems with a whole file (missing,
empty, unreadable, every record rejected) raise `DataError`. docs/data.md describes the formats and rules.
"""

from __future__ import annotations

import collections
import csv
import functools
import gzip
import json
import os
import random
import re
import socket
import urllib.parse
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

MAX_TEXT = 1_000_000        # characters per text field, bytes per JSONL/TXT line: anything bigger is garbage
REJECT_CLIP = 2_000         # characters of a rejected record kept in the rejects file
DETECT_SAMPLE = 100         # records whose field names decide the format of a file
ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
PREFERENCE_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
PROMPT_EXTENSIONS = PREFERENCE_EXTENSIONS + (".txt",)

# Our field names, the keys a `columns` mapping may use. Each defaults to the column of the same name.
FIELDS = {
    "prompt": "the prompt: text, or chat messages [{role, content}]",
    "input": "extra prompt text appended after a blank line when non-empty (used only when mapped)",
    "chosen": "preferred reply (or whole dialogue / conversation when there is no prompt)",
    "rejected": "dispreferred reply (or whole dialogue / conversation when there is no prompt)",
    "response": "the rated reply of a pointwise record",
    "label": "1/0/true/false rating of a pointwise record (falls back to a `reward` column)",
    "response_a": "first reply of a voted pair",
    "response_b": "second reply of a voted pair",
    "votes": "comma-separated vote columns: 1 prefers response_a, 2 response_b, 0 a tie",
    "context": "Taskmaster-style JSON-encoded list of turns (role agent/user/api)",
    "generation": "Taskmaster-style JSON-encoded agent turn (text or api call)",
    "completion": "the target reply of an SFT prompt/completion record",
    "messages": "an SFT conversation [{role, content}]: every assistant turn is a target",
    "text": "plain SFT text: all of it is the target",
}


class DataError(ValueError):
    """A whole source is unusable. The message names the file (and line and field where one is to blame)."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | list[dict]
    chosen: str
    rejected: str
    origin: str


@dataclass(frozen=True)
class RatedResponse:
    prompt: str | list[dict]
    response: str
    label: float
    origin: str


@dataclass(frozen=True)
class SFTExample:
    """A supervised example: `completion` is the target after `prompt`; plain text has prompt "" (all target); a
    conversation has `messages`, whose every assistant turn is a target (prompt and completion then unused)."""
    prompt: str | list[dict]
    completion: str
    origin: str
    messages: list[dict] | None = None


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    response_start: int
    truncated: bool


@dataclass
class LoadReport:
    source: str
    kind: str
    total: int = 0
    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    rejects_path: Path | None = None

    def summary(self) -> str:
        lines = [f"{self.source}: kept {self.kept:,} of {self.total:,} records ({self.kind})"]
        for reason, count in sorted(self.skipped.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  skipped {count:,}: {reason}")
        if self.skipped and self.rejects_path is not None:
            lines.append(f"  rejected records written to {self.rejects_path}")
        return "\n".join(lines)


class _Skip(Exception):
    """One record is unusable: counted under `reason`, never fatal."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field


@dataclass
class _Item:
    origin: str
    value: Any               # the decoded record, or a _Skip when it could not be decoded
    raw: str | None = None   # how the record reads in the rejects file; None: dump `value`


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

def load_preferences(source: str, *, columns: dict[str, str] | None = None, kind: str | None = None,
                     rejects_path: str | Path | None = None, limit: int | None = None
                     ) -> tuple[list[PreferencePair] | list[RatedResponse], LoadReport]:
    """Load preference pairs or pointwise ratings. `kind` ("pairs" or "pointwise") overrides detection."""
    if kind not in (None, "pairs", "pointwise"):
        raise DataError(f"kind must be 'pairs' or 'pointwise' (got {kind!r})")
    return _load(source, mode=kind, columns=_check_columns(columns), rejects_path=rejects_path, limit=limit)


def load_prompts(source: str, *, column: str | None = None, rejects_path: str | Path | None = None,
                 limit: int | None = None) -> tuple[list[str | list[dict]], LoadReport]:
    """Load prompts: .txt lines, a `prompt` (or `column`) field, or the prompt part of a pairs/ratings file.

    `column` may name two columns, "instruction,input": the second is appended when non-empty.
    """
    columns = None
    if column is not None:
        names = [name.strip() for name in str(column).split(",")]
        if not 1 <= len(names) <= 2 or not all(names):
            raise DataError(f"column must be one column name or 'prompt_column,input_column' (got {column!r})")
        columns = {"prompt": names[0]} | ({"input": names[1]} if len(names) == 2 else {})
    return _load(source, mode="prompts", columns=_check_columns(columns), rejects_path=rejects_path, limit=limit)


def load_sft(source: str, *, columns: dict[str, str] | None = None, rejects_path: str | Path | None = None,
             limit: int | None = None) -> tuple[list[SFTExample], LoadReport]:
    """Load SFT examples: `messages` conversations, `prompt`/`completion`, plain `text`, or the chosen side of
    preference pairs (HH-RLHF dialogues included), with the same validation and counted rejects as pairs."""
    return _load(source, mode="sft", columns=_check_columns(columns), rejects_path=rejects_path, limit=limit)


def split_train_validation(records: list, validation_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split that keeps records sharing a prompt on the same side.

    Many preference sets rate several replies to one prompt (PandaLM: 999 pairs over 170 prompts); splitting
    them across train and validation would let validation accuracy measure memorised prompts. Validation gets
    whole prompt groups up to round(n * fraction) records, at least one record when fraction > 0 and n >= 2.
    Both sides keep the input order.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1) (got {validation_fraction})")
    n = len(records)
    if validation_fraction == 0.0 or n < 2:
        return list(records), []
    target = min(max(1, round(n * validation_fraction)), n - 1)
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(_prompt_key(record), []).append(index)
    members = list(groups.values())
    rng = random.Random(seed)
    if len(members) < 2:                      # one prompt for everything: grouping is impossible
        members = [[index] for index in range(n)]
    rng.shuffle(members)
    chosen: list[int] = []
    for group in members:
        if len(chosen) + len(group) <= target:
            chosen.extend(group)
        if len(chosen) == target:
            break
    if not chosen:                            # every group is larger than the target: take the smallest
        chosen = list(min(members, key=len))
    picked = set(chosen)
    train = [record for index, record in enumerate(records) if index not in picked]
    validation = [record for index, record in enumerate(records) if index in picked]
    return train, validation


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """Text the model sees before the reply: chat messages through the tokenizer's template, text unchanged."""
    if isinstance(prompt, str):
        return prompt
    try:
        return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja errors ("roles must alternate") and missing templates come in many types
        raise DataError(f"cannot render chat messages with this tokenizer's chat template: {exc}") from exc


def prompt_token_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt as its tokenizer and chat template define them, with at most one leading BOS.

    Chat messages: the rendered template, which writes the BOS itself when the model wants one (`{{ bos_token }}`),
    so no special tokens are added on top. Plain text: the tokens the tokenizer puts before any text (a BOS for
    Llama, Mistral, Gemma; none for GPT-2 or Qwen), but never what it appends after it (an EOS would tell the model
    the prompt's reply is already over). Text that already starts with those tokens gets them once.
    """
    if not isinstance(prompt, str):
        return list(tokenizer.encode(render_prompt(tokenizer, prompt), add_special_tokens=False))
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    lead = _leading_special_ids(tokenizer)
    return ids if ids[:len(lead)] == lead else lead + ids


@functools.lru_cache(maxsize=8)  # asked once per prompt: the probe's two encodes would repeat for every record
def _leading_special_ids(tokenizer) -> list[int]:
    """What the tokenizer adds before a text: the part of a probe's full encoding ahead of its bare encoding."""
    bare = tokenizer.encode("x", add_special_tokens=False)
    full = tokenizer.encode("x", add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start])
    return []


def cut_prompt_left(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last `keep` prompt tokens, but a leading BOS stays first: models trained with one never see text without it.

    A prompt of at most `keep` tokens comes back whole. A cut one starting with `bos_id` keeps that BOS plus its last
    keep - 1 tokens (only the BOS when keep is 1). `bos_id` None: a plain cut from the left.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (got {keep})")
    if len(ids) <= keep:
        return list(ids)
    if bos_id is not None and ids[0] == bos_id:
        return [bos_id] + (list(ids[-(keep - 1):]) if keep > 1 else [])
    return list(ids[-keep:])


def encode_example(tokenizer, prompt: str | list[dict], response: str, max_length: int) -> EncodedExample:
    """Token ids of prompt + response + eos, with `response_start` exact because the two are encoded apart.

    Too long: keep the whole response and cut the prompt from the left (a leading BOS stays, see cut_prompt_left).
    If the response (with eos) alone needs more than max_length - 1 tokens, keep one prompt token (the BOS, or the
    last one) and cut the response from the right (the eos goes first). A reward or policy needs at least one
    prompt token to condition the first reply token on.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (got {max_length})")
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    response_ids = list(tokenizer.encode(response, add_special_tokens=False))
    eos = tokenizer.eos_token_id
    if eos is not None and (not response_ids or response_ids[-1] != eos):
        response_ids.append(eos)
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated:
        room = max_length - len(response_ids)
        prompt_ids = cut_prompt_left(prompt_ids, max(room, 1), tokenizer.bos_token_id)
        response_ids = response_ids[:max_length - len(prompt_ids)]
    return EncodedExample(prompt_ids + response_ids, len(prompt_ids), truncated)


def encode_sft(tokenizer, example: SFTExample, max_length: int, train_on_prompt: bool = False
               ) -> tuple[list[int], list[bool], bool]:
    """(token ids, which tokens are targets, truncated) of an SFT example, encoded as reward training and RL encode
    prompts and replies: the prompt by `prompt_token_ids`, each target apart and closed by EOS, so the reply the
    model learns is the token sequence RL later samples after the same prompt. Too long: as `encode_example`.

    A conversation is cut into the pieces its chat template renders: before each assistant turn (not a target)
    and the turn itself with its end-of-turn tokens (a target). Too long: its oldest turns are cut.
    """
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if example.messages is None:
        prompt = prompt_token_ids(tokenizer, example.prompt) if example.prompt else list(_leading_special_ids(tokenizer))
        reply = list(tokenizer.encode(example.completion, add_special_tokens=False))
        if eos is not None and (not reply or reply[-1] != eos):
            reply.append(eos)
        truncated = len(prompt) + len(reply) > max_length
        if truncated:  # the rule of encode_example: the whole reply if it fits, else its start
            prompt = cut_prompt_left(prompt, max(max_length - len(reply), 1), bos) if prompt else prompt
            reply = reply[:max_length - len(prompt)]
        targets = [train_on_prompt] * len(prompt) + [True] * len(reply)
        return prompt + reply, targets, truncated
    ids, targets, done = [], [], ""
    for turn, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(tokenizer, example.messages[:turn]) if turn else ""
        through = _render_conversation(tokenizer, example.messages[:turn + 1])
        if not before.startswith(done) or not through.startswith(before):
            raise DataError(f"{example.origin}: the chat template does not render this conversation as a sequence "
                            "of its turns, so its assistant turns cannot be told apart")
        for text, target in ((before[len(done):], train_on_prompt), (through[len(before):], True)):
            piece = list(tokenizer.encode(text, add_special_tokens=False))
            ids, targets = ids + piece, targets + [target] * len(piece)
        done = through
    truncated = len(ids) > max_length
    if truncated:  # the oldest turns go first; positions through cut_prompt_left, so a leading BOS stays
        keep = cut_prompt_left(list(range(len(ids))), max_length, 0 if ids and ids[0] == bos else None)
        ids, targets = [ids[i] for i in keep], [targets[i] for i in keep]
    return ids, targets, truncated


def _render_conversation(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    except Exception as exc:  # jinja errors and missing templates come in many types
        raise DataError(f"cannot render chat messages with this tokenizer's chat template: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# Loading loop: sources -> items -> format detection -> parsed records or counted skips
# ---------------------------------------------------------------------------------------------------------------

def _load(source: str, *, mode: str | None, columns: dict[str, Any], rejects_path, limit: int | None):
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of records (got {limit})")
    source = str(source)
    prompts = mode == "prompts"
    report = LoadReport(source=source, kind=mode or "pairs",
                        rejects_path=Path(rejects_path) if rejects_path is not None else None)
    kept: list = []
    kinds_seen: set[str] = set()
    sources = _sources(source, PROMPT_EXTENSIONS if prompts else PREFERENCE_EXTENSIONS)
    with _RejectsFile(report.rejects_path) as rejects:
        for label, open_items in sources:
            before = report.total
            try:
                kind = _load_file(open_items(), mode, columns, report, rejects, kept, limit)
            except (OSError, EOFError, zlib.error) as exc:
                raise DataError(f"{label}: cannot read it after {report.total - before} records ({exc})") from exc
            if report.total == before:
                raise DataError(f"{label}: empty file (no records)")
            if kind is not None:
                kinds_seen.add(kind)
            if limit is not None and report.kept >= limit:
                break
        if len(kinds_seen) > 1:
            raise DataError(f"{source}: mixes {' and '.join(sorted(kinds_seen))} files; load them separately")
        if kinds_seen:
            report.kind = kinds_seen.pop()
        if report.kept == 0:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in report.skipped.most_common(5))
            where = f"; see {report.rejects_path}" if report.rejects_path is not None else ""
            raise DataError(f"{source}: all {report.total} records were rejected ({reasons}); first: "
                            f"{rejects.first}{where}")
    return kept, report


def _load_file(items: Iterator[_Item], mode, columns, report: LoadReport, rejects: "_RejectsFile", kept: list,
               limit: int | None) -> str | None:
    """Parse one file's items into `kept`; return the kind detected (None when no record was an object)."""
    parse: Callable[[dict, str], Any] | None = None
    kind = None
    pending: list[_Item] = []     # items held back until the format is known, so the output keeps file order

    def settle(item: _Item) -> bool:
        report.total += 1
        try:
            if isinstance(item.value, _Skip):
                raise item.value
            if mode == "prompts" and isinstance(item.value, str):
                result = _text(item.value, "prompt")
            elif not isinstance(item.value, dict):
                raise _Skip("not an object")
            else:
                result = parse(item.value, item.origin)
        except _Skip as skip:
            report.skipped[skip.reason] += 1
            rejects.write(item, skip)
            return False
        kept.append(result)
        report.kept += 1
        return limit is not None and report.kept >= limit

    def detect_and_flush() -> bool:
        nonlocal parse, kind
        sample = [item for item in pending if isinstance(item.value, dict)]
        if sample:
            kind, parse = _detect(sample, mode, columns)
        for held in pending:
            if settle(held):
                return True
        pending.clear()
        return False

    dicts = 0
    for item in items:
        if parse is None:
            pending.append(item)
            dicts += isinstance(item.value, dict)
            # The buffer is bounded even when objects are rare (a file of mostly malformed lines).
            if dicts >= DETECT_SAMPLE or len(pending) >= 10 * DETECT_SAMPLE:
                dicts = 0
                if detect_and_flush():
                    return kind
            continue
        if settle(item):
            return kind
    if pending:
        detect_and_flush()
    return kind


class _RejectsFile:
    def __init__(self, path: Path | None):
        self.path = path
        self.handle = None
        self.first: str | None = None

    def __enter__(self):
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.handle = open(self.path, "w", encoding="utf-8")
            except OSError as exc:
                raise DataError(f"{self.path}: cannot write the rejects file ({exc})") from exc
        return self

    def __exit__(self, *exc_info):
        if self.handle is not None:
            self.handle.close()

    def write(self, item: _Item, skip: _Skip) -> None:
        if self.first is None:
            self.first = f"{item.origin} field {skip.field}: {skip.reason}" if skip.field else \
                f"{item.origin}: {skip.reason}"
        if self.handle is None:
            return
        raw = item.raw if item.raw is not None else _dump(item.value)
        if len(raw) > REJECT_CLIP:
            raw = raw[:REJECT_CLIP - 1] + "…"
        line = {"origin": item.origin, "reason": skip.reason, "field": skip.field, "record": _printable(raw)}
        text = json.dumps(line, ensure_ascii=False)
        # Readable UTF-8, but with the characters str.splitlines() and some editors break lines at escaped.
        for separator in ("\u2028", "\u2029", "\x85"):
            text = text.replace(separator, f"\\u{ord(separator):04x}")
        self.handle.write(text + "\n")


def _dump(value: Any) -> str:
    if isinstance(value, _Skip):
        return ""
    try:
        return json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):
        return "<record too deeply nested to print>"


def _printable(text: str) -> str:
    # Lone surrogates (from undecodable bytes or "\ud800" escapes) cannot be written as UTF-8: show them escaped.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Sources and readers. Each reader yields _Item(origin, value) with origin "file:line" (1-based) for line
# formats and "file#index" (0-based) for record formats.
# ---------------------------------------------------------------------------------------------------------------

def _extension(name: str) -> str:
    lower = name.lower()
    for double in (".jsonl.gz", ".json.gz"):
        if lower.endswith(double):
            return double
    return os.path.splitext(lower)[1]


def _sources(source: str, allowed: tuple[str, ...]) -> list[tuple[str, Callable[[], Iterator[_Item]]]]:
    path = Path(source)
    if path.is_dir():
        if _saved_dataset_kind(path):
            return [(source, partial(_saved_dataset_items, path, None, source))]
        files = sorted(child for child in path.iterdir() if child.is_file() and _extension(child.name) in allowed)
        if not files:
            raise DataError(f"{source}: directory holds no {'/'.join(allowed)} files")
        return [(str(file), partial(_file_items, str(file))) for file in files]
    if path.exists():
        if _extension(path.name) not in allowed:
            raise DataError(f"{source}: unsupported file type {_extension(path.name) or '(none)'!r}; "
                            f"expected one of {', '.join(allowed)}")
        return [(source, partial(_file_items, source))]
    head, sep, split = source.rpartition(":")
    if sep and head and Path(head).is_dir() and _saved_dataset_kind(Path(head)):
        return [(source, partial(_saved_dataset_items, Path(head), split, source))]
    if _looks_like_hub_id(source):
        name, _, split = source.partition(":")
        split = split or "train"
        label = f"{name}:{split}"
        dataset = _hub_dataset(source, name, split)
        return [(label, partial(_dataset_items, dataset, label))]
    raise DataError(f"{source}: no such file or directory")


def _file_items(path: str) -> Iterator[_Item]:
    extension = _extension(path)
    if extension in (".jsonl", ".jsonl.gz"):
        return _jsonl_items(path)
    if extension in (".json", ".json.gz"):
        return _json_items(path)
    if extension == ".csv":
        return _csv_items(path)
    if extension == ".parquet":
        return _parquet_items(path)
    return _txt_items(path)


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _binary_lines(handle) -> Iterator[tuple[int, bytes | None, bytes]]:
    """(line number, line or None when longer than MAX_TEXT, first bytes). Never holds a huge line in memory."""
    number = 0
    while True:
        line = handle.readline(MAX_TEXT + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_TEXT and not line.endswith(b"\n"):
            head = line[:REJECT_CLIP]
            while True:
                rest = handle.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None, head
        else:
            yield number, line, line


def _decoded_lines(path: str) -> Iterator[tuple[str, str | _Skip, str]]:
    """(origin, text or _Skip, raw) per non-blank line; a bad line costs only itself."""
    with _open_binary(path) as handle:
        for number, line, head in _binary_lines(handle):
            origin = f"{path}:{number}"
            if line is None:
                yield origin, _Skip("line too long"), head.decode("utf-8", "backslashreplace")
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                yield origin, _Skip("invalid utf-8"), repr(line)
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                yield origin, text, text


def _jsonl_items(path: str) -> Iterator[_Item]:
    for origin, text, raw in _decoded_lines(path):
        if isinstance(text, _Skip):
            yield _Item(origin, text, raw)
            continue
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = _Skip("malformed json")
        yield _Item(origin, value, raw)


def _txt_items(path: str) -> Iterator[_Item]:
    for origin, text, raw in _decoded_lines(path):
        yield _Item(origin, text.rstrip("\r\n") if isinstance(text, str) else text, raw)


def _json_items(path: str) -> Iterator[_Item]:
    with _open_binary(path) as handle:
        data = handle.read()
    # Undecodable bytes become lone surrogates here, so one bad string costs its record, not the whole file.
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as exc:
        if text.lstrip().startswith("["):
            where = f"line {exc.lineno}, column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) \
                else str(exc)
            raise DataError(f"{path}: malformed JSON array at {where}") from None
        yield from _jsonl_items(path)     # .json files often hold JSON lines
        return
    records = value if isinstance(value, list) else [value]
    for index, record in enumerate(records):
        yield _Item(f"{path}#{index}", record)


def _csv_items(path: str) -> Iterator[_Item]:
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(2 ** 31 - 1)  # the 128 KiB default would reject long but legitimate texts
    try:
        with _open_binary(path) as handle:
            lines = (raw.decode("utf-8", "surrogateescape") for raw in handle)
            reader = csv.reader(lines)
            header: list[str] | None = None
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error:
                    yield _Item(f"{path}:{start}", _Skip("malformed csv"), f"(unparsable CSV at line {start})")
                    continue
                if not row or not any(cell.strip() for cell in row):
                    continue
                if header is None:
                    header = [cell.strip() for cell in row]
                    header[0] = header[0].removeprefix("\ufeff")
                    continue
                raw = json.dumps(row, ensure_ascii=False)
                if len(row) != len(header):
                    yield _Item(f"{path}:{start}", _Skip("malformed csv"), raw)
                else:
                    yield _Item(f"{path}:{start}", dict(zip(header, row)), raw)
    finally:
        csv.field_size_limit(previous_limit)


def _parquet_items(path: str) -> Iterator[_Item]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError and friends for non-Parquet bytes
        raise DataError(f"{path}: cannot read it as Parquet ({exc})") from exc
    index = 0
    batches = parquet.iter_batches(batch_size=1024)
    while True:
        try:
            rows = next(batches).to_pylist()
        except StopIteration:
            return
        except Exception as exc:  # a corrupt page deep in the file
            raise DataError(f"{path}: cannot read it as Parquet after {index} records ({exc})") from exc
        for row in rows:
            yield _Item(f"{path}#{index}", row)
            index += 1


def _dataset_items(dataset, label: str) -> Iterator[_Item]:
    for index, row in enumerate(dataset):
        yield _Item(f"{label}#{index}", row)


def _saved_dataset_kind(path: Path) -> str | None:
    """'dataset' or 'dict' for a directory written by datasets' save_to_disk, else None."""
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def _saved_dataset_items(path: Path, split: str | None, label: str) -> Iterator[_Item]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            split = split or "train"
            if split not in dataset:
                raise DataError(f"{label}: no split {split!r} (has {', '.join(dataset)})")
            dataset = dataset[split]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{label}: cannot load the saved dataset ({exc})") from exc
    return _dataset_items(dataset, label)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.\-\[\]%:+]+)?")


def _looks_like_hub_id(source: str) -> bool:
    name = source.partition(":")[0]
    return bool(_HUB_ID.fullmatch(source)) and _extension(name) not in PROMPT_EXTENSIONS


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(proxy) for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing about a proxied route: let datasets try
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_dataset(source: str, name: str, split: str):
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE")
    # datasets retries an unreachable Hub for ~25 s; a 3 s probe turns that into a prompt, clear error.
    if not offline and not _hub_reachable():
        raise DataError(f"{source}: not a local file or directory, and the Hugging Face Hub is unreachable "
                        f"(set HF_HUB_OFFLINE=1 to use a cached copy)")
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        raise DataError(f"{source}: cannot load it as a Hugging Face dataset "
                        f"({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------------------------------------------
# Formats: detection from field names, then one parser per format
# ---------------------------------------------------------------------------------------------------------------

# name -> (kind, required fields), tried in this order.
_FORMATS = {
    "explicit": ("pairs", ("prompt", "chosen", "rejected")),
    "voted": ("pairs", ("prompt", "response_a", "response_b", "votes")),
    "implicit": ("pairs", ("chosen", "rejected")),
    "taskmaster": ("pointwise", ("context", "generation", "label")),
    "pointwise": ("pointwise", ("prompt", "response", "label")),
}
# What load_prompts takes the prompt from, in order of preference.
_PROMPT_FORMATS = {
    "prompt": ("prompts", ("prompt",)),
    "taskmaster": ("prompts", ("context",)),
    "implicit": ("prompts", ("chosen", "rejected")),
}


# What load_sft takes examples from, in order of preference; preference data gives its chosen side.
_SFT_FORMATS = {
    "messages": ("sft", ("messages",)),
    "completion": ("sft", ("prompt", "completion")),
    "text": ("sft", ("text",)),
    "explicit": ("sft", ("prompt", "chosen", "rejected")),
    "implicit": ("sft", ("chosen", "rejected")),
}
_FORMAT_NAMES = {"explicit": "pairs", "voted": "voted pairs", "implicit": "dialogue pairs",
                 "taskmaster": "Taskmaster ratings", "pointwise": "ratings", "prompt": "prompts",
                 "messages": "conversations", "completion": "prompt/completion", "text": "plain text"}


def _check_columns(columns: dict[str, Any] | None) -> dict[str, Any]:
    """Our field name -> the file's column name (votes -> a list of columns), defaults filled in.

    The key "_mapped" remembers which fields the caller mapped, so detection leaves those alone.
    """
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise DataError(f"columns: unknown field {', '.join(map(repr, unknown))}; known fields: {', '.join(FIELDS)}")
    resolved: dict[str, Any] = {name: name for name in FIELDS if name != "input"}  # input only when mapped
    resolved["votes"] = ["votes"]
    for name, value in columns.items():
        if name == "votes" and isinstance(value, (list, tuple)):
            parts = list(value)
        elif isinstance(value, str):
            parts = value.split(",") if name == "votes" else [value]
        else:
            parts = []
        names = [part.strip() for part in parts if isinstance(part, str)]
        if not names or len(names) != len(parts) or not all(names):
            raise DataError(f"columns: {name!r} must map to a column name (got {value!r})")
        resolved[name] = names if name == "votes" else names[0]
    resolved["_mapped"] = set(columns)
    return resolved


def _required_columns(fields: tuple[str, ...], columns: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for name in fields:
        names.extend(columns[name] if name == "votes" else [columns[name]])
    return names


def _detect(sample: list[_Item], mode: str | None, columns: dict[str, Any]) -> tuple[str, Callable]:
    """Pick the format from the field names of the first records (their union, so that one record with a
    missing field cannot mislead it), trying the formats in order."""
    columns = dict(columns)
    names: set[str] = set()
    for item in sample:
        names.update(item.value)
    if "label" not in columns["_mapped"] and "label" not in names and "reward" in names:
        columns["label"] = "reward"
    if mode in _MODE_FORMATS:
        candidates = _MODE_FORMATS[mode][0]
    else:
        candidates = {name: spec for name, spec in _FORMATS.items() if mode in (None, spec[0])}
    for name, (kind, fields) in candidates.items():
        # Without a prompt column, chosen/rejected hold whole dialogues; with one they are replies.
        if set(_required_columns(fields, columns)) <= names and (name != "implicit" or columns["prompt"] not in names):
            parser = (_MODE_FORMATS[mode][1] if mode in _MODE_FORMATS else _PARSERS)[name]
            return kind, partial(parser, columns=columns)
    expected = "; ".join(f"{'/'.join(_required_columns(fields, columns))} ({_FORMAT_NAMES[name]})"
                         for name, (_, fields) in candidates.items())
    raise DataError(f"{sample[0].origin}: cannot tell the format from the fields "
                    f"{', '.join(sorted(map(str, names))) or '(none)'}; expected {expected}; "
                    f"map other names with columns=")


# --- field helpers: each raises _Skip naming the file's column -------------------------------------------------

def _get(record: dict, column: str) -> Any:
    value = record.get(column)
    if value is None:  # JSON null and Parquet/HF null cells mean "no value", same as an absent key
        raise _Skip(f"missing field {column}", column)
    return value


def _text(value: Any, column: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Skip(f"wrong type {column}", column)
    if len(value) > MAX_TEXT:
        raise _Skip(f"too long {column}", column)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Skip(f"invalid utf-8 {column}", column) from None
    if not allow_empty and not value.strip():
        raise _Skip(f"empty {column}", column)
    return value


def _unzip_messages(value: Any) -> Any:
    """datasets' Sequence({"role", "content"}) feature yields {"role": [...], "content": [...]}: make it a list."""
    if isinstance(value, dict) and isinstance(value.get("role"), list) and isinstance(value.get("content"), list) \
            and len(value["role"]) == len(value["content"]):
        return [{"role": role, "content": content} for role, content in zip(value["role"], value["content"])]
    return value


def _messages(value: Any, column: str) -> list[dict]:
    value = _unzip_messages(value)
    if not isinstance(value, list):
        raise _Skip(f"wrong type {column}", column)
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise _Skip(f"bad message {column}", column)
        if message["role"] not in ROLES:
            raise _Skip(f"unknown role {column}", column)
        # extra keys (name, tool_calls: null from Parquet...) are dropped: templates get role and content only
        messages.append({"role": message["role"], "content": _text(message["content"], column, allow_empty=True)})
    if not any(message["content"].strip() for message in messages):
        raise _Skip(f"empty {column}", column)
    return messages


def _check_prompt_messages(messages: list[dict], column: str) -> list[dict]:
    # The reply is generated after the prompt: a prompt ending with an assistant turn would put two in a row.
    if messages[-1]["role"] == "assistant":
        raise _Skip(f"prompt ends with assistant {column}", column)
    return messages


def _prompt(record: dict, columns: dict[str, Any]) -> str | list[dict]:
    column = columns["prompt"]
    value = _unzip_messages(_get(record, column))
    if isinstance(value, list):
        prompt: str | list[dict] = _check_prompt_messages(_messages(value, column), column)
    else:
        prompt = _text(value, column, allow_empty="input" in columns)
    if "input" in columns and record.get(columns["input"]) is not None:
        extra = _text(record[columns["input"]], columns["input"], allow_empty=True)
        if extra.strip():
            if not isinstance(prompt, str):
                raise _Skip(f"wrong type {columns['input']}", columns["input"])  # cannot join text to messages
            prompt = f"{prompt}\n\n{extra}" if prompt.strip() else extra
    if isinstance(prompt, str) and not prompt.strip():
        raise _Skip(f"empty {column}", column)
    return prompt


def _reply(record: dict, column: str) -> str:
    value = _unzip_messages(_get(record, column))
    if isinstance(value, list):  # TRL conversational completion: [{"role": "assistant", "content": ...}]
        messages = _messages(value, column)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise _Skip(f"not an assistant reply {column}", column)
        value = messages[0]["content"]
    return _text(value, column)


def _distinct(chosen: str, rejected: str, columns: tuple[str, str]) -> None:
    if chosen.strip() == rejected.strip():
        raise _Skip("identical chosen and rejected", ",".join(columns))


def _label(value: Any, column: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "0.0", "1.0", "true", "false"):
        return 1.0 if value.strip().lower() in ("1", "1.0", "true") else 0.0
    raise _Skip(f"bad label {column}", column)


def _vote(value: Any, column: str) -> int:
    if not isinstance(value, bool):
        if isinstance(value, (int, float)) and value in (0, 1, 2):
            return int(value)
        if isinstance(value, str) and value.strip() in ("0", "1", "2"):
            return int(value.strip())
    raise _Skip(f"bad vote {column}", column)


def _strip_one_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


# --- parsers: (record, origin, columns) -> output, or raise _Skip ------------------------------------------------

def _parse_explicit(record: dict, origin: str, columns: dict[str, Any]) -> PreferencePair:
    prompt = _prompt(record, columns)
    chosen = _reply(record, columns["chosen"])
    rejected = _reply(record, columns["rejected"])
    _distinct(chosen, rejected, (columns["chosen"], columns["rejected"]))
    return PreferencePair(prompt, chosen, rejected, origin)


def _implicit_parts(record: dict, columns: dict[str, Any]) -> tuple[str | list[dict], str, str]:
    """Shared prompt and the two raw replies of chosen/rejected dialogues or conversations."""
    chosen_column, rejected_column = columns["chosen"], columns["rejected"]
    both = f"{chosen_column},{rejected_column}"
    chosen = _unzip_messages(_get(record, chosen_column))
    rejected = _unzip_messages(_get(record, rejected_column))
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen_messages = _messages(chosen, chosen_column)
        rejected_messages = _messages(rejected, rejected_column)
        for messages, column in ((chosen_messages, chosen_column), (rejected_messages, rejected_column)):
            if messages[-1]["role"] != "assistant":
                raise _Skip(f"not an assistant reply {column}", column)
        prompt = chosen_messages[:-1]
        if not prompt or prompt != rejected_messages[:-1] or not any(m["content"].strip() for m in prompt):
            raise _Skip("no shared prompt", both)
        _check_prompt_messages(prompt, chosen_column)
        return prompt, chosen_messages[-1]["content"], rejected_messages[-1]["content"]
    chosen, rejected = _text(chosen, chosen_column), _text(rejected, rejected_column)
    # HH-RLHF: the dialogues agree up to the final reply. Cutting the common prefix back to the last
    # "\n\nAssistant:" stays right when a reply itself contains "Human:" or "Assistant:".
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Skip("no shared prompt", both)
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], _strip_one_space(chosen[end:]), _strip_one_space(rejected[end:])


def _parse_implicit(record: dict, origin: str, columns: dict[str, Any]) -> PreferencePair:
    prompt, chosen, rejected = _implicit_parts(record, columns)
    chosen = _text(chosen, columns["chosen"])
    rejected = _text(rejected, columns["rejected"])
    _distinct(chosen, rejected, (columns["chosen"], columns["rejected"]))
    return PreferencePair(prompt, chosen, rejected, origin)


def _parse_voted(record: dict, origin: str, columns: dict[str, Any]) -> PreferencePair:
    votes: list[int] = []
    for column in columns["votes"]:
        value = _get(record, column)
        votes.extend(_vote(item, column) for item in (value if isinstance(value, list) else [value]))
    counts = collections.Counter(votes)
    winner = next((side for side in (1, 2) if counts[side] * 2 > len(votes)), None)
    if winner is None:  # a majority for "tie" (0) or no majority at all
        raise _Skip("tie", ",".join(columns["votes"]))
    prompt = _prompt(record, columns)
    first = _reply(record, columns["response_a"])
    second = _reply(record, columns["response_b"])
    _distinct(first, second, (columns["response_a"], columns["response_b"]))
    chosen, rejected = (first, second) if winner == 1 else (second, first)
    return PreferencePair(prompt, chosen, rejected, origin)


def _parse_pointwise(record: dict, origin: str, columns: dict[str, Any]) -> RatedResponse:
    prompt = _prompt(record, columns)
    response = _reply(record, columns["response"])
    label = _label(_get(record, columns["label"]), columns["label"])
    return RatedResponse(prompt, response, label, origin)


def _json_field(value: Any, column: str) -> Any:
    """Taskmaster stores turns as JSON text; decoded lists/dicts are accepted too."""
    if isinstance(value, str):
        try:
            return json.loads(_text(value, column))
        except (ValueError, RecursionError):
            raise _Skip(f"malformed json {column}", column) from None
    return value


def _compact(value: Any, column: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        raise _Skip(f"bad turn {column}", column) from None


def _turn_line(turn: Any, column: str) -> str:
    """One Taskmaster turn as a dialogue line: 'User: ...', 'Agent: ...', 'API call: {...}', 'API result: {...}'."""
    if not isinstance(turn, dict):
        raise _Skip(f"bad turn {column}", column)
    role = turn.get("role")
    text = turn.get("text")
    if text is not None and not isinstance(text, str):
        raise _Skip(f"bad turn {column}", column)
    if role == "user" and text is not None:
        return f"User: {text}"
    if role == "agent" and text is not None:
        return f"Agent: {text}"
    if role == "agent" and turn.get("api") is not None:
        return f"API call: {_compact(turn['api'], column)}"
    if role == "api" and turn.get("response") is not None:
        return f"API result: {_compact(turn['response'], column)}"
    if isinstance(role, str) and role not in ("user", "agent", "api"):
        raise _Skip(f"unknown role {column}", column)
    raise _Skip(f"bad turn {column}", column)


def _taskmaster_prompt(record: dict, columns: dict[str, Any]) -> str:
    column = columns["context"]
    turns = _json_field(_get(record, column), column)
    if not isinstance(turns, list):
        raise _Skip(f"wrong type {column}", column)
    if not turns:  # a reply rated without the conversation it answers (6 such records in Taskmaster coffee)
        raise _Skip(f"empty {column}", column)
    return _text("\n".join([_turn_line(turn, column) for turn in turns] + ["Agent:"]), column)


def _parse_taskmaster(record: dict, origin: str, columns: dict[str, Any]) -> RatedResponse:
    prompt = _taskmaster_prompt(record, columns)
    column = columns["generation"]
    turn = _json_field(_get(record, column), column)
    if not isinstance(turn, dict) or turn.get("role") != "agent":
        raise _Skip(f"bad turn {column}", column)
    if turn.get("text") is not None:
        response = turn["text"]
    elif turn.get("api") is not None:
        response = f"API call: {_compact(turn['api'], column)}"
    else:
        raise _Skip(f"bad turn {column}", column)
    response = _text(response, column)
    label = _label(_get(record, columns["label"]), columns["label"])
    return RatedResponse(prompt, response, label, origin)


_PARSERS: dict[str, Callable] = {
    "explicit": _parse_explicit,
    "voted": _parse_voted,
    "implicit": _parse_implicit,
    "taskmaster": _parse_taskmaster,
    "pointwise": _parse_pointwise,
}
_PROMPT_PARSERS: dict[str, Callable] = {
    "prompt": lambda record, origin, columns: _prompt(record, columns),
    "taskmaster": lambda record, origin, columns: _taskmaster_prompt(record, columns),
    "implicit": lambda record, origin, columns: _implicit_parts(record, columns)[0],
}


def _prompt_key(record: Any) -> str:
    prompt = getattr(record, "prompt", record)
    if isinstance(prompt, str):
        return prompt
    try:
        return json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        return repr(prompt)


def _sft_conversation(record: dict, origin: str, columns: dict[str, Any]) -> SFTExample:
    column = columns["messages"]
    messages = _messages(_get(record, column), column)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _Skip(f"no assistant turn {column}", column)
    return SFTExample("", "", origin, messages)


def _sft_completion(record: dict, origin: str, columns: dict[str, Any]) -> SFTExample:
    return SFTExample(_prompt(record, columns), _reply(record, columns["completion"]), origin)


def _sft_chosen(parse: Callable) -> Callable:
    def chosen_side(record: dict, origin: str, columns: dict[str, Any]) -> SFTExample:
        pair = parse(record, origin, columns)
        return SFTExample(pair.prompt, pair.chosen, origin)
    return chosen_side


_SFT_PARSERS: dict[str, Callable] = {
    "messages": _sft_conversation,
    "completion": _sft_completion,
    "text": lambda record, origin, columns: SFTExample("", _text(_get(record, columns["text"]), columns["text"]),
                                                       origin),
    "explicit": _sft_chosen(_parse_explicit),
    "implicit": _sft_chosen(_parse_implicit),
}
_MODE_FORMATS = {"prompts": (_PROMPT_FORMATS, _PROMPT_PARSERS), "sft": (_SFT_FORMATS, _SFT_PARSERS)}
