"""`tide pull REPO`: download a LLaDA2.0 checkpoint from the Hugging Face hub and convert it,
in one step.

Only the files `tide convert` reads are downloaded (config, safetensors shards and index,
tokenizer), into the hub's own cache (`$HF_HOME`, else ~/.cache/huggingface), so a second pull
(another type, an interrupted download) reuses what is there; `HF_HUB_OFFLINE=1` converts from
that cache without the network. Then the checkpoint is converted as `tide convert` does.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tide_local.errors import TideError, UsageError

# What `tide convert` reads of a checkpoint folder (models.md).
CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

EPILOG = """\
examples:
  tide pull inclusionAI/LLaDA2.0-mini --type q4_k_m            writes LLaDA2.0-mini-q4_k_m.gguf here
  tide pull inclusionAI/LLaDA2.0-mini-CAP -o cap.gguf
  HF_HUB_OFFLINE=1 tide pull inclusionAI/LLaDA2.0-mini --type q8_0   from the hub cache only

The download is 32.5 GB for LLaDA2.0-mini and 206 GB for -flash (bf16); the GGUF sizes per
type are in models.md. A gated or private repository needs `hf auth login` (or $HF_TOKEN).
"""


def build_parser(prog: str = "tide pull") -> argparse.ArgumentParser:
    from tide_local.converters.quant_plan import OUTPUT_TYPES

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="REPO", help="a Hugging Face model id, e.g. inclusionAI/LLaDA2.0-mini")
    p.add_argument("-o", "--output", metavar="OUT.gguf", help="output file (default: NAME-TYPE.gguf in this folder)")
    p.add_argument("-t", "--type", default="q8_0", choices=list(OUTPUT_TYPES), metavar="TYPE",
                   help="weight type (default: q8_0; `tide convert --help` lists them)")
    p.add_argument("--revision", metavar="REV", help="a branch, tag or commit of the repository (default: main)")
    p.add_argument("--threads", type=int, default=None, help="quantization threads (default: CPU cores, at most 8)")
    return p


def download(repo: str, revision: str | None) -> Path:
    """The checkpoint's folder in the hub cache (downloaded first where needed)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise TideError("tide pull needs the huggingface_hub package: pip install huggingface_hub") from None
    print(f"downloading {repo} ({', '.join(CHECKPOINT_FILES)}) into the Hugging Face cache ...", file=sys.stderr)
    try:
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
    if not _REPO_ID.fullmatch(args.repo):
        raise UsageError(f"'{args.repo}' is not a Hugging Face model id (OWNER/NAME, e.g. inclusionAI/LLaDA2.0-mini)")
    check_threads(args.threads)
    out = Path(args.output or f"{args.repo.split('/')[1]}-{args.type}.gguf")
    check_output_path(out)  # before a download of many GB, not after
    folder = download(args.repo, args.revision)
    convert(folder, out, args.type, threads=args.threads)
    print(f"run it: tide chat -m {out}", file=sys.stderr)
    return 0
