"""``vqlib``: the Hub side from the command line.

    vqlib info REPO_OR_DIR [--revision R]        kind, config, format version, bits per weight, metrics, files
    vqlib download REPO [--revision R] [--to DIR]
    vqlib upload DIR REPO [--revision BRANCH] [--private] [--commit-message M] [--create-pr]

Only vqlib's files (config.json, model.safetensors, README.md) are downloaded; nothing is unpickled. Errors are one
line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import serialization as ser

FILES = [ser.CONFIG_NAME, ser.WEIGHTS_NAME, ser.CARD_NAME]


def describe(config: dict[str, Any]) -> tuple[str, int | None]:
    """(kind, format version) of a vqlib config.json."""
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "vqlib":
        return f"compressed model ({config.get('model_type') or 'custom architecture'})", quant.get("format_version")
    if config.get("library") == "vqlib" and "model_type" in config:
        return f"tokenizer ({config['model_type']})", config.get("format_version")
    raise ValueError(
        "config.json is not a vqlib model (no library: vqlib and no quantization_config quant_method vqlib)"
    )


def bits_per_weight(folder: Path, quant: dict[str, Any]) -> float | None:
    """Storage bits per weight of the compressed layers, from the safetensors header (bias excluded)."""
    path = folder / ser.WEIGHTS_NAME
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    modules = quant.get("modules", {})
    weights = sum(s["in_features"] * s["out_features"] for s in modules.values())
    stored = 0
    for key, info in header.items():
        owner, _, leaf = key.rpartition(".")
        if owner in modules and leaf != "bias":
            stored += info["data_offsets"][1] - info["data_offsets"][0]
    return 8.0 * stored / weights if weights else None


def _files(res: ser.Resolved, token: Any) -> list[tuple[str, int]]:
    if res.repo_id is None:
        return sorted((p.name, p.stat().st_size) for p in res.folder.iterdir() if p.is_file())
    from huggingface_hub import HfApi

    tree = HfApi(token=token).list_repo_tree(res.repo_id, revision=res.commit, recursive=True)
    return sorted((f.path, f.size) for f in tree if hasattr(f, "size") and f.size is not None)


def info(target: str, revision: str | None, token: Any = None) -> str:
    res = ser.resolve_folder(
        target, caller="vqlib info", files=[ser.CONFIG_NAME, ser.CARD_NAME], revision=revision, token=token
    )
    config = ser.read_json_config(res.folder, "vqlib info")
    kind, version = describe(config)
    lines = [
        f"{target}" + (f" @ {res.commit}" if res.commit else ""),
        f"kind:           {kind}",
        f"format version: {version}",
    ]
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        bpw = bits_per_weight(res.folder, quant)
        lines.append(
            f"compressed:     {len(quant.get('modules', {}))} layers"
            + (f", {bpw:.3f} bits per weight" if bpw is not None else "")
            + f"; uncompressed linear layers: {len(quant.get('uncompressed_modules', []))}"
        )
        lines.append(f"config:         {json.dumps(quant.get('compress_config', {}), sort_keys=True)}")
    else:
        lines.append(f"config:         {json.dumps(config.get('init_args', {}), sort_keys=True)[:400]}")
    if (res.folder / ser.CARD_NAME).is_file():
        from huggingface_hub import ModelCard

        results = ModelCard.load(res.folder / ser.CARD_NAME).data.eval_results or []
        lines += ["metrics:"] + [f"  {r.metric_name or r.metric_type:<40} {r.metric_value:.6g}" for r in results]
    lines += ["files:"] + [f"  {name:<30} {size:>12,} bytes" for name, size in _files(res, token)]
    return "\n".join(lines)


def download(repo: str, revision: str | None, to: str | None, token: Any = None) -> str:
    from huggingface_hub import snapshot_download

    if ser.looks_like_local_path(repo) or Path(repo).exists():
        raise ValueError(f"{repo!r} is a local path; download takes a Hub repo id OWNER/NAME")
    res = ser.resolve_folder(repo, caller="vqlib download", files=FILES, revision=revision, token=token)
    if not (res.folder / ser.WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"Hub repo {repo!r} at {res.commit} has no {ser.WEIGHTS_NAME}")
    folder = res.folder
    if to:
        folder = Path(snapshot_download(repo, revision=res.commit, allow_patterns=FILES, local_dir=to, token=token))
    return f"downloaded {repo} @ {res.commit} to {folder}"


def upload(folder: str, repo: str, ns: argparse.Namespace) -> str:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    ser.refuse_pickles([p.name for p in path.iterdir()], folder, "vqlib upload")
    describe(ser.read_json_config(path, "vqlib upload"))
    size, expected = ser.safetensors_size(path / ser.WEIGHTS_NAME) if (path / ser.WEIGHTS_NAME).is_file() else (0, 1)
    if size < expected:
        raise ValueError(f"{path / ser.WEIGHTS_NAME} is missing or truncated; nothing uploaded")
    commit = ser.push_folder(
        path,
        repo,
        token=ns.token,
        private=ns.private,
        revision=ns.revision,
        commit_message=ns.commit_message,
        create_pr=ns.create_pr,
    )
    return f"uploaded {folder} to {repo}: {getattr(commit, 'commit_url', commit)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqlib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="describe a saved vqlib model (folder or Hub repo)")
    p.add_argument("target")
    p.add_argument("--revision")
    p = sub.add_parser("download", help="download a vqlib model's files at one commit")
    p.add_argument("repo")
    p.add_argument("--revision")
    p.add_argument("--to", help="copy into this folder (default: the Hugging Face cache)")
    p = sub.add_parser("upload", help="upload a saved folder to the Hub")
    p.add_argument("folder")
    p.add_argument("repo")
    p.add_argument("--revision", help="branch (created from main if needed)")
    p.add_argument("--private", action="store_true", default=None)
    p.add_argument("--commit-message", default="Upload with vqlib")
    p.add_argument("--create-pr", action="store_true")
    for p in sub.choices.values():
        p.add_argument("--token", default=None, help="Hub token (default: the saved login)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "info":
            print(info(ns.target, ns.revision, ns.token))
        elif ns.command == "download":
            print(download(ns.repo, ns.revision, ns.to, ns.token))
        else:
            print(upload(ns.folder, ns.repo, ns))
    except Exception as exc:  # one line, exit 2: the CLI's contract
        print(
            f"vqlib {ns.command}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
