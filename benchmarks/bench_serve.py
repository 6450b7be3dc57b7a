"""`diyllm serve` under load: 1, 4 and 16 concurrent streaming clients vs sequential `diyllm sample` calls.

    python benchmarks/bench_serve.py                    # small CPU shape, 128 new tokens per request
    python benchmarks/bench_serve.py --new 64 --clients 1 4 16 --shape tiny --threads 1

A random model of the chosen shape (byte-level BPE vocabulary, so any text is a prompt) is saved to a
temporary checkpoint and served on a free loopback port. For each client count N, N threads each send one
streaming /v1/completions request at the same moment (greedy, ignore_eos, exactly --new tokens) and
read the SSE stream with plain http.client. Reported per N:
  * TTFT: time to the first content chunk (median and worst over the clients),
  * tokens/s per client (its tokens / its wall time) and aggregate tokens/s (all tokens / round's wall),
  * requests/s of the round.
The peer is the same work done one request at a time by `diyllm sample` (a process per call: its load
time is part of what a script calling it pays; its own decode figure is printed too).
Target: aggregate tokens/s at 16 clients >= 4x that of 1 client (rows share one decode batch).
On a shared CPU the figures are noisy; rerun and compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, d_ff=172),
    "small": dict(d_model=128, num_layers=4, num_heads=4, d_ff=344),
}


def make_checkpoint(folder: Path, shape: str) -> Path:
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.tokenizers import BPETokenizer
    from diyllm.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    tok.save(folder / "tok.json")
    model = DIYForCausalLM(DIYConfig(vocab_size=257, context_length=512, **SHAPES[shape]))
    path = folder / "model.pt"
    save_checkpoint(model, None, 0, path, model_config=model.config.to_dict(),
                    tokenizer=(folder / "tok.json").read_text())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_client(port: int, prompt: str, new: int, out: dict) -> None:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    first, tokens = None, 0
    while True:
        line = r.readline()
        if not line or line.strip() == b"data: [DONE]":
            break
        if line.startswith(b"data: "):
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter()
    conn.close()
    end = time.perf_counter()
    out.update(ttft=(first or end) - start, seconds=end - start, tokens=tokens)


def round_of(port: int, clients: int, new: int) -> dict:
    results = [dict() for _ in range(clients)]
    threads = [threading.Thread(target=one_client, args=(port, f"Request number {i} says", new, results[i]))
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "wall": wall, "aggregate": total / wall, "requests_per_s": clients / wall,
            "per_client": statistics.median(r["tokens"] / r["seconds"] for r in results),
            "ttft_median": statistics.median(r["ttft"] for r in results), "ttft_max": max(r["ttft"] for r in results)}


def sequential_sample(ckpt: Path, calls: int, new: int, env: dict) -> tuple[float, float]:
    """(tokens/s over the wall time of `calls` sequential `diyllm sample` processes, their own decode tok/s)."""
    start = time.perf_counter()
    own = []
    for i in range(calls):
        p = subprocess.run([sys.executable, "-m", "diyllm", "sample", "--ckpt", str(ckpt), "--prompt",
                            f"Request number {i} says", "--temperature", "0", "--max_new_tokens", str(new),
                            "--device", "cpu"], capture_output=True, text=True, env=env, check=True)
        m = re.search(r"([\d.]+) tokens/s", p.stderr)
        own.append(float(m.group(1)) if m else float("nan"))
    return calls * new / (time.perf_counter() - start), statistics.median(own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--new", type=int, default=128, help="new tokens per request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sample-calls", type=int, default=3, help="sequential `diyllm sample` calls (peer)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the server and the sample calls (default: torch's choice); on a "
                        "busy machine 1 avoids threads waiting on each other")
    parser.add_argument("--serve-args", default="",
                        help='extra `diyllm serve` options, e.g. "--compile --quantize w8a8"')
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp), args.shape)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "diyllm", "serve", "--ckpt", str(ckpt), "--port", str(port),
                                   "--max-concurrency", str(max(args.clients)), *shlex.split(args.serve_args)],
                                  env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(600):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            round_of(port, 1, 8)  # warm-up
            rows = [round_of(port, n, args.new) for n in args.clients]
        finally:
            server.terminate()
            server.wait(timeout=30)
        seq, own = sequential_sample(ckpt, args.sample_calls, args.new, env)
    base = rows[0]["aggregate"]
    threads = args.threads or torch.get_num_threads()
    print(f"shape {args.shape}, {args.new} new tokens per request, {threads} thread(s) per process"
          + (f", serve {args.serve_args}" if args.serve_args else ""))
    print(f"{'clients':>7} {'agg tok/s':>10} {'vs 1':>6} {'tok/s/client':>13} {'req/s':>6} {'TTFT med':>9} "
          f"{'TTFT max':>9}")
    for r in rows:
        print(f"{r['clients']:>7} {r['aggregate']:>10.1f} {r['aggregate'] / base:>5.2f}x {r['per_client']:>13.1f} "
              f"{r['requests_per_s']:>6.2f} {r['ttft_median'] * 1000:>7.0f}ms {r['ttft_max'] * 1000:>7.0f}ms")
    print(f"sequential `diyllm sample` calls: {seq:.1f} tok/s over their wall time (process start + load included; "
          f"their own decode figure {own:.1f} tok/s)")
    best = max(rows, key=lambda r: r["clients"])
    print(f"{best['clients']} clients vs 1: {best['aggregate'] / base:.2f}x aggregate tokens/s (target >= 4x); "
          f"vs sequential sample calls: {best['aggregate'] / seq:.2f}x")


if __name__ == "__main__":
    main()
