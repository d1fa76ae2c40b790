"""DHSPG and HESSO on sharded parameters (otofx.distributed): FSDP2 and tensor parallelism on gloo.

2 and 4 CPU processes train tiny models under ``fully_shard`` (and a ColwiseParallel/RowwiseParallel
Linear pair) and must give the parameters, zero rows and group sparsity of one process on the full
batch; a distributed checkpoint resumes bit-identically; a sharded model compresses and saves.
On a 2x2 ("dp", "tp") mesh, FSDP over tensor parallel (strided shards, a layer on the "dp" submesh)
and HSDP (a replica dim) must give the same, with the rows' reduced sums equal to one process's
(a replica counted twice shows there). The layers' widths do not divide by the rank count (uneven
shards; with 4 ranks one shard of the last layer is empty), and rows run across shards (a
consumer's input columns in dim-0 shards).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from helpers import triton_interpreter_unusable
from test_kernels import layouts
from torch import nn

import otofx
from otofx import kernels
from otofx.errors import OTOError

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo unavailable")

STEPS = 26
BATCH = 4


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _data(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _full_batch(step: int, world: int):
    xs, ys = zip(*[_data(step, r) for r in range(world)])
    return torch.cat(xs), torch.cat(ys)


# every optimizer as a function of (oto, backend)
OPTS = {
    "dhspg_sgd": lambda oto, b: oto.dhspg(lr=0.1, first_momentum=0.5, start_pruning_steps=3, pruning_steps=12,
                                         backend=b),
    "dhspg_adamw": lambda oto, b: oto.dhspg(lr=0.01, variant="adamw", start_pruning_steps=3, pruning_steps=12,
                                           backend=b),
    "hesso": lambda oto, b: oto.hesso(lr=0.1, first_momentum=0.5, start_pruning_step=3, pruning_steps=12,
                                      pruning_periods=3, backend=b),
}


def _train(model, opt, batches, steps):
    for t in steps:
        x, y = batches(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _record(model, opt) -> dict:
    """Full parameters (a collective for DTensors), the rows' ||x||^2 and zero mask, the group sparsity."""
    full = {k: (v.full_tensor() if otofx.distributed.is_dtensor(v) else v).detach().clone()
            for k, v in model.named_parameters()}
    xx = opt.row_stats().xx.cpu()  # reduced over the ranks: a replica counted twice shows here
    return {"params": full, "zero": xx == 0, "xx": xx, "sparsity": opt.group_sparsity}


class TPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    forward = MLP.forward


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for m in (model.fc1, model.fc2, model.fc3):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _tensor_parallel(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    # fc1's rows fall along its dim-0 shards (and fc2's dim-1 shards); fc2's rows run across its
    # dim-1 shards, its bias is replicated and fc3 stays a plain (replicated) tensor
    return parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})


def _fresh(seed=0, cls=MLP):
    torch.manual_seed(seed)
    model = cls()
    return model, otofx.OTO(model, torch.randn(2, 6))


def _trained(name, backend, shard, batch, cls=MLP):
    """(model, optimizer, record): a fresh model, sharded by ``shard(model)``, trained STEPS steps with
    optimizer ``name`` on ``batch(step)``."""
    model, oto = _fresh(cls=cls)
    shard(model)
    opt = OPTS[name](oto, backend)
    _train(model, opt, batch, range(STEPS))
    return model, opt, _record(model, opt)


def _checkpoint_and_compress(rank, mesh, out, backend):
    """Train, save a distributed checkpoint, go on; a fresh run loads it and must continue alike."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from otofx.distributed import load_optimizer_state_dict, optimizer_state_dict

    ckpt, group = os.path.join(out, "ckpt"), mesh.get_group()
    batches = lambda t: _data(t, rank)  # noqa: E731
    model, oto = _fresh()
    _shard(model, mesh)
    opt = OPTS["dhspg_adamw"](oto, backend)
    _train(model, opt, batches, range(10))
    dcp.save({"model": get_model_state_dict(model), "optim": optimizer_state_dict(model, opt)}, checkpoint_id=ckpt,
             process_group=group)
    _train(model, opt, batches, range(10, STEPS))
    first = _record(model, opt)

    model2, oto2 = _fresh(seed=1)  # other weights: all must come from the checkpoint
    _shard(model2, mesh)
    opt2 = OPTS["dhspg_adamw"](oto2, backend)
    sd = {"model": get_model_state_dict(model2), "optim": optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=ckpt, process_group=group)
    set_model_state_dict(model2, sd["model"])
    load_optimizer_state_dict(model2, opt2, sd["optim"])
    assert opt2._t == 10 and opt2.redundant is not None
    _train(model2, opt2, batches, range(10, STEPS))
    second = _record(model2, opt2)

    small = oto.compress()  # on every rank: gathers the full tensors
    otofx.distributed.compress(oto, os.path.join(out, "small"), rank=0)
    if rank == 0:
        torch.save({"first": first, "second": second, "small_out": small(torch.ones(3, 6)).detach(),
                    "n_small": sum(p.numel() for p in small.parameters())}, os.path.join(out, "ckpt.pt"))


def _run_all(rank, world, mesh, out, backend):
    res = {name: _trained(name, backend, lambda m: _shard(m, mesh), lambda t: _data(t, rank))[2] for name in OPTS}
    # TP: every rank sees the whole batch
    res["tp"] = _trained("dhspg_sgd", backend, lambda m: _tensor_parallel(m, mesh), lambda t: _full_batch(t, world),
                         cls=TPNet)[2]
    torch.save(res, os.path.join(out, f"{world}_{rank}.pt"))


def _fsdp_over_tp(model, mesh):
    """LLM-style 2-D: tensor parallel on mesh["tp"], then FSDP on mesh["dp"]: fc1's weight is
    (_StridedShard(0), Shard(0)), fc2's (Shard(0), Shard(1)), its bias (Shard(0), Replicate()); fc3,
    which TP left plain, lives on the 1-D mesh["dp"] (its copies: the sibling submeshes)."""
    from torch.distributed.fsdp import fully_shard

    _tensor_parallel(model, mesh["tp"])
    for m in (model.fc1, model.fc2, model.fc3, model):
        fully_shard(m, mesh=mesh["dp"])
    return model


def _hsdp(model, mesh):
    """fully_shard on the 2-D mesh: every parameter (Replicate(), Shard(0))."""
    from torch.distributed.fsdp import fully_shard

    for m in (model.fc1, model.fc2, model.fc3, model):
        fully_shard(m, mesh=mesh)
    return model


def _run_2d(rank, out, backend):
    """A 2x2 ("dp", "tp") mesh: FSDP over TP (the batch split over "dp") and HSDP (over all four)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh.get_coordinate()[0]
    res = {}
    for name in OPTS:
        model, opt, res["fsdp_tp", name] = _trained(name, backend, lambda m: _fsdp_over_tp(m, mesh),
                                                    lambda t: _data(t, dp))
    # a NaN in one rank's shard of a gradient: every rank skips the step (the max all-reduced flag)
    before = res["fsdp_tp", name]["params"]
    x, y = _data(STEPS, dp)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if rank == 3:
        otofx.distributed.local(model.fc1.weight.grad).view(-1)[0] = float("nan")
    opt.step()
    after = _record(model, opt)["params"]
    res["nan_skipped"] = (opt.skipped_steps, all(torch.equal(after[k], v) for k, v in before.items()))
    for name in ("dhspg_adamw", "hesso"):
        res["hsdp", name] = _trained(name, backend, lambda m: _hsdp(m, mesh), lambda t: _data(t, rank))[2]
    torch.save(res, os.path.join(out, f"2d_{rank}.pt"))


def _shape_disagrees_on_one_rank(rank, out):
    """Rank 2's shard does not match its placements: every rank raises (none is left waiting)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from otofx.distributed import Shards, ShardingError

    mesh = init_device_mesh("cpu", (4,))
    t = DTensor.from_local(torch.zeros(3 if rank == 2 else 2, 3), mesh, [Shard(0)], run_check=False,
                           shape=torch.Size([8, 3]), stride=(3, 1))
    try:
        Shards([t], ["blocks.0.w"])
        got = None
    except ShardingError as e:
        got = str(e)
    torch.save(got, os.path.join(out, f"disagree_{rank}.pt"))


def _worker(rank: int, init: str, out: str) -> None:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=4)
    try:
        # 4 ranks, the torch reference kernels
        _run_all(rank, 4, init_device_mesh("cpu", (4,)), out, "torch")
        # 2-D meshes on the 4 ranks, the default kernels
        _run_2d(rank, out, None)
        _shape_disagrees_on_one_rank(rank, out)
        # 2 of them, the default kernels (the C kernel), then checkpoint, resume and compress; HSDP on
        # a 1x2 mesh of those two (its sums reduce in a group of their own)
        pair = dist.new_group([0, 1])
        mesh_1x2 = DeviceMesh("cpu", torch.tensor([[0, 1]]), mesh_dim_names=("replicate", "shard"))
        if rank < 2:
            mesh = DeviceMesh.from_group(pair, "cpu")
            _run_all(rank, 2, mesh, out, None)
            _checkpoint_and_compress(rank, mesh, out, None)
            rec = _trained("dhspg_sgd", None, lambda m: _hsdp(m, mesh_1x2), lambda t: _data(t, rank))[2]
            torch.save(rec, os.path.join(out, f"hsdp_1x2_{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _single(name: str, world: int) -> dict:
    return _trained("dhspg_sgd" if name == "tp" else name, None, lambda m: None, lambda t: _full_batch(t, world),
                    cls=TPNet if name == "tp" else MLP)[2]


def _same(got: dict, ref: dict, what: str) -> None:
    assert torch.equal(got["zero"], ref["zero"]), f"{what}: zero rows differ"
    assert bool(ref["zero"].any()), f"{what}: no row reached zero (vacuous)"
    assert got["sparsity"] == ref["sparsity"], what
    torch.testing.assert_close(got["xx"], ref["xx"], rtol=1e-4, atol=1e-6, msg=f"{what}: row sums")
    for k, v in ref["params"].items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-4, atol=2e-6, msg=f"{what}: {k}")
        assert torch.equal(got["params"][k] == 0, v == 0), f"{what}: {k}: zeros differ"


def test_sharded_training_equals_one_process(tmp_path):
    """One spawn of 4 processes (imports dominate the run time): 4 ranks (a 1-D mesh, then 2x2 meshes), then
    2 of them."""
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=4, join=True)
    refs = {}

    def single(name, world):  # the one-process references, shared by the 1-D and 2-D cases
        if (name, world) not in refs:
            refs[name, world] = _single(name, world)
        return refs[name, world]

    for world in (4, 2):
        ranks = [torch.load(tmp_path / f"{world}_{r}.pt") for r in range(world)]
        for name in (*OPTS, "tp"):
            ref = single(name, world)
            for r, res in enumerate(ranks):
                _same(res[name], ref, f"{name}, rank {r} of {world}")
    # 2-D: FSDP over TP sees the batch of its "dp" coordinate (2 batches), HSDP one per rank (4)
    ranks = [torch.load(tmp_path / f"2d_{r}.pt") for r in range(4)]
    for r, res in enumerate(ranks):
        assert res.pop("nan_skipped") == (1, True), f"rank {r}: the NaN step was not skipped by every rank"
    errors = [torch.load(tmp_path / f"disagree_{r}.pt") for r in range(4)]
    assert all(errors), f"a rank went on while another could not read its shard: {errors}"
    assert "'blocks.0.w'" in errors[2] and "(3, 3)" in errors[2] and "another rank" in errors[0]
    for (how, name) in ranks[0]:
        ref = single(name, 2 if how == "fsdp_tp" else 4)
        for r, res in enumerate(ranks):
            _same(res[how, name], ref, f"{how}, {name}, rank {r} of 4")
    ref = single("dhspg_sgd", 2)
    for r in range(2):
        _same(torch.load(tmp_path / f"hsdp_1x2_{r}.pt"), ref, f"hsdp on 1x2, rank {r} of 2")
    ck = torch.load(tmp_path / "ckpt.pt")
    # resumed from the distributed checkpoint: bit-identical to the run that went on
    for k, v in ck["first"]["params"].items():
        assert torch.equal(ck["second"]["params"][k], v), k
    assert torch.equal(ck["first"]["zero"], ck["second"]["zero"]) and ck["first"]["sparsity"] >= 0.5
    # the compressed model (written by rank 0 with otofx.save) equals the trained model with its zeros
    model, _ = _fresh()
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(ck["first"]["params"][k])
    small = otofx.load(tmp_path / "small", model=MLP())
    x = torch.ones(3, 6)
    ref = model(x)
    torch.testing.assert_close(small(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ck["small_out"], ref, rtol=1e-4, atol=1e-4)
    assert ck["n_small"] == sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


# -- the row kernels on shards, in one process ----------------------------------------------------

def _chunk(size: int, world: int, c: int):
    """``(start, length)`` of chunk c of ``world`` (torch.chunk's split, as DTensor's Shard)."""
    per = -(-size // world) if size else 0
    lo = min(c * per, size)
    return lo, min(lo + per, size) - lo


def _strided(size: int, world: int, c: int, sf: int) -> torch.Tensor:
    """The global indices shard c holds under ``_StridedShard(split_factor=sf)``: the tensor in sf
    chunks, each in ``world``; chunk c of every one (FSDP over TP, written left to right)."""
    parts = []
    for j in range(sf):
        lo, n = _chunk(size, sf, j)
        a, m = _chunk(n, world, c)
        parts.append(torch.arange(lo + a, lo + a + m))
    return torch.cat(parts)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@settings(max_examples=15)
@given(layouts(), st.integers(2, 4), st.data())
def test_shard_sums_and_write_back_equal_the_whole(backend, lay, world, data):
    """Every tensor split along a drawn dim (in torch.chunk pieces, or strided as FSDP over TP shards:
    restrict's global-index form; or replicated: only copy 0 enters the sums) in ``world`` shards: the
    shards' row sums add up to the whole rows', and the write-back of given row values
    on each shard is the slice of the whole write-back."""
    from otofx.distributed import restrict

    if backend == "cpu" and not kernels.cpu_available():
        pytest.skip("no C compiler")
    if backend == "triton":
        why = triton_interpreter_unusable() if os.environ.get("TRITON_INTERPRET") == "1" else "not on the interpreter"
        if why:
            pytest.skip(why)
    shapes, groups = lay
    whole = kernels.build_layout(shapes, groups)
    row_dims = [sorted({d % len(shapes[u]) for _, es in groups for u, d, _ in es if u == t}) for t in range(len(shapes))]
    # mostly along a dim that rows own (the interesting case), else any dim, or replicated (-1)
    split = [data.draw(st.sampled_from(dims + dims + [-1] + list(range(len(s))))) for dims, s in zip(row_dims, shapes)]
    strided = [data.draw(st.sampled_from([1, 2, 3])) for _ in shapes]  # split factors (1: a plain Shard)
    g = torch.Generator().manual_seed(world)
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ds = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    coef = torch.rand(whole.n_rows, generator=g, dtype=torch.float64)
    scale = (torch.rand(whole.n_rows, generator=g) > 0.3).double()
    want = [x.clone() for x in xs]
    kernels.apply(whole, want, ds, 0.1, coef, scale, backend="torch")
    ref = kernels.row_stats(whole, xs, ds)
    total = [torch.zeros(whole.n_rows, dtype=torch.float64) for _ in range(3)]
    for c in range(world):
        ranges = [tuple((_strided(n, world, c, strided[t]) if strided[t] > 1 else _chunk(n, world, c))
                        if d == split[t] else (0, n) for d, n in enumerate(s)) for t, s in enumerate(shapes)]
        held = [[r if torch.is_tensor(r) else torch.arange(r[0], r[0] + r[1]) for r in rs] for rs in ranges]

        def sl(ts):
            out = []
            for t, hs in zip(ts, held):
                for d, h in enumerate(hs):
                    t = t.index_select(d, h)
                out.append(t.contiguous())
            return out

        lx, ld = sl(xs), sl(ds)
        local_shapes = [tuple(len(h) for h in hs) for hs in held]
        include = [split[t] >= 0 or c == 0 for t in range(len(shapes))]
        lay_all = kernels.build_layout(local_shapes, restrict(groups, ranges), partial=True, row_len=whole.row_len)
        lay_sum = kernels.build_layout(local_shapes, restrict(groups, ranges, include), partial=True,
                                       row_len=whole.row_len)
        try:
            st_ = kernels.stats(lay_sum, lx, ld, backend=backend)
        except OTOError:  # a row pattern this backend does not take (the C kernel: 3 row axes)
            assume(False)
        for acc, v in zip(total, (st_.xx, st_.xd, st_.dd)):
            acc += v
        kernels.apply(lay_all, lx, ld, 0.1, coef, scale, backend=backend)
        for got, exp in zip(lx, sl(want)):
            torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
    for acc, exp in zip(total, (ref.xx, ref.xd, ref.dd)):
        torch.testing.assert_close(acc, exp, rtol=1e-12, atol=1e-12)


class _Mesh2D:  # what otofx.distributed reads of a 2x2 ("dp", "tp") DeviceMesh, at coordinate (1, 0)
    ndim, mesh_dim_names, mesh = 2, ("dp", "tp"), torch.arange(4).reshape(2, 2)

    def get_coordinate(self):
        return [1, 0]

    def size(self, i):
        return 2


class _Param:  # what otofx.distributed reads of a DTensor parameter
    def __init__(self, shape, placements, local_shape):
        self.shape, self.placements, self.device_mesh = torch.Size(shape), placements, _Mesh2D()
        self._local = torch.zeros(local_shape)

    def to_local(self):
        return self._local


def test_placements_give_local_positions_or_a_clear_error():
    """FSDP over TP (a strided shard on the TP shard's dim), HSDP's replica, and a placement that
    cannot be taken: the error names the parameter, the placement and its mesh dim, and what to do."""
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    from otofx.distributed import ShardingError, _local_ranges

    # rows 0..9: "tp" in 5 and 5, "dp" in 3 and 2 of each; (dp 1, tp 0) holds rows 3, 4
    held, contributes = _local_ranges(_Param((10, 6), (_StridedShard(0, split_factor=2), Shard(0)), (2, 6)), "w")
    assert held == ((3, 2), (0, 6)) and contributes
    held, contributes = _local_ranges(_Param((10,), (_StridedShard(0, split_factor=2), Replicate()), (4,)), "b")
    assert torch.equal(held[0], torch.tensor([3, 4, 8, 9])) and contributes
    held, contributes = _local_ranges(_Param((10, 6), (Replicate(), Shard(1)), (10, 3)), "w")
    assert held == ((0, 10), (0, 3)) and not contributes  # a replica on "dp" coordinate 1: counted on 0 only
    with pytest.raises(ShardingError, match=r"'fc2.weight'.*Partial.*mesh dim 1 \('tp'\).*redistribute"):
        _local_ranges(_Param((10, 6), (Shard(0), Partial()), (5, 6)), "fc2.weight")
    with pytest.raises(ShardingError, match=r"'fc2.weight'.*\(4, 6\).*\(5, 6\)"):
        _local_ranges(_Param((10, 6), (Shard(0), Replicate()), (4, 6)), "fc2.weight")
