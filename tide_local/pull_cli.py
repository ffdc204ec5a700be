"""`tide pull REPO`: download a LLaDA2.0 checkpoint from the Hugging Face hub and convert it,
in one step; `tide pull REPO:FILE.gguf` downloads a GGUF as it is.

Only the files `tide convert` reads are downloaded (config, safetensors shards and index,
tokenizer), into the hub's own cache (`$HF_HOME`, else ~/.cache/huggingface): an interrupted
download resumes, and `HF_HUB_OFFLINE=1` converts from that cache without the network. Before
downloading, the free disk space is checked for the download and the GGUF together (when the hub
can say the files' sizes). After converting, the downloaded weights are deleted from the cache
unless --keep.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from tide_local.errors import TideError, UsageError

# What `tide convert` reads of a checkpoint folder (models.md).
CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# GGUF bytes per checkpoint (bf16) byte, by type (models.md's sizes, rounded up).
OUTPUT_PER_SOURCE_BYTE = {"f32": 2.0, "f16": 1.0, "bf16": 1.0, "q8_0": 0.54, "q6_k": 0.42, "q5_k_m": 0.36,
                          "q5_k": 0.35, "q4_k_m": 0.31, "q4_k": 0.29, "q4_0": 0.29}

EPILOG = """\
examples:
  tide pull inclusionAI/LLaDA2.0-mini --type q4_k_m            writes LLaDA2.0-mini-q4_k_m.gguf here
  tide pull inclusionAI/LLaDA2.0-mini-CAP -o cap.gguf
  HF_HUB_OFFLINE=1 tide pull inclusionAI/LLaDA2.0-mini --type q8_0   from the hub cache only
  tide pull someone/LLaDA2.0-mini-GGUF:LLaDA2.0-mini-Q4_K_M.gguf    a GGUF as it is

The download is 32.5 GB for LLaDA2.0-mini and 206 GB for -flash (bf16); the GGUF sizes per
type are in models.md. A gated or private repository needs `hf auth login` (or $HF_TOKEN).
"""


def build_parser(prog: str = "tide pull") -> argparse.ArgumentParser:
    from tide_local.converters.quant_plan import OUTPUT_TYPES

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="REPO[:FILE.gguf]",
                   help="a Hugging Face model id, e.g. inclusionAI/LLaDA2.0-mini; with :FILE.gguf, that GGUF as it is")
    p.add_argument("-o", "--output", metavar="OUT.gguf", help="output file (default: NAME-TYPE.gguf in this folder)")
    p.add_argument("-t", "--type", default="q8_0", choices=list(OUTPUT_TYPES), metavar="TYPE",
                   help="weight type (default: q8_0; `tide convert --help` lists them)")
    p.add_argument("--revision", metavar="REV", help="a branch, tag or commit of the repository (default: main)")
    p.add_argument("--threads", type=int, default=None, help="quantization threads (default: CPU cores, at most 8)")
    p.add_argument("--keep", action="store_true", help="keep the downloaded safetensors in the cache after converting")
    return p


def check_disk(folder: Path, need: int, what: str) -> None:
    """Refuse to start when `folder`'s file system has less than `need` bytes free."""
    from tide_local.units import human_bytes

    probe = _existing(folder)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise TideError(f"{what} needs {human_bytes(need)} but {probe} has {human_bytes(free)} free")


def check_space(download_bytes: int, output_bytes: int, out: Path, what: str) -> None:
    """Room for the download in the hub cache and for the GGUF beside `out` (the sum where both
    are on one file system)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    cache, folder = Path(HF_HUB_CACHE), out.absolute().parent
    if _existing(cache).stat().st_dev == _existing(folder).stat().st_dev:
        check_disk(folder, download_bytes + output_bytes, f"{what} and its GGUF")
    else:
        check_disk(cache, download_bytes, what)
        check_disk(folder, output_bytes, f"the GGUF of {what}")


def _existing(path: Path) -> Path:
    """`path`, or its nearest folder that exists (where it would be created)."""
    while not path.exists():
        path = path.parent
    return path


def place_copy(src: Path, out: Path) -> Path:
    """`src` at `out`: a hard link, else a copy written beside it and renamed into place."""
    from tide_local.gguf.writer import check_output_path

    check_output_path(out)
    real = Path(os.path.realpath(src))
    tmp = out.with_name(f".{out.name}.partial")
    try:
        try:
            os.link(real, tmp)
        except OSError:
            shutil.copyfile(real, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def remote_bytes(repo: str, revision: str | None) -> int | None:
    """The checkpoint files' total size on the hub (None offline or when the hub does not say)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import filter_repo_objects

        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        names = set(filter_repo_objects([s.rfilename for s in info.siblings], allow_patterns=CHECKPOINT_FILES))
        return sum(s.size or 0 for s in info.siblings if s.rfilename in names)
    except Exception:  # offline, no such repository, ...: the download itself says what is wrong
        return None


def drop_weights(folder: Path) -> None:
    """Delete the downloaded safetensors (the cache's links and the files they point to)."""
    for link in folder.glob("*.safetensors"):
        target = Path(os.path.realpath(link))
        link.unlink(missing_ok=True)
        if target != link:
            target.unlink(missing_ok=True)


def download(repo: str, revision: str | None, file: str | None = None) -> Path:
    """The checkpoint's folder in the hub cache (downloaded first where needed), or with `file`
    that one file's path."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise TideError("tide pull needs the huggingface_hub package: pip install huggingface_hub") from None
    print(f"downloading {repo} ({file or ', '.join(CHECKPOINT_FILES)}) into the Hugging Face cache ...",
          file=sys.stderr)
    try:
        if file:
            return Path(hf_hub_download(repo, file, revision=revision))
        return Path(snapshot_download(repo, revision=revision, allow_patterns=CHECKPOINT_FILES))
    except GatedRepoError:
        raise TideError(f"{repo} is gated: accept its terms on huggingface.co, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise TideError(f"no model {repo} on the Hugging Face hub (or it is private: `hf auth login`)") from None
    except RevisionNotFoundError:
        raise TideError(f"{repo} has no revision {revision}") from None
    except LocalEntryNotFoundError:
        raise TideError(f"{repo} is not in the Hugging Face cache and cannot be downloaded now "
                        "(offline, or HF_HUB_OFFLINE is set)") from None
    except (HfHubHTTPError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TideError(f"downloading {repo} failed: {first}") from None


def main(argv: list[str] | None = None, prog: str = "tide pull") -> int:
    from tide_local.converters.convert import check_threads, convert
    from tide_local.gguf.writer import check_output_path

    args = build_parser(prog).parse_args(argv)
    repo, _, file = args.repo.partition(":")
    if not _REPO_ID.fullmatch(repo):
        raise UsageError(f"'{repo}' is not a Hugging Face model id (OWNER/NAME, e.g. inclusionAI/LLaDA2.0-mini)")
    if file and not file.lower().endswith(".gguf"):
        raise UsageError(f"'{file}': after the colon comes a .gguf file of the repository")
    check_threads(args.threads)
    if file:  # a GGUF as it is: in the cache, and at -o when given (a hard link where the disk allows)
        path = download(repo, args.revision, file)
        if args.output:
            path = place_copy(path, Path(args.output))
        print(f"run it: tide chat -m {path}", file=sys.stderr)
        return 0
    out = Path(args.output or f"{repo.split('/')[1]}-{args.type}.gguf")
    check_output_path(out)  # before a download of many GB, not after
    size = remote_bytes(repo, args.revision)
    if size:
        check_space(size, int(size * OUTPUT_PER_SOURCE_BYTE[args.type]), out, f"{repo} ({size / 1e9:.1f} GB)")
    folder = download(repo, args.revision)
    convert(folder, out, args.type, threads=args.threads)
    if not args.keep:
        drop_weights(folder)
    print(f"run it: tide chat -m {out}" + ("" if args.keep else " (the downloaded weights are deleted: --keep keeps them)"),
          file=sys.stderr)
    return 0
