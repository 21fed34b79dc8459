"""Several nodes on one machine: two torchrun agents on localhost meet by c10d rendezvous, as two nodes would. The
corpus sits in a folder no index is written to (read-only shared storage); each node keeps its indexes in its own
--index-dir. Node "a" runs rank 0, node "b" ranks 1 and 2. Then load_corpus's turns alone, with ranks as threads,
for an index folder per node and for one that all nodes share."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import align
import data as D
import model as M
from test_train import ALIGN, flags, losses, write_corpus

ARGS = ["--batch-size", 1, "--max-steps", 2, "--lr", 1e-2, "--warmup-ratio", 0, "--save-every", 10]

# Runs align.py with data.build_index wrapped: each rank logs that it started, and each index build, before it
# builds. The pause makes the old race certain: a second rank of a node that reaches the index while the first is
# still building it builds it too.
COUNTED = """
import os, sys, time
sys.path.insert(0, {root!r})
import data

def log(line):
    with open({log!r}, "a") as f:  # one short append per line: lines of different processes do not interleave
        f.write(f"{{os.environ['NODE']}} {{os.environ['RANK']}} {{line}}\\n")

def build_index(corpus_file, index_file, real=data.build_index):
    log(f"build {{index_file}}")
    time.sleep(1)
    real(corpus_file, index_file)

data.build_index = build_index
log("start")
import align
align.main(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(script, args_of, logs, timeout=300):
    """Node "a" (one process) and node "b" (two) as two torchrun agents; args_of(node) -> that node's arguments,
    their output in logs/node-a.log and node-b.log (files: a full pipe would stall the ranks). Distinct --local-addr
    values make the layout certain: c10d numbers nodes in the sorted order of their addresses, so "a" (127.0.0.1)
    is node 0 and holds rank 0."""
    port, agents = free_port(), {}
    for node, nproc, addr in [("a", 1, "127.0.0.1"), ("b", 2, "localhost")]:
        env = dict(os.environ, NODE=node, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test-nodes",
               f"--local-addr={addr}", str(script), *map(str, args_of(node))]
        with open(logs / f"node-{node}.log", "w") as log:
            agents[node] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while any(a.poll() is None for a in agents.values()):
            if time.monotonic() > deadline or any(a.poll() for a in agents.values()):  # timed out, or one failed
                break
            time.sleep(0.2)
    finally:
        for agent in agents.values():
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)  # its ranks too, not only the agent
                agent.wait()
    for node, agent in agents.items():
        assert agent.returncode == 0, f"node {node}: exit code {agent.returncode}\n" + "\n".join(
            f"--- node {n}:\n{(logs / f'node-{n}.log').read_text()[-3000:]}" for n in agents)


def stage1_on_two_nodes(tiny_dir, root, index_dir_of, *extra):
    """Stage 1, 6 records in two corpus files (both named train.json), global batch 3 = 1 per rank. Returns the
    corpus folder, --out and what the ranks logged: (node, rank, "start" or "build", index path)."""
    shared = root / "shared"
    write_corpus(shared / "one", ALIGN[:3])
    write_corpus(shared / "two", ALIGN[3:6])
    script, builds = root / "counted.py", root / "builds.log"
    script.write_text(COUNTED.format(root=str(ROOT), log=str(builds)))
    out = root / "out"
    two_nodes(script, lambda node: flags(tiny_dir, str(shared), out, *ARGS, "--grad-accum", 1,
                                         "--index-dir", index_dir_of(node), *extra), root)
    return shared, out, [(line.split(" ", 3) + [""])[:4] for line in builds.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    """Two steps, each node with its own index folder."""
    root = tmp_path_factory.mktemp("nodes")
    return root, *stage1_on_two_nodes(tiny_dir, root, lambda node: root / f"index-{node}")


def test_each_node_builds_each_index_once_into_its_own_folder(run):
    root, shared, _, events = run
    starts = {(node, int(rank)) for node, rank, what, _ in events if what == "start"}
    assert starts == {("a", 0), ("b", 1), ("b", 2)}  # the layout in which the old code built twice on node b
    files = D.corpus_files([shared])
    assert len(files) == 2 and not list(shared.rglob("*.idx"))  # nothing written next to the corpus
    builds = Counter((node, path) for node, _, what, path in events if what == "build")
    for node in "ab":
        index_dir = root / f"index-{node}"
        expected = sorted(str(D.index_path(f, index_dir)) for f in files)
        assert sorted(path for n, path in builds.elements() if n == node) == expected, builds  # each one, once
        assert sorted(str(p) for p in index_dir.iterdir()) == expected  # no second copy, no temporary file


def test_two_nodes_equal_one_process_with_the_same_global_batch(run, tiny_dir, tiny_config, tmp_path):
    """Also: --resume may point at another --index-dir (where the index is kept does not change the run)."""
    _, shared, nodes, _ = run
    one = tmp_path / "one"
    args = flags(tiny_dir, str(shared), one, *ARGS, "--grad-accum", 3)
    align.main(args + ["--index-dir", str(tmp_path / "index-1"), "--stop-after", "1"])
    align.main(args + ["--index-dir", str(tmp_path / "index-2"), "--resume"])
    assert len(list((tmp_path / "index-2").glob("*.idx"))) == 2
    assert json.loads((align.checkpoints(nodes)[-1] / "config.json").read_text())["global_batch"] == 3
    assert losses(one) == pytest.approx(losses(nodes), rel=1e-5)
    assert len(losses(one)) == 2
    torch.manual_seed(42)
    start = M.LLaSO.from_parts(tiny_config).projector.state_dict()
    a, b = load_file(one / "projector.safetensors"), load_file(nodes / "projector.safetensors")
    for name, weight in a.items():
        torch.testing.assert_close(b[name], weight, rtol=1e-4, atol=1e-6, msg=name)
        assert not torch.equal(weight, start[name])  # the comparison is between trained projectors


@pytest.mark.parametrize("shared", [False, True], ids=["index folder per node", "one shared index folder"])
def test_load_corpus_builds_each_index_once_per_folder(shared, tmp_path, monkeypatch):
    """load_corpus's turns for two nodes of two ranks, the ranks as threads. Shared: as a corpus on shared storage
    that can be written (rank 0 builds, every other rank reads, also the first rank of the other node)."""
    corpus = write_corpus(tmp_path / "data", ALIGN[:2])
    barrier, builds, real = threading.Barrier(4), [], D.build_index
    monkeypatch.setattr(align.dist, "barrier", lambda: barrier.wait(timeout=60))

    def build_index(corpus_file, index_file):
        builds.append(str(index_file))
        time.sleep(0.2)  # a rank that reached the index while another builds it would build it too
        real(corpus_file, index_file)

    monkeypatch.setattr(D, "build_index", build_index)

    def rank(r: int) -> int:
        folder = tmp_path / ("index" if shared else f"index-{r // 2}")
        env = SimpleNamespace(rank=r, local_rank=r % 2, master=r == 0, distributed=True)
        return len(align.load_corpus(align.Config(data=[corpus], index_dir=str(folder)), env))

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(rank, range(4))) == [2] * 4
    folders = ["index"] if shared else ["index-0", "index-1"]
    assert sorted(builds) == [str(D.index_path(Path(corpus), tmp_path / f)) for f in folders]
