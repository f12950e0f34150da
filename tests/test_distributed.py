"""Two CPU processes (gloo): every rank must hold a bit-identical codebook after training steps
with k-means init, EMA updates and dead-code restarts, although each rank sees different data, also
when the quantizer runs under torch.compile."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqlib import ResidualVQ, VectorQuantize

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different data AND different default init on each rank
    modules = {
        "vq": VectorQuantize(16, 64, kmeans_init=True, dead_code_window=2, seed=rank),
        "cos": VectorQuantize(16, 64, distance="cosine", dead_code_window=2, seed=rank),
        "rvq": ResidualVQ(16, 32, 3, kmeans_init=True, dead_code_window=2, quantizer_dropout=0.5, seed=0),
        # torch.compile around a quantizer whose forward all-reduces, gathers and broadcasts codebook state
        "compiled": torch.compile(
            VectorQuantize(16, 64, kmeans_init=True, dead_code_window=2, seed=rank), backend="aot_eager"
        ),
    }
    for step in range(6):
        x = torch.randn(300 + 50 * rank, 16) * (1 + rank)
        mask = torch.rand(300 + 50 * rank) > 0.2
        for m in modules.values():
            m(x, mask=mask)
    for name, m in modules.items():
        state = torch.cat([b.double().flatten() for b in m.buffers()])
        gathered = [torch.zeros_like(state) for _ in range(world)]
        dist.all_gather(gathered, state)
        if rank == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered[1:])
            with open(os.path.join(result_dir, name), "w") as f:
                f.write("same" if same else "different")
    dist.barrier()
    dist.destroy_process_group()


def test_codebooks_are_bit_identical_across_ranks(tmp_path):
    port = _free_port()
    ctx = mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join returns False as soon as one process exits while another still runs: wait for all,
        # but never longer than the deadline, so a hang fails instead of stalling the suite.
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    for name in ("vq", "cos", "rvq", "compiled"):
        assert (tmp_path / name).read_text() == "same", name
