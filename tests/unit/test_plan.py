"""lctrain-plan: feasibility rules, the cost model's directions, and that every command it prints
composes as a valid training config."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lctrain.config import compose_config, validate
from lctrain.plan.cli import command, plan
from lctrain.plan.cluster import load_cluster
from lctrain.plan.cost import Candidate, predict


def _cfg(*overrides):
    return OmegaConf.to_object(compose_config(list(overrides)))


def test_printed_commands_compose_and_validate():
    cl = load_cluster(["cluster=h100", "cluster.nodes=4"])
    train = ["model=llama3_8b", "data.seq_len=1048576"]
    preds = plan(_cfg(*train), cl)
    feasible = [p for p in preds if p.infeasible is None]
    assert feasible and all(p.memory_bytes <= cl.capacity_bytes for p in feasible)
    assert [p.step_s for p in feasible] == sorted(p.step_s for p in feasible)
    assert all(p.infeasible for p in preds[len(feasible):])
    seen = set()
    for p in feasible:
        if p.candidate.label() in seen:
            continue
        seen.add(p.candidate.label())
        line = command(p, train, cl)
        assert line.startswith("torchrun --nproc-per-node=8 --nnodes=4 ")
        overrides = shlex.split(line.split(" -m lctrain.train ", 1)[1])
        cfg = compose_config(overrides)
        validate(cfg, cl.world)  # raises on anything the trainer would refuse
        assert cfg.data.seq_len == 1048576 and cfg.cp.size == p.candidate.cp


def test_ulysses_degree_must_fit_the_heads():
    cl = load_cluster(["cluster=h100"])
    cfg = _cfg("model=llama_150m", "data.seq_len=65536")  # 12 heads, 4 kv heads
    bad = predict(Candidate("ulysses", "contiguous", 8, 1, "fsdp2", True, 0, False), cfg, cl)
    assert bad.infeasible and "ulysses degree 8" in bad.infeasible
    good = predict(Candidate("ulysses", "contiguous", 4, 1, "fsdp2", True, 0, False), cfg, cl)
    assert good.infeasible is None and good.step_s > 0


def test_memory_makes_rows_infeasible_and_knobs_rescue_them():
    cl = load_cluster(["cluster=h100", "cluster.memory_gib=40"])
    cfg = _cfg("model=llama_1b", "data.seq_len=524288")
    plain = predict(Candidate("ring", "striped", 8, 1, "fsdp2", False, 0, False), cfg, cl)
    assert plain.infeasible and "GiB per GPU" in plain.infeasible
    rescued = predict(Candidate("ring", "striped", 8, 1, "fsdp2", True, 4096, True), cfg, cl)
    assert rescued.infeasible is None and rescued.memory_bytes < cl.capacity_bytes
    assert rescued.memory_bytes < plain.memory_bytes


def test_cost_model_directions():
    cl = load_cluster(["cluster=a100"])
    cfg = _cfg("model=llama_1b", "data.seq_len=262144")

    def step(strategy, layout, **kw):
        args = dict(ulysses=1, engine="fsdp2", checkpointing=True, mlp_tile=0, offload=False)
        args.update(kw)
        return predict(Candidate(strategy, layout, 8, args["ulysses"], args["engine"], args["checkpointing"],
                                 args["mlp_tile"], args["offload"]), cfg, cl)

    # causal balance: the contiguous ring waits on its busiest rank at every step; striped does not
    assert step("ring", "contiguous").step_s > 1.3 * step("ring", "striped").step_s
    # recomputation costs time, offload costs PCIe time
    assert step("ring", "striped", checkpointing=False).step_s < step("ring", "striped").step_s
    assert step("ring", "striped", offload=True).step_s > step("ring", "striped").step_s
    # a ring's hops hide behind compute when the link is fast enough
    fast = load_cluster(["cluster=a100", "cluster.nvlink_gbps=100000", "cluster.nvlink_latency_us=0"])
    hidden = predict(Candidate("ring", "striped", 8, 1, "fsdp2", True, 0, False), cfg, fast)
    assert hidden.parts["cp_comm"] < 1e-5 * hidden.step_s  # only the last hop home is left
    # MFU stays a fraction
    assert 0 < step("ring", "striped").mfu < 1


def test_cli_json_and_errors(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "lctrain.plan.cli", "model=llama_1b", "data.seq_len=131072",
                           "cluster=h200", "--top", "3", "--json", str(out), "--png", str(tmp_path / "plan.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "best: torchrun --nproc-per-node=8 -m lctrain.train model=llama_1b data.seq_len=131072" in proc.stdout
    record = json.loads(out.read_text())
    assert record["best_command"] in proc.stdout and len(record["rows"]) > 100
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    # the installed console script exits 0 and prints only the plan
    script = Path(sys.executable).parent / "lctrain-plan"
    if script.exists():
        console = subprocess.run([str(script), "model=tiny", "data.seq_len=4096", "cluster=cpu_gloo", "--top", "2"],
                                 capture_output=True, text=True, timeout=120)
        assert console.returncode == 0 and not console.stderr.strip(), console.stderr[-2000:]
        assert "best: torchrun" in console.stdout and "Prediction(" not in console.stdout
    bad = subprocess.run([sys.executable, "-m", "lctrain.plan.cli", "cluster=v100"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "cluster='v100' is not a preset" in bad.stderr
    unknown = subprocess.run([sys.executable, "-m", "lctrain.plan.cli", "cluster.speed=3"], capture_output=True,
                             text=True, timeout=120)
    assert unknown.returncode == 2 and "cluster.speed is not a cluster field" in unknown.stderr


def test_windows_and_uneven_lengths():
    cl = load_cluster(["cluster=a100"])
    ring = Candidate("ring", "zigzag", 8, 1, "fsdp2", True, 0, False)
    # a length the layout does not divide is padded, as the trainer pads it
    odd = predict(ring, _cfg("data.seq_len=1000"), cl)
    assert odd.infeasible is None and odd.step_s > 0
    full = predict(ring, _cfg("model=llama_1b", "data.seq_len=262144"), cl)
    windowed = predict(ring, _cfg("model=llama_1b", "data.seq_len=262144", "model.window=4096"), cl)
    assert windowed.parts["attention"] < 0.1 * full.parts["attention"]
    assert windowed.parts["matmul"] == pytest.approx(full.parts["matmul"])


@pytest.mark.parametrize("layout,cp,window,real", [("contiguous", 2, 0, 1024), ("striped", 4, 0, 1024),
                                                   ("zigzag", 2, 0, 1000), ("striped", 2, 200, 1024)])
def test_tile_counts_are_the_kernels_tile_plan(layout, cp, window, real):
    """The planner's vectorised tile rule visits exactly the tiles torch_blockwise's plan visits,
    for every block a strategy computes (padding and windows included)."""
    import numpy as np
    import torch

    from lctrain.attention.layouts import get_layout
    from lctrain.plan.tiles import tile_counts
    from lctrain_kernels.mask import PAD_DOC, Coords, Mask, tile_fully_visible, tile_may_be_visible, tile_ranges

    seq, block = 1024, 64
    doc = np.zeros(seq, dtype=np.int64)
    doc[real:] = PAD_DOC
    mask = Mask(causal=True, window=window or None)
    lay = get_layout(layout, cp)
    shards = [(p.numpy(), doc[p.numpy()]) for p in (lay.positions(seq, r) for r in range(cp))]
    for q in shards:
        for k in shards:
            qr, kr = (tile_ranges(Coords(torch.from_numpy(x[0]), torch.from_numpy(x[1])), block) for x in (q, k))
            may = [(a, b) for a in qr for b in kr if tile_may_be_visible(a, b, mask)]
            full = sum(tile_fully_visible(a, b, mask) for a, b in may)
            assert tile_counts(q, k, mask, block, block) == (full, len(may) - full)


def test_tile_work_and_shared_cores():
    from lctrain.plan.cost import attention_work

    cfg = _cfg("model=tiny", "model.num_layers=2", "data.seq_len=8192", "trainer.dtype=float32")
    cl = load_cluster(["cluster=cpu_gloo", "cluster.gpus_per_node=2", "cluster.partial_tile_cost=2",
                       "cluster.alone_speedup=1"])
    ring = {lay: attention_work(Candidate("ring", lay, 2, 1, "ddp", False, 0, False), cl, 8192)
            for lay in ("contiguous", "striped")}
    uly = attention_work(Candidate("ulysses", "contiguous", 2, 1, "ddp", False, 0, False), cl, 8192)
    # 8192 tokens, 256-token tiles: 32 x 33 / 2 tiles, 32 of them on the diagonal (cost 2)
    assert uly.mean * 2 == (32 * 31 / 2 + 2 * 32) * 256**2 and uly.tiles == 32 * 33 / 2 and uly.calls == 1
    # a striped ring pays a diagonal per ring step: twice Ulysses' partial tiles per rank
    assert ring["striped"].lockstep == (2 * 16 * 15 / 2 + 2 * 2 * 16) * 256**2 and ring["striped"].calls == 2
    # the contiguous ring's busy rank computes a full block (no partial tiles) and a causal one
    assert ring["contiguous"].lockstep == (16 * 16 + 16 * 15 / 2 + 2 * 16) * 256**2
    # a rank computing while the other waits (the full block of ring step 1) runs alone_speedup faster
    alone = load_cluster(["cluster=cpu_gloo", "cluster.gpus_per_node=2", "cluster.partial_tile_cost=2",
                          "cluster.alone_speedup=2"])
    work = attention_work(Candidate("ring", "contiguous", 2, 1, "ddp", False, 0, False), alone, 8192)
    assert work.lockstep == (16 * 16 / 2 + 16 * 15 / 2 + 2 * 16) * 256**2
    # ranks beyond the cores: the node's total compute over its cores bounds the step
    four = ["cluster=cpu_gloo", "cluster.gpus_per_node=4"]
    c = Candidate("ring", "contiguous", 4, 1, "ddp", False, 0, False)
    own = predict(c, cfg, load_cluster(four + ["cluster.cores_per_node=4"])).step_s
    shared = predict(c, cfg, load_cluster(four + ["cluster.cores_per_node=2"])).step_s
    assert shared > own


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
def test_coarse_tile_grid_scales_to_the_exact_count(layout):
    """A shard of more than MAX_TILES_PER_SIDE tiles is counted on a coarse grid and scaled;
    the result matches the exact count at the real tile size."""
    import numpy as np

    from lctrain.attention.layouts import get_layout
    from lctrain.plan.cost import MAX_TILES_PER_SIDE, _tile_work
    from lctrain.plan.tiles import tile_work_matrix
    from lctrain_kernels.mask import Mask

    seq, cp, block = 65536, 2, 128
    assert seq // cp // block > MAX_TILES_PER_SIDE
    work, visited = _tile_work(layout, cp, seq, 0, block, 3.0)
    doc = np.zeros(seq, dtype=np.int64)
    exact = tile_work_matrix(get_layout(layout, cp), doc, Mask(causal=True), block, block, 3.0)
    exact_visited = tile_work_matrix(get_layout(layout, cp), doc, Mask(causal=True), block, block, 1.0) / block**2
    assert np.allclose(work, exact, rtol=0.01) and np.allclose(visited, exact_visited, rtol=0.01)
