"""Loader workers start from a clean, single-threaded process, never by forking a threaded one
(``aurora_ds.data.workers``), and take their loader's environment."""

import os
import signal
import subprocess
import sys
import threading

import pytest

from aurora_ds.data import LoaderConfig, build_loader, expand_urls
from aurora_ds.data.text import HashTokenizer
from aurora_ds.data.workers import catches
from aurora_ds.dist import free_port


def children(pid):
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


@pytest.mark.timeout(180)
def test_workers_fork_from_a_single_threaded_server_and_see_the_loader_environment(tmp_path, shard_factory,
                                                                                    monkeypatch):
    shard_factory.write(shard_factory.coco(8), str(tmp_path), "env", per_shard=4)
    idle = threading.Event()
    threading.Thread(target=idle.wait, daemon=True).start()  # this process runs threads, as a training rank does
    assert threads(os.getpid()) > 1
    # Set now, after any earlier test started the forkserver: the shard is found only if the
    # workers take the environment the loader was created under.
    monkeypatch.setenv("AURORA_TEST_SHARDS", str(tmp_path))
    url = 'pipe:cat "$AURORA_TEST_SHARDS"/env-00000{0..1}.tar'
    loader = build_loader(url, LoaderConfig(image_size=32, batch_size=2, num_workers=2, shuffle_buffer=4),
                          HashTokenizer())
    it = iter(loader)
    first = next(it)
    servers = [p for p in children(os.getpid()) if len(children(p)) == 2]
    assert len(servers) == 1, "the 2 workers are not the children of one process of ours"
    server = servers[0]
    assert threads(server) == 1  # the process that forks the workers runs nothing else
    assert catches(server, signal.SIGUSR1)  # so every worker has the stack dump from its first instant
    assert all(catches(w, signal.SIGUSR1) for w in children(server))
    ids = sorted(first["media_id"] + [i for b in it for i in b["media_id"]])
    assert ids == ["coco_%06d" % i for i in range(8)]
    idle.set()


STRESS = r'''
import os, sys, time
import torch
from torch.utils.tensorboard import SummaryWriter
from aurora_ds import dist
from aurora_ds.data import LoaderConfig, build_loader
from aurora_ds.data.text import HashTokenizer


def main():
    spec, epochs, samples, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.distributed.init_process_group("gloo")  # gloo's threads and the TCP store's run from here on
    rank, world = dist.world()
    writer = SummaryWriter(os.path.join(out, "tb%d" % rank))  # one more thread, as on rank 0 of a run
    cfg = LoaderConfig(image_size=32, batch_size=2, num_workers=2, shuffle_buffer=4, worker_timeout=30)
    loader = build_loader(spec, cfg, HashTokenizer())
    for epoch in range(epochs):
        n = sum(len(b["media_id"]) for b in loader)
        writer.add_scalar("samples", n, epoch)
        total = int(dist.sum_over_ranks(torch.tensor([float(n)])).item())
        assert total == samples, (epoch, total)
    writer.close()
    if rank == 0:
        print("worker starts:", epochs * world * cfg.num_workers, flush=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
'''


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_stress_many_worker_starts_on_two_ranks_under_load(tmp_path, shard_factory):
    """2 ranks x 2 workers x 60 epochs = 240 worker starts while gloo, the TCP store and a
    TensorBoard writer run threads in the ranks and a CPU burner competes: no stall (each
    epoch's workers must deliver within their 30 s timeout)."""
    spec = shard_factory.write(shard_factory.coco(8), str(tmp_path / "shards"), "s", per_shard=2)
    script = tmp_path / "stress.py"
    script.write_text(STRESS)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), str(script), spec, "60", "8", str(tmp_path)],
            capture_output=True, text=True, timeout=850)
    finally:
        burner.kill()
        burner.wait()
    assert run.returncode == 0, run.stderr[-4000:]
    assert "worker starts: 240" in run.stdout
    assert len(expand_urls(spec)) == 4
