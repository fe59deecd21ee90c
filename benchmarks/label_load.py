"""Load test of the labelling server: many labellers answering at once against a real uvicorn on 127.0.0.1.

Each simulated labeller signs in with their link (opens it, presses the button: a session cookie), fetches the
CSRF token, then answers pairs as fast as the server lets them, through the same JSON API the page uses.
Afterwards the database is checked: every acknowledged answer is there exactly once, nobody answered a pair
twice, no pair has more than K answers.

    python benchmarks/label_load.py --labellers 50 --answers 20 --labels-per-pair 2
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perlhf.label.server import serving  # noqa: E402
from perlhf.label.store import LabelStore, Response  # noqa: E402

CHOICES = ("left", "right", "tie", "both_bad")


async def labeller(base_url: str, link: str, answers: int, seed: int, latencies: list[float]) -> int:
    """Sign in with a link code and answer `answers` pairs; returns how many answers the server acknowledged."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, follow_redirects=True) as client:
        (await client.get("/signin", params={"invite": link})).raise_for_status()
        (await client.post("/signin", data={"invite": link})).raise_for_status()
        csrf = (await client.get("/api/me")).json()["csrf"]
        state = (await client.post("/api/next", json={}, headers={"X-CSRF-Token": csrf})).json()
        done = 0
        while done < answers and state["pair"] is not None:
            started = time.perf_counter()
            response = await client.post("/api/answer", headers={"X-CSRF-Token": csrf}, json={
                "pair_id": state["pair"]["id"], "choice": rng.choice(CHOICES), "comment": f"load test {seed}"})
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            state = response.json()
            done += 1
        return done


def check_database(db: Path, labels_per_pair: int) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        live = "FROM answers WHERE undone_at IS NULL"
        return {
            "rows": con.execute(f"SELECT count(*) {live}").fetchone()[0],
            "duplicates": con.execute(f"SELECT count(*) FROM (SELECT 1 {live} GROUP BY pair_id, labeller_id "
                                      "HAVING count(*) > 1)").fetchone()[0],
            "over_k": con.execute(f"SELECT count(*) FROM (SELECT 1 {live} GROUP BY pair_id "
                                  "HAVING count(*) > ?)", (labels_per_pair,)).fetchone()[0],
        }
    finally:
        con.close()


def run_load(labellers: int = 50, answers: int = 20, labels_per_pair: int = 2, timeout: float = 300.0,
             workdir: str | Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(workdir or tmp) / "load.db"
        store, _ = LabelStore.open(db, create=True, durable=False)  # filling only; the server is durable
        # Enough places for everyone's answers plus one held (served, unanswered) pair per labeller.
        pairs = -(-labellers * answers // labels_per_pair) + labellers
        for i in range(pairs):
            store.add_pair(f"prompt {i}", Response(f"response a {i}", "load"), Response(f"response b {i}", "load"),
                           labels_wanted=labels_per_pair)
        for i in range(labellers):
            store.add_labeller(f"labeller{i}")
        links = [store.invite(f"labeller{i}") for i in range(labellers)]
        latencies: list[float] = []
        with serving(db, stop_after=timeout + 30) as url:
            async def everyone() -> list[int]:
                jobs = [labeller(url, link, answers, i, latencies) for i, link in enumerate(links)]
                return await asyncio.wait_for(asyncio.gather(*jobs), timeout)

            started = time.perf_counter()
            acknowledged = asyncio.run(everyone())
            elapsed = time.perf_counter() - started
        found = check_database(db, labels_per_pair)
        latencies.sort()
        return {
            "labellers": labellers, "answers_each": answers, "labels_per_pair": labels_per_pair, "pairs": pairs,
            "acknowledged": sum(acknowledged), "expected": labellers * answers, "seconds": elapsed,
            "answers_per_second": sum(acknowledged) / elapsed,
            "latency_ms_p50": 1000 * statistics.median(latencies),
            "latency_ms_p95": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
            "db_rows": found["rows"], "duplicates": found["duplicates"], "pairs_over_k": found["over_k"],
            "lost": sum(acknowledged) - found["rows"],
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labellers", type=int, default=50)
    parser.add_argument("--answers", type=int, default=20, help="answers per labeller")
    parser.add_argument("--labels-per-pair", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    args = parser.parse_args()
    result = run_load(args.labellers, args.answers, args.labels_per_pair, args.timeout)
    print(f"{result['labellers']} labellers x {result['answers_each']} answers (K={result['labels_per_pair']}, "
          f"{result['pairs']} pairs) in {result['seconds']:.2f} s: {result['answers_per_second']:.0f} answers/s, "
          f"latency p50 {result['latency_ms_p50']:.1f} ms, p95 {result['latency_ms_p95']:.1f} ms")
    print(f"acknowledged {result['acknowledged']}/{result['expected']}, rows in db {result['db_rows']}, "
          f"lost {result['lost']}, duplicates {result['duplicates']}, pairs over K {result['pairs_over_k']}")
    ok = (result["acknowledged"] == result["expected"] == result["db_rows"] and not result["duplicates"]
          and not result["pairs_over_k"])
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
