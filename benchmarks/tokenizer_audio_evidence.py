"""Evidence for the audio tokenizer: train ``audio_tiny`` and evaluate its RVQ at two bitrates.

    python benchmarks/tokenizer_audio_evidence.py [--max-steps 1200] [--threads N] [--out runs/audio_evidence]

Trains with ``vqlib-train fit --config training/configs/audio_tiny.yaml`` (the same LightningCLI, so the
run's metrics.csv, WAVs and checkpoints land in ``--out``), then evaluates the untrained and the trained
tokenizer on the held-out synthetic validation clips (a seed stream never used for training) at a quarter
of the RVQ levels and at all of them, printing bitrate, mel distance (multi-scale log-mel L1, lower is
better) and SI-SDR (dB, higher is better). The target: mel distance falls and SI-SDR rises with training,
and at the higher bitrate.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "training" / "configs" / "audio_tiny.yaml"


@torch.no_grad()
def evaluate(module, datamodule, levels: list[int]) -> dict[int, dict[str, float]]:
    from vqlib.models.audio_losses import si_sdr

    tok = module.tokenizer.eval()
    datamodule.setup("validate")
    results = {}
    for n in levels:
        mel_sum, sdr_sum, count = 0.0, 0.0, 0
        for batch in datamodule.val_dataloader():
            rec = tok(batch, num_quantizers=n).reconstruction
            mel_sum += float(module.mel_loss(rec, batch)) * batch.shape[0]
            sdr_sum += float(si_sdr(rec, batch).sum())
            count += batch.shape[0]
        results[n] = {"kbps": tok.bitrate(n), "mel_distance": mel_sum / count, "si_sdr": sdr_sum / count}
    return results


def print_table(title: str, results: dict[int, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'levels':>7} {'kbps':>6} {'mel distance':>13} {'SI-SDR dB':>10}")
    for n, r in results.items():
        print(f"{n:>7} {r['kbps']:>6.2f} {r['mel_distance']:>13.4f} {r['si_sdr']:>10.2f}")


def print_curve(metrics_csv: Path, levels: list[int]) -> None:
    """Validation metrics logged during training (one row per validation)."""
    import csv

    if not metrics_csv.is_file():
        return
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("val/mel_distance")]
    print("\nduring training (validation every val_check_interval steps):")
    print(
        f"{'step':>6} " + " ".join(f"{'mel@' + str(n):>9} {'SI-SDR@' + str(n):>10}" for n in levels) + f" {'usage':>6}"
    )
    for r in rows:
        cells = " ".join(
            f"{float(r[f'val/mel_distance_nq{n}']):>9.4f} {float(r[f'val/si_sdr_nq{n}']):>10.2f}" for n in levels
        )
        print(f"{int(r['step']) + 1:>6} {cells} {float(r['val/usage_mean']):>6.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps (generator steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", default="runs/audio_evidence", help="folder for logs, WAVs and checkpoints")
    ns = parser.parse_args(argv)

    if ns.threads:
        torch.set_num_threads(ns.threads)
    from vqlib.training.cli import run_cli

    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments below, not this script's

    overrides = ["--trainer.default_root_dir", ns.out, "--trainer.logger.init_args.save_dir", ns.out]
    if ns.max_steps is not None:
        overrides += ["--trainer.max_steps", str(ns.max_steps)]
        # keep a validation (and WAVs) at the end of short runs
        overrides += ["--trainer.val_check_interval", str(max(1, min(200, ns.max_steps)))]

    untrained = run_cli(["--config", ns.config, *overrides, "--trainer.logger", "false"], run=False)
    n = untrained.model.tokenizer.num_quantizers
    levels = sorted({max(1, n // 4), n})
    before = evaluate(untrained.model, untrained.datamodule, levels)
    del untrained

    start = time.time()
    cli = run_cli(["fit", "--config", ns.config, *overrides])
    train_seconds = time.time() - start
    after = evaluate(cli.model, cli.datamodule, levels)

    print("\n=== audio tokenizer evidence ===")
    print(f"command: python benchmarks/{command}")
    print(f"config: {ns.config}; steps: {cli.trainer.global_step}; training wall time: {train_seconds:.0f} s")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
    )
    print(f"log dir: {cli.trainer.logger.log_dir if cli.trainer.logger else ns.out}")
    print_table("untrained (step 0), held-out synthetic validation clips:", before)
    print_table(f"trained ({cli.trainer.global_step} steps), held-out synthetic validation clips:", after)
    if cli.trainer.logger is not None:
        print_curve(Path(cli.trainer.logger.log_dir) / "metrics.csv", levels)
    lo, hi = levels[0], levels[-1]
    print(
        f"\nSI-SDR gain from {lo} to {hi} levels: {after[hi]['si_sdr'] - after[lo]['si_sdr']:+.2f} dB; "
        f"mel distance change: {after[hi]['mel_distance'] - after[lo]['mel_distance']:+.4f}"
    )


if __name__ == "__main__":
    main()
