"""Every ```bash command in README.md and docs/*.md runs, in order, as a reader would type it.

The commands run in one scratch folder shared by the whole session (data prepared by an early command
is reused by later ones), with DIYLLM_TINY=1 (demo, sweep and lr-find shrink themselves) and with small
settings appended to the commands that take them (train: a 1-layer model for 6 steps; prepare: 150 kB
of text; sample: 8 tokens). Blocks fenced as ```text, ```bash-gpu or ```console are not run: use them
for GPU / multi-node / download commands. The few ```bash commands that must not run inside the test
suite (installing, running the suite itself, long benchmarks) are listed in NOT_RUN with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diyllm.lab.common import TINY_ENV, TINY_MAX_BYTES, TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIYLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
# (pattern matched against the command, why it is not run here)
NOT_RUN = [
    (r"^bash scripts/install\.sh", "installs packages; the test suite runs on an installed checkout"),
    (r"^(TORCH_INDEX_URL=\S+ )?bash scripts/install\.sh", "installs packages"),
    (r"^pip install", "installs packages"),
    (r"^python -m pytest|^pytest", "runs the test suite itself"),
    (r"^python benchmarks/", "benchmarks take minutes; run them by hand"),
    (r"^ruff ", "lint, run separately"),
]
# Appended to a command (unless it already sets the option) in tiny mode.
EXTRA_ARGS = {
    "prepare": [f"--max_bytes={TINY_MAX_BYTES}"],
    "train": TINY_OVERRIDES,
    "sft": TINY_OVERRIDES,
    "sample": ["--max_new_tokens=8"],
    "overfit": ["--steps=30"],
    "lab": ["--quick"],
}
FORCED = {"train", "sft", "sample", "overfit"}  # tiny settings win over the command's own (--max_iters=500 -> 6)
# ...except these, which a command sets for a reason (SFT conversations need their context length).
KEPT = {"--context_length"}
COMMAND_TIMEOUT_S = 240


def doc_files() -> list[Path]:
    """README first, then the curriculum (it builds the data/runs later pages use), then the rest."""
    docs = sorted((REPO / "docs").glob("*.md"))
    first = [REPO / "README.md", REPO / "docs" / "curriculum.md"]
    return [p for p in first if p.is_file()] + [p for p in docs if p not in first]


def bash_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks: comments dropped, backslash continuations joined."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang != "bash":
            continue
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def not_run_reason(command: str) -> str | None:
    return next((why for pat, why in NOT_RUN if re.search(pat, command)), None)


def strip_comment(command: str) -> str:
    """The command without a trailing `# comment` (a # inside quotes or a word is kept)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command.rstrip()


def tiny_command(command: str) -> str:
    """The command as written (shell globs and quotes intact) without its trailing comment, plus the
    small settings for its subcommand."""
    command = strip_comment(command)
    words = shlex.split(command)
    i = 0
    while i < len(words) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[i]):
        i += 1  # leading VAR=value assignments
    prog = words[i:]
    sub = None
    if prog[:1] == ["diyllm"] and len(prog) > 1:
        sub = prog[1]
    else:  # python -m diyllm SUB ..., torchrun ... -m diyllm SUB ...
        j = next((k for k in range(1, len(prog) - 1) if prog[k - 1] == "-m" and prog[k] == "diyllm"), None)
        sub = prog[j + 1] if j is not None else None
    extra = []
    for arg in EXTRA_ARGS.get(sub, []):
        if prog[:1] == ["torchrun"] and arg.startswith("--gradient_accumulation_steps"):
            continue  # must stay divisible by the number of processes the command starts
        key = arg.split("=", 1)[0]
        given = any(w == key or w.startswith(key + "=") for w in words)
        if not given or (sub in FORCED and key not in KEPT):
            extra.append(arg)
    return " ".join([command, *map(shlex.quote, extra)])


def test_parsing_helpers():
    text = "x\n```bash\ndiyllm train cfg \\\n  --max_iters=5   # comment\n# only a comment\n```\n```text\nno\n```\n"
    assert bash_commands(text) == ["diyllm train cfg    --max_iters=5   # comment"]
    cmd = tiny_command("diyllm prepare pystdlib --out data/x   # note")
    assert cmd == f"diyllm prepare pystdlib --out data/x --max_bytes={TINY_MAX_BYTES}"
    assert tiny_command("diyllm sample --ckpt r --max_new_tokens=50").endswith("--max_new_tokens=8")
    forced = tiny_command("diyllm train c --max_iters=500").split()
    assert forced[:4] == ["diyllm", "train", "c", "--max_iters=500"] and forced[4:] == TINY_OVERRIDES
    kept = tiny_command("diyllm sft c --context_length=128").split()
    assert "--context_length=128" in kept and "--context_length=32" not in kept and "--max_iters=6" in kept
    assert not_run_reason("python -m pytest -q") and not not_run_reason("diyllm demo")
    ddp = tiny_command("torchrun --nproc_per_node=2 -m diyllm train c --gradient_accumulation_steps=2").split()
    assert ddp[7:] == [w for w in TINY_OVERRIDES if not w.startswith("--gradient_accumulation_steps")]
    assert tiny_command("diyllm plot runs/x/*/ --out 'a #b.png'  # c") == "diyllm plot runs/x/*/ --out 'a #b.png'"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A scratch 'checkout': configs/, benchmarks/, docs/, scripts/, examples/ link to the repo; ../shared to
    the shared data."""
    root = tmp_path_factory.mktemp("docs_commands")
    work = root / "main"
    work.mkdir()
    for name in ("configs", "benchmarks", "docs", "scripts", "examples"):
        target = REPO / ("diyllm/configs" if name == "configs" else name)
        if target.exists():
            (work / name).symlink_to(target, target_is_directory=True)
    if SHARED.is_dir():
        (root / "shared").mkdir()
        (root / "shared" / "data").symlink_to(SHARED, target_is_directory=True)
    return work


_already_run: set[str] = set()


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_doc_commands_run(doc: Path, workspace: Path):
    commands = bash_commands(doc.read_text(encoding="utf-8"))
    env = {**os.environ, TINY_ENV: "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The commands must exercise this checkout, whatever copy of diyllm the interpreter has installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    ran = 0
    for command in commands:
        if not_run_reason(command):
            continue
        if "../shared/" in command and not SHARED.is_dir():
            pytest.skip(f"{doc.name} needs the shared data folder {SHARED}")
        cmd = tiny_command(command)
        if cmd in _already_run:  # e.g. the Chinese curriculum repeats the English one's commands
            continue
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", cmd], cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
        took = time.perf_counter() - t0
        assert proc.returncode == 0, (
            f"{doc.relative_to(REPO)}: `{command}` failed (exit {proc.returncode}, {took:.1f}s) as `{cmd}`\n"
            f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-3000:]}"
        )
        _already_run.add(cmd)
        ran += 1
        print(f"{took:6.1f}s  {cmd}")
    runnable = [c for c in commands if not not_run_reason(c)]
    assert ran > 0 or not runnable or all(tiny_command(c) in _already_run for c in runnable)


def test_every_bash_block_is_covered():
    """Each ```bash command is run above or listed in NOT_RUN: none is silently ignored, and the
    curriculum has at least a handful of commands."""
    total = 0
    for doc in doc_files():
        for command in bash_commands(doc.read_text(encoding="utf-8")):
            total += 1
            words = shlex.split(command, comments=True)
            assert words, f"{doc.name}: empty command {command!r}"
            if not_run_reason(command):
                continue
            assert words[0] != "cd", f"{doc.name}: `{command}`: use paths instead of cd (each command runs alone)"
            multi_node = any(re.match(r"--nnodes=?(\d*)$", w) and not w.endswith("=1") for w in words)
            assert not multi_node, f"{doc.name}: `{command}`: put multi-node torchrun commands in a ```bash-gpu fence"
    assert total >= 10
