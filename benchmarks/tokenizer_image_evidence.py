"""Plain VQ vs the SimVQ reparameterised codebook in the tiny image tokenizer, same steps, same data.

Trains ``training/configs/image_tiny.yaml`` once per quantizer variant through ``vqlib-train``'s LightningCLI
(same seed, same data order, same optimiser, same step count; only the quantizer differs) and prints the
final validation PSNR, SSIM, codebook usage over the whole validation set (distinct codes / codebook size)
and perplexity side by side. Validation uses held-out photographs (no crop of them is ever trained on).

Variants (all ``vqlib.VectorQuantize`` with the config's dim and codebook size):
    plain   codebook_update="gradient", no k-means init, no dead-code restart (taming VQGAN's codebook)
    simvq   codebook_update="gradient", reparam="simvq" (frozen random basis x one learnable linear map)
    ema     codebook_update="ema", kmeans_init=True, dead_code_window=100 (a tuned classical VQ, for context)

    python benchmarks/tokenizer_image_evidence.py                      # plain vs simvq, the config's steps
    python benchmarks/tokenizer_image_evidence.py --max-steps 300 --variants plain,simvq,ema
    python benchmarks/tokenizer_image_evidence.py --parallel      # one process per variant, 1 thread each

"train s" is wall time; "CPU s" is the process CPU time (on a busy shared machine the better measure of
what the run costs: about the wall time of a single-threaded run on an idle core).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_description, setup_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUANTIZER_KEY = "--model.init_args.tokenizer.init_args.quantizer"

VARIANTS = {
    "plain": {"codebook_update": "gradient", "reparam": "none", "kmeans_init": False, "dead_code_window": 0},
    "simvq": {"codebook_update": "gradient", "reparam": "simvq", "kmeans_init": False, "dead_code_window": 0},
    "ema": {"codebook_update": "ema", "reparam": "none", "kmeans_init": True, "dead_code_window": 100},
}


def final_validation(log_dir: Path) -> dict[str, float]:
    with open(log_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/psnr")]
    if not rows:
        raise RuntimeError(f"no validation row in {log_dir / 'metrics.csv'}")
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)}


def run_variant(name: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    import yaml
    from vqlib.training.cli import run_cli

    cfg = yaml.safe_load(Path(args.config).read_text())
    q = cfg["model"]["init_args"]["tokenizer"]["init_args"]["quantizer"]["init_args"]
    init_args = {"dim": q["dim"], "codebook_size": args.codebook_size or q["codebook_size"], **VARIANTS[name]}
    quantizer = json.dumps({"class_path": "vqlib.VectorQuantize", "init_args": init_args})
    root = out / name
    cli_args = [
        "fit", "--config", str(args.config), f"{QUANTIZER_KEY}={quantizer}",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.version", "0",
        "--trainer.enable_progress_bar", str(not args.no_progress).lower(),
    ]  # fmt: skip
    if args.max_steps is not None:
        cli_args += ["--trainer.max_steps", str(args.max_steps)]
        if args.val_every is None:  # validate at the end (and a few times on the way)
            cli_args += ["--trainer.val_check_interval", str(max(1, args.max_steps // 4))]
    if args.val_every is not None:
        cli_args += ["--trainer.val_check_interval", str(args.val_every)]
    cli_args += list(args.overrides)
    start, cpu_start = time.perf_counter(), time.process_time()
    cli = run_cli(cli_args)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = final_validation(root / "lightning_logs" / "version_0")
    result["seconds"] = seconds
    result["cpu_seconds"] = cpu_seconds
    result["steps"] = cli.trainer.global_step
    result["codebook_size"] = init_args["codebook_size"]
    with open(root / "result.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


def run_in_subprocesses(names: list[str], args: argparse.Namespace, out: Path) -> dict[str, dict[str, float]]:
    """One child process per variant (``--threads`` split between them); each writes <out>/<variant>/result.json."""
    threads = max(1, args.threads // len(names))
    procs = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--config", str(args.config), "--variants", name,
               "--threads", str(threads), "--out", str(out), "--no-progress"]  # fmt: skip
        for flag, value in (("--max-steps", args.max_steps), ("--val-every", args.val_every),
                            ("--codebook-size", args.codebook_size)):  # fmt: skip
            if value is not None:
                cmd += [flag, str(value)]
        if args.overrides:
            cmd += ["--", *args.overrides]
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(name)
        log.close()
    if failed:
        raise SystemExit(f"variants {failed} failed; see {out}/<variant>.log")
    return {name: json.loads((out / name / "result.json").read_text()) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "training" / "configs" / "image_tiny.yaml"))
    parser.add_argument("--max-steps", type=int, default=None, help="training steps per variant (default: config)")
    parser.add_argument("--val-every", type=int, default=None, help="validation interval in steps")
    parser.add_argument("--codebook-size", type=int, default=None, help="override the config's codebook size")
    parser.add_argument("--variants", default="plain,simvq", help=f"comma list from {list(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="runs/tokenizer_image_evidence")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--parallel", action="store_true", help="train the variants at once, one process each")
    parser.add_argument("overrides", nargs="*", help="extra vqlib-train arguments for every variant, after --")
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    setup_threads(args.threads)
    warnings.filterwarnings("ignore", module="lightning")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.argv = [sys.argv[0]]  # LightningCLI gets its arguments from run_cli only
    if args.parallel and len(names) > 1:
        results = run_in_subprocesses(names, args, out)
    else:
        results = {name: run_variant(name, args, out) for name in names}

    print()
    mode = (
        f"{len(names)} processes x {max(1, args.threads // len(names))} thread(s)"
        if args.parallel
        else f"{args.threads} thread(s)"
    )
    print(f"machine: {machine_description()}; {mode}")
    print(f"config: {args.config}; steps: {args.max_steps or 'from config'}")
    header = (f"{'variant':<8} {'codes':>7} {'steps':>6} {'PSNR dB':>8} {'SSIM':>7} {'usage':>7} {'perplexity':>10} "
              f"{'train s':>8} {'CPU s':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<8} {int(r['codebook_size']):>7} {int(r['steps']):>6} {r['val/psnr']:>8.2f} {r['val/ssim']:>7.4f} "
            f"{100 * r['val/usage']:>6.1f}% {r['val/perplexity']:>10.1f} {r['seconds']:>8.0f} {r['cpu_seconds']:>7.0f}"
        )
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nper-variant logs, grids and results.json under {out}")


if __name__ == "__main__":
    main()
