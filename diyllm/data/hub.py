"""`hf:OWNER/DATASET[/PATH-GLOB]` sources: files of a Hugging Face Hub dataset, fetched into its cache.

Downloads go through `huggingface_hub` into its normal cache (`HF_HOME` / `HF_HUB_CACHE`), so they
resume after an interruption and are shared with every other tool; a token in `HF_TOKEN` is used for
gated or private datasets. With `HF_HUB_OFFLINE=1` the files are taken from the cache without any network
access. Nothing is downloaded at import time. The files are sorted by their path in the repository, so
`--max_shards N` always takes the same N.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from diyllm.errors import UserError

PREFIX = "hf:"
DATA_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".txt")


def is_hub_source(source: str) -> bool:
    return str(source).startswith(PREFIX)


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """("OWNER/DATASET", glob or None) from "hf:OWNER/DATASET[/PATH-GLOB]"."""
    parts = source[len(PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise UserError(f"{source}: write a Hub source as hf:OWNER/DATASET or hf:OWNER/DATASET/PATH-GLOB")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def _matches(name: str, pattern: str | None) -> bool:
    if pattern is None:
        return name.lower().endswith(DATA_SUFFIXES)
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern.rstrip("/") + "/*")


def _offline_help(repo: str, pattern: str | None, why: str) -> str:
    include = f" --include '{pattern}'" if pattern else ""
    return (f"cannot get hf:{repo} from the Hugging Face Hub ({why}). Offline? Download it where there is a "
            f"network (`huggingface-cli download --repo-type dataset {repo}{include}`), copy that HF cache here "
            "and set HF_HOME to it with HF_HUB_OFFLINE=1, or pass the local files as SOURCE")


def download_hub_files(source: str, max_files: int | None = None) -> list[Path]:
    """Local paths of the files of `source` (downloaded into the Hub cache unless already there)."""
    try:
        import huggingface_hub as hf
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise UserError(f"{source} needs the huggingface_hub package: pip install 'diyllm[data]'") from None
    repo, pattern = parse_hub_source(source)
    offline = bool(hf_constants.HF_HUB_OFFLINE)
    try:
        if offline:
            root = Path(hf.snapshot_download(repo, repo_type="dataset", local_files_only=True))
            names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        else:
            root = None
            names = sorted(hf.HfApi().list_repo_files(repo, repo_type="dataset"))
        chosen = [n for n in names if _matches(n, pattern)]
        if not chosen:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise UserError(f"no file of hf:{repo} matches {pattern or 'a data file pattern'}; "
                            f"it has: {shown or 'nothing'}")
        if max_files is not None:
            if max_files < 1:
                raise UserError(f"--max_shards must be >= 1, got {max_files}")
            chosen = chosen[:max_files]
        if root is not None:
            return [root / n for n in chosen]
        return [Path(hf.hf_hub_download(repo, n, repo_type="dataset")) for n in chosen]
    except hf_errors.GatedRepoError:
        raise UserError(f"hf:{repo} is gated: accept its terms on huggingface.co, then set HF_TOKEN to a token "
                        "of that account") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"hf:{repo}: no such dataset on the Hugging Face Hub (or it is private: set HF_TOKEN to a "
                        "token that can read it)") from None
    except hf_errors.LocalEntryNotFoundError as exc:
        raise UserError(_offline_help(repo, pattern, f"not in the local cache: {exc}")) from None
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(_offline_help(repo, pattern, why)) from None


def resolve_hub_sources(inputs: list[str], max_files: int | None = None) -> list[str]:
    """Replace each hf: source by its local files; other inputs are kept as they are."""
    out: list[str] = []
    for item in inputs:
        if is_hub_source(item):
            out.extend(str(p) for p in download_hub_files(item, max_files))
        else:
            out.append(item)
    return out


GPT2_REPO = "openai-community/gpt2"


def gpt2_tokenizer(cached_only: bool = False):  # noqa: ANN201 - a BPETokenizer, or None
    """GPT-2's BPE from its vocab.json + merges.txt (Hub repo openai-community/gpt2, through the Hub cache;
    encoded with the tiktoken backend like every diyllm BPE). `cached_only`: None unless already cached."""
    try:
        import huggingface_hub as hf
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import errors as hf_errors
    except ImportError:
        if cached_only:
            return None
        raise UserError("--tokenizer gpt2 needs the huggingface_hub package: pip install 'diyllm[data]'") from None
    local = cached_only or bool(hf_constants.HF_HUB_OFFLINE)
    try:
        paths = [hf.hf_hub_download(GPT2_REPO, name, local_files_only=local) for name in ("vocab.json", "merges.txt")]
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, OSError) as exc:
        if cached_only:
            return None
        raise UserError(f"cannot get GPT-2's tokenizer files from hf:{GPT2_REPO} ({str(exc).splitlines()[0]}); "
                        "download vocab.json and merges.txt where there is a network, or pass --tokenizer FILE"
                        ) from None
    from diyllm.tokenizers import BPETokenizer

    return BPETokenizer.from_files(paths[0], paths[1], ["<|endoftext|>"])
