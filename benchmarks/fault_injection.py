"""Fault injection: SIGKILL training runs at random moments and check what survives.

    python benchmarks/fault_injection.py                 # 100 kills of a tiny training run
    python benchmarks/fault_injection.py --kills 20 --json out.json

A training run is killed with SIGKILL either at a random moment or the instant a checkpoint temp file
appears (a kill *during* a checkpoint write); what survived is inspected, the run is resumed from it
(`init_from=resume`, or a fresh start when nothing was saved yet) and killed again, until it completes:

* loadable: every checkpoint left after a kill reads and passes its checksum;
* resumed-exact: the completed run's final weights are bit-identical to one uninterrupted run's (an
  inexact resume anywhere in the chain would change every later step);
* leftovers: temp files the kills left (each resume removes them) and any still there at the end.

Kills of `diyllm prepare` are measured by the data engineer's own suite; this script covers training.
Runs are forked from this process (imports paid once); this process itself never runs a torch op, so
the forked children start with a clean thread pool. POSIX only. Timings on a shared CPU are noisy; the
figures that matter are the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUN = dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, context_length=32, batch_size=4, max_iters=16,
           warmup_iters=2, eval_interval=8, eval_iters=1, checkpoint_interval=2, log_interval=100, progress=False,
           device="cpu", dtype="float32", keep_checkpoints=2)


def _in_child(fn, *args, quiet: bool = True, **kwargs) -> int:
    """Fork; run fn(*args, **kwargs) in the child (stdout/stderr silenced); return the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        fn(*args, **kwargs)
    except BaseException:  # report, never return into the parent's code
        traceback.print_exc()
        code = 1
    os._exit(code)


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _train(data: str, out: str, **kw) -> None:
    from diyllm.training.config import TrainConfig
    from diyllm.training.trainer import train

    train(TrainConfig(data_dir=data, out_dir=out, **{**RUN, **kw}).validate())


def _inspect(out: str, report: str) -> None:
    """Child: read every checkpoint of `out` (checksums verified); digest of latest.pt's weights."""
    from diyllm.integrity import state_digest
    from diyllm.training.checkpoint import read_checkpoint

    result = {"checkpoints": {}, "final": None}
    for path in sorted(Path(out).glob("*.pt")):
        try:
            state = read_checkpoint(path)
            result["checkpoints"][path.name] = {"ok": True, "iteration": int(state["iteration"])}
            if path.name == "latest.pt":
                result["final"] = {"iteration": int(state["iteration"]), "model": state_digest({"m": state["model"]})}
        except Exception as exc:  # noqa: BLE001 - report any failure
            result["checkpoints"][path.name] = {"ok": False, "error": str(exc)[:300]}
    Path(report).write_text(json.dumps(result))


def _prepare(root: Path) -> None:
    from diyllm.data.prepare import prepare_dataset

    corpus = root / "corpus.txt"
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "away", "home"]
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500)))
    prepare_dataset([corpus], root / "data", tokenizer_kind="char", val_fraction=0.1, verbose=False)


def _temps(out: Path, checkpoints_only: bool = False) -> list[str]:
    """Temp files of interrupted atomic writes in `out` (only checkpoints': `.NAME.pt.XXXX.tmp`)."""
    try:
        return sorted(n for n in os.listdir(out) if n.endswith(".tmp") and (not checkpoints_only or ".pt." in n))
    except FileNotFoundError:
        return []


def _inspect_now(out: Path, root: Path) -> dict:
    report = root / "report.json"
    report.unlink(missing_ok=True)
    if _wait(_in_child(_inspect, str(out), str(report))) != 0:
        raise RuntimeError("inspecting checkpoints failed")
    return json.loads(report.read_text())


def _kill_at_random(pid: int, out: Path, rng: random.Random, run_time: float, during_write: bool) -> bool:
    """SIGKILL `pid` after a random delay, or the instant its k-th checkpoint write (k >= 2, so that the
    segment made progress) has begun. Returns False when the run finished before it could be killed."""
    kth_write, writes_seen = rng.randint(2, 4), set()
    deadline = time.perf_counter() + (rng.uniform(0.1, 0.6) * run_time if not during_write else 5 * run_time)
    while time.perf_counter() < deadline:
        if during_write:
            writes_seen.update(_temps(out, checkpoints_only=True))
            if len(writes_seen) >= kth_write:
                time.sleep(rng.uniform(0, 0.002))
                break
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return True


def campaign(kills: int, seed: int = 0, root: Path | None = None, log=print) -> dict:
    """Kill training runs `kills` times; return the counts (see the module docstring).

    Kills are chained: a killed run is resumed from what survived, killed again, and so on until it
    completes; its final weights must then equal the uninterrupted run's. A resume that was not exact
    would change every later step, so one comparison per chain checks every resume in it.
    """
    rng = random.Random(seed)
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="diyllm_faults_")) if own_root else Path(root)
    try:
        import torch._dynamo  # noqa: F401 - the optimizer imports it lazily (seconds); pay that once here

        import diyllm.training.trainer  # noqa: F401 - imported once here, inherited by every forked run

        if _wait(_in_child(_prepare, root)) != 0:
            raise RuntimeError("preparing the dataset failed")
        data = str(root / "data")
        ref = root / "ref"
        t0 = time.perf_counter()
        if _wait(_in_child(_train, data, str(ref))) != 0:
            raise RuntimeError("the uninterrupted reference run failed")
        run_time = time.perf_counter() - t0
        expected = _inspect_now(ref, root)["final"]
        stats = {"kills": 0, "during_checkpoint_write": 0, "checkpoints_left": 0, "loadable": 0, "resumes": 0,
                 "runs": 0, "runs_exact": 0, "temp_files_after_kill": 0, "leftovers_after_completion": 0,
                 "failures": [], "reference_run_s": round(run_time, 2)}
        chain = 0
        while stats["kills"] < kills:
            out = root / f"run{chain}"
            chain += 1
            while True:  # kill, inspect, resume ... until this run completes
                seen = _inspect_now(out, root)["checkpoints"] if out.exists() else {}
                resumable = any(n in seen for n in ("latest.pt", "previous.pt"))
                kw = {"init_from": "resume"} if resumable else {"overwrite": True}
                stats["resumes"] += resumable
                pid = _in_child(_train, data, str(out), **kw)
                if stats["kills"] >= kills:
                    if _wait(pid) != 0:
                        stats["failures"].append({"run": chain, "completion": "failed"})
                    break
                during_write = stats["kills"] % 2 == 1  # every other kill lands in a checkpoint write
                if not _kill_at_random(pid, out, rng, run_time, during_write):
                    break  # it finished first
                wrote = bool(_temps(out, checkpoints_only=True))
                stats["kills"] += 1
                stats["during_checkpoint_write"] += wrote
                stats["temp_files_after_kill"] += len(_temps(out))
                seen = _inspect_now(out, root)["checkpoints"] if out.exists() else {}
                stats["checkpoints_left"] += len(seen)
                stats["loadable"] += sum(c["ok"] for c in seen.values())
                bad = {n: c for n, c in seen.items() if not c["ok"]}
                if bad:
                    stats["failures"].append({"kill": stats["kills"], "unloadable": bad})
                left_now = ", ".join(f"{n} (iteration {c.get('iteration')})" for n, c in seen.items()) or "none"
                log(f"kill {stats['kills']}/{kills}: {'during a checkpoint write' if wrote else 'between writes'}, "
                    f"checkpoints left: {left_now}")
            final = _inspect_now(out, root)["final"]
            stats["runs"] += 1
            if final == expected:
                stats["runs_exact"] += 1
            else:
                stats["failures"].append({"run": chain, "final": final, "expected": expected})
            left = _temps(out) + ([".diyllm.lock"] if (out / ".diyllm.lock").exists() else [])
            stats["leftovers_after_completion"] += len(left)
            log(f"run {chain} completed with {'the same' if final == expected else 'DIFFERENT'} final weights "
                f"as the uninterrupted run; leftovers: {left or 'none'}")
            shutil.rmtree(out, ignore_errors=True)
        return stats
    finally:
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the counts to this JSON file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    stats = campaign(args.kills, args.seed, log=(lambda *_: None) if args.quiet else print)
    print(f"kills {stats['kills']} (during a checkpoint write {stats['during_checkpoint_write']}); checkpoints "
          f"left {stats['checkpoints_left']}, loadable {stats['loadable']}; resumes {stats['resumes']}; runs "
          f"completed {stats['runs']}, resumed-exact {stats['runs_exact']}; temp files after kills "
          f"{stats['temp_files_after_kill']}, leftovers after completion {stats['leftovers_after_completion']}")
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1))
    return 0 if not stats["failures"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
