"""`diyllm prepare` at scale: end-to-end throughput vs raw tiktoken, peak memory, 1 vs 2 workers.

Builds a corpus from this machine's Python standard library (its .py files repeated, each copy a slightly
different document so dedup keeps them) as JSONL and as Parquet, then measures in the same run:

  * prepare's end-to-end MB/s (read, hash, dedup, split, encode, write shards + manifest) against raw
    tiktoken `encode_ordinary_batch` on the same texts (already in memory) with the same number of
    processes and the same ranks: the ratio is what prepare's own work costs (target >= 0.8x);
  * peak RSS of the prepare process and of its largest worker, at --mb and at 2x --mb (should be flat);
  * the speed-up from 1 to 2 workers;
  * the serial part (the main process reading and routing documents, no encoding), which bounds the
    speed-up on many cores, and from both a projection for FineWeb-Edu sample-10BT on 32 cores.

Numbers are ratios within one run; absolute figures depend on the machine and its load.

usage: python benchmarks/bench_prepare.py [--mb 200] [--workers 2] [--skip_parquet]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FINEWEB_EDU_10BT_BYTES = 10e9 * 4.5  # 10B GPT-2 tokens at ~4.5 bytes of English web text per token (assumed)


def build_corpus(folder: Path, mb: int) -> tuple[Path, list[str]]:
    """JSONL of standard-library sources repeated until `mb` MB; returns (path, texts)."""
    from diyllm.data.recipes import pystdlib_files

    sources = [Path(f).read_text(encoding="utf-8", errors="replace") for f in pystdlib_files()]
    texts, size, copy = [], 0, 0
    while size < mb * 1_000_000:
        for s in sources:
            t = f"# copy {copy}\n{s}"
            texts.append(t)
            size += len(t.encode())
            if size >= mb * 1_000_000:
                break
        copy += 1
    path = folder / f"corpus_{mb}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path, texts


def to_parquet(jsonl: Path, texts: list[str]) -> Path | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    path = jsonl.with_suffix(".parquet")
    pq.write_table(pa.table({"text": texts}), path, row_group_size=2000)
    return path


_ENC = None


def _init(tok_file: str) -> None:
    global _ENC
    from diyllm.tokenizers import load_tokenizer

    _ENC = load_tokenizer(tok_file).fast_encoding()


def _encode(batch: list[str]) -> int:
    return sum(len(ids) for ids in _ENC.encode_ordinary_batch(batch, num_threads=1))


def raw_tiktoken(texts: list[str], tok_file: str, workers: int) -> float:
    """Seconds for encode_ordinary_batch over all texts in `workers` processes (texts already in memory)."""
    batches, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= 1 << 20:
            batches.append(cur)
            cur, size = [], 0
    batches.append(cur)
    if workers <= 1:
        _init(tok_file)
        t0 = time.perf_counter()
        for b in batches:
            _encode(b)
        return time.perf_counter() - t0
    t0 = time.perf_counter()  # process start-up counts, as it does for prepare
    with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(tok_file,)) as pool:
        for _ in pool.imap(_encode, batches):
            pass
    return time.perf_counter() - t0


def run_prepare(src: Path, out: Path, tok_file: str, workers: int) -> tuple[float, int, int]:
    """(seconds, peak RSS KB of the prepare process, of its largest worker) for a prepare run in a subprocess."""
    code = (
        "import resource, sys, time\n"
        "from diyllm.data import prepare_dataset\n"
        "t0 = time.perf_counter()\n"
        f"prepare_dataset({str(src)!r}, {str(out)!r}, tokenizer={tok_file!r}, num_workers={workers}, verbose=False)\n"
        "dt = time.perf_counter() - t0\n"
        # VmHWM, not RUSAGE_SELF: Linux carries ru_maxrss across exec, so it would include this benchmark's
        # own memory at fork time (the corpus texts it holds)
        "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(dt, hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dt, main_kb, child_kb = r.stdout.split()
    return float(dt), int(main_kb), int(child_kb)


def serial_part(src: Path, tok_file: str) -> float:
    """Seconds the main process needs to read, hash and route every document into jobs (no encoding)."""
    from diyllm.data.documents import DocumentStream
    from diyllm.data.encode import iter_jobs
    from diyllm.tokenizers import load_tokenizer

    tok = load_tokenizer(tok_file)
    t0 = time.perf_counter()
    for _ in iter_jobs(iter(DocumentStream([src])), tok):
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB (the RSS check also runs 2x this)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab_size", type=int, default=4096)
    ap.add_argument("--skip_parquet", action="store_true")
    args = ap.parse_args()
    from diyllm.data import prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, texts = build_corpus(tmp, args.mb)
        mb = src.stat().st_size / 1e6
        text_mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"corpus: {len(texts):,} documents, {text_mb:.0f} MB of text ({mb:.0f} MB as JSONL); "
              f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        small = tmp / "sample.txt"
        small.write_text("".join(texts[:2000]))
        prepare_dataset(small, tmp / "tok", vocab_size=args.vocab_size, verbose=False)
        tok_file = str(tmp / "tok" / "tokenizer.json")

        print("\n== throughput (MB of text per second) ==")
        rows = {}
        for w in sorted({1, args.workers}):
            raw = raw_tiktoken(texts, tok_file, w)
            dt, main_kb, child_kb = run_prepare(src, tmp / f"out_jsonl_{w}", tok_file, w)
            rows[w] = dt
            print(f"workers={w}: raw tiktoken {text_mb / raw:7.1f} MB/s | prepare JSONL {text_mb / dt:7.1f} MB/s "
                  f"= {raw / dt:.2f}x raw | peak RSS main {main_kb / 1024:.0f} MB, largest worker "
                  f"{child_kb / 1024:.0f} MB")
            if not args.skip_parquet and w == args.workers:
                pq_path = to_parquet(src, texts)
                if pq_path is not None:
                    dtp, main_kb, _ = run_prepare(pq_path, tmp / f"out_pq_{w}", tok_file, w)
                    print(f"workers={w}: prepare Parquet {text_mb / dtp:7.1f} MB/s = {raw / dtp:.2f}x raw | "
                          f"peak RSS main {main_kb / 1024:.0f} MB")
                    pq_path.unlink()
            same = all((tmp / "out_jsonl_1" / p.name).read_bytes() == p.read_bytes()
                       for p in (tmp / f"out_jsonl_{w}").glob("*_*.bin"))
            print(f"           shards identical to workers=1: {same}")
        if args.workers > 1:
            print(f"speed-up 1 -> {args.workers} workers: {rows[1] / rows[args.workers]:.2f}x")

        serial = serial_part(src, tok_file)
        per_worker = text_mb / rows[1]
        print("\n== projection: FineWeb-Edu sample-10BT (~45 GB of text assumed) on 32 cores ==")
        print(f"serial part (read + hash + route, main process): {text_mb / serial:.0f} MB/s")
        rate = min(31 * per_worker, text_mb / serial)  # 31 encoding workers + the main process
        print(f"encoding alone at {per_worker:.1f} MB/s per worker x 31 = {31 * per_worker:.0f} MB/s; "
              f"bounded by the serial part: {rate:.0f} MB/s -> {FINEWEB_EDU_10BT_BYTES / 1e6 / rate / 60:.1f} min "
              "(reading JSONL from the page cache; Parquet decompression and disk reads come on top)")

        del texts
        print("\n== peak RSS at 2x the corpus (should be flat) ==")
        src2, texts2 = build_corpus(tmp, 2 * args.mb)
        del texts2
        _, main2, child2 = run_prepare(src2, tmp / "out_2x", tok_file, args.workers)
        print(f"{2 * args.mb} MB: peak RSS main {main2 / 1024:.0f} MB, largest worker {child2 / 1024:.0f} MB")


if __name__ == "__main__":
    main()
