"""The labelling server for real: uvicorn on 127.0.0.1, many concurrent labellers, nothing lost or duplicated."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import httpx

from perlhf.label.server import serving
from perlhf.label.store import LabelStore

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("label_load", ROOT / "benchmarks" / "label_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concurrent_labellers_lose_and_duplicate_nothing(tmp_path):
    result = load_benchmark().run_load(labellers=12, answers=6, labels_per_pair=2, timeout=60, workdir=tmp_path)
    assert result["acknowledged"] == result["expected"] == result["db_rows"] == 72
    assert result["duplicates"] == 0 and result["pairs_over_k"] == 0 and result["lost"] == 0
    assert result["answers_per_second"] > 0


def test_served_over_http_with_tokens_and_stops_by_itself(tmp_path):
    db = tmp_path / "l.db"
    store, _ = LabelStore.open(db, create=True)
    store.add_labeller("ann")
    link = store.invite("ann")
    with serving(db, stop_after=60) as url:
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/api/me", timeout=10).status_code == 401
        signed = httpx.post(f"{url}/signin", data={"invite": link}, timeout=10)
        assert signed.status_code == 303 and "httponly" in signed.headers["set-cookie"].lower()
    command = [sys.executable, "-m", "perlhf.label", "serve", "--db", str(db), "--port", "0", "--stop-after", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "http://127.0.0.1:" in done.stdout
