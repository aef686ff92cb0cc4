"""Engines and the step they run, in one process (world size 1, no Ray): learning-rate schedule,
gradient accumulation and clipping, trainability per phase, and a checkpoint round trip that
continues exactly. The distributed versions run in test_engines_families.py, test_resume.py and
test_fault_tolerance.py."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jobs.train import checkpoints
from jobs.train.engines.deepspeed import MAX_BUCKET, MIN_BUCKET, deepspeed_config
from jobs.train.engines import DDPEngine, check_training_setup, lr_factor, make_optimizer
from jobs.spec import JobSpec, SchedulerSpec, SpecError, parse_spec
from jobs.train.loop import build_training, split, step_seed, to_device, train_step
from models.family import Phase

CPU = torch.device("cpu")


def make_spec(*overrides: str, workers: int = 1) -> JobSpec:
    base = ("name: t\nfamily: dcgan\ndata: {train: 'builtin:craters', resolution: 16}\n"
            "model: {nz: 8, ngf: 8, ndf: 8}\ntrain: {batch: 8, steps: 10}\n")
    return parse_spec(base, [f"scaling.num_workers={workers}", *overrides])


def linear_engine(spec: JobSpec, lr: float = 0.1) -> DDPEngine:
    torch.manual_seed(0)
    return DDPEngine(nn.Linear(4, 1), Phase("net", lr), CPU, spec, world_size=1)


def engine_step(engine: DDPEngine, x: torch.Tensor, y: torch.Tensor) -> None:
    with engine.micro_batch(), engine.autocast():
        loss = nn.functional.mse_loss(engine.wrapped(x), y)
    engine.step(loss)


def data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


# --------------------------------------------------------------------------- schedule
def test_lr_factor_is_the_family_schedule_times_warmup_and_cosine():
    phase = Phase("G", 1.0, lr_step_every=4, lr_gamma=0.5)
    f = lr_factor(phase, SchedulerSpec(kind="cosine", warmup_steps=2), total_steps=8)
    cosine = [0.5 * (1 + torch.cos(torch.tensor(torch.pi * n / 8)).item()) for n in range(8)]
    expected = [e * c * w for e, c, w in zip([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5], cosine, [0.5] + [1] * 7)]
    assert [f(n) for n in range(8)] == pytest.approx(expected)
    assert lr_factor(Phase("D", 1.0), SchedulerSpec(), 8)(5) == 1.0


def test_engine_applies_the_schedule_per_optimizer_step():
    spec = make_spec("train.scheduler.warmup_steps=4")
    engine = linear_engine(spec, lr=0.2)
    x, y = data()
    lrs = []
    for _ in range(5):
        lrs.append(engine.optimizer.param_groups[0]["lr"])
        engine_step(engine, x, y)
    assert lrs == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2])


# --------------------------------------------------------------------------- accumulation, clipping
def test_grad_accum_makes_the_update_of_one_full_batch():
    x, y = data()
    full = linear_engine(make_spec())
    engine_step(full, x, y)
    accum = linear_engine(make_spec("train.grad_accum=2"))
    before = accum.module.weight.detach().clone()
    engine_step(accum, x[:4], y[:4])
    assert torch.equal(accum.module.weight, before)   # no optimizer step before the boundary
    engine_step(accum, x[4:], y[4:])
    torch.testing.assert_close(accum.module.weight, full.module.weight)
    torch.testing.assert_close(accum.module.bias, full.module.bias)


@pytest.mark.parametrize("clip", [None, 0.01])
def test_grad_clip_bounds_the_gradient_the_optimizer_sees(clip):
    engine = linear_engine(make_spec(f"train.grad_clip={clip if clip else 'null'}"))
    seen = []
    engine.optimizer.register_step_pre_hook(
        lambda opt, *_: seen.append(torch.cat([p.grad.flatten() for p in engine.module.parameters()]).norm()))
    x, y = data()
    engine_step(engine, x, 100 * y)   # large targets: a gradient norm far above 0.01
    assert len(seen) == 1
    assert seen[0] <= 0.01 + 1e-6 if clip else seen[0] > 1


def test_split_and_to_device():
    batch = {"image": torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4) * 7,
             "cls": torch.tensor([3, 4])}
    out = to_device(batch, ("image", "cls"), CPU, channels_last=True)
    assert out["image"].dtype == torch.float32 and out["image"].is_contiguous(memory_format=torch.channels_last)
    assert -1 <= out["image"].min() and out["image"].max() <= 1 and out["cls"].dtype == torch.int64
    halves = split(out, 2)
    assert [h["cls"].tolist() for h in halves] == [[3], [4]]


# --------------------------------------------------------------------------- phases
def batches(n: int, batch: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(batch, 1, 16, 16, generator=g) * 2 - 1} for _ in range(n)]


def test_train_step_freezes_the_other_networks_before_their_forward():
    spec = make_spec()
    family, networks, phases, engines = build_training(spec, CPU, 1)
    frozen_at_forward: dict[str, list[bool]] = {"G": [], "D": []}
    for name, net in networks.items():
        net.register_forward_pre_hook(
            lambda m, _, name=name: frozen_at_forward[name].append(not any(p.requires_grad for p in m.parameters())))
    train_step(family, phases, engines, networks, batches(1)[0], step=0, device=CPU)
    # Phase G: G makes the step's one fake, trainable; D frozen. Phase D: D twice (real, fake), trainable.
    assert frozen_at_forward == {"G": [False], "D": [True, False, False]}
    assert all(p.requires_grad for net in networks.values() for p in net.parameters())   # resting state


# --------------------------------------------------------------------------- checkpoint round trip
def run_steps(spec, training, data, start: int, stop: int) -> None:
    family, networks, phases, engines = training
    for step in range(start, stop):
        torch.manual_seed(step_seed(spec.train.seed, 0, step))
        train_step(family, phases, engines, networks, data[step], step=step, device=CPU)


def state(training) -> dict[str, torch.Tensor]:
    _, networks, _, engines = training
    out = {f"{n}.{k}": v for n, net in networks.items() for k, v in net.state_dict().items()}
    for name, e in engines.items():
        for i, s in e.optimizer.state_dict()["state"].items():
            out.update({f"{name}.opt.{i}.{k}": v for k, v in s.items()})
    return out


def with_ema(training):
    """An extra network without an engine (as an EMA copy would be): it must round-trip too."""
    family, networks, phases, engines = training
    networks["G_ema"] = copy.deepcopy(networks["G"]).requires_grad_(False)
    return training


def test_checkpoint_round_trip_continues_exactly(tmp_path):
    spec = make_spec("train.scheduler.kind=cosine")
    data = batches(6)
    uninterrupted = with_ema(build_training(spec, CPU, 1))
    run_steps(spec, uninterrupted, data, 0, 6)

    first = with_ema(build_training(spec, CPU, 1))
    run_steps(spec, first, data, 0, 3)
    with torch.no_grad():
        first[1]["G_ema"].main[0].weight.mul_(0.5)   # the EMA moved on its own
    family, networks, _, engines = first
    checkpoints.write(tmp_path, rank=0, engines=engines, networks=networks, family=family, step=3, images_seen=24)
    assert checkpoints.progress(tmp_path) == {"step": 3, "images_seen": 24}

    torch.manual_seed(123)   # a different initialisation: everything must come from the checkpoint
    second = with_ema(build_training(spec.model_copy(update={"train": spec.train.model_copy(update={"seed": 5})}), CPU, 1))
    family2, networks2, _, engines2 = second
    assert checkpoints.read(tmp_path, engines=engines2, networks=networks2, family=family2) == {"step": 3, "images_seen": 24}
    torch.testing.assert_close(networks2["G_ema"].state_dict(), networks["G_ema"].state_dict())
    run_steps(spec, second, data, 3, 6)

    a, b = state(uninterrupted), state(second)
    a.pop("G_ema.main.0.weight"), b.pop("G_ema.main.0.weight")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    assert engines2["G"].scheduler.last_epoch == 6


# --------------------------------------------------------------------------- DeepSpeed config, spec
def test_deepspeed_config_follows_the_spec():
    spec = make_spec("train.batch=16", "train.grad_accum=2", "train.precision=bf16", "strategy.kind=deepspeed",
                     "strategy.zero_stage=2", "strategy.deepspeed={zero_optimization: {overlap_comm: true}}",
                     workers=2)
    c = deepspeed_config(spec, world_size=2)
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (16, 4, 2)
    bucket = c["zero_optimization"]["reduce_bucket_size"]
    assert c["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": bucket,
                                      "allgather_bucket_size": bucket}   # merged, not replaced
    # Gradients reduced in fp32 under DeepSpeed as under DDP: no module marked for bf16 communication.
    assert c["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in c and "communication_data_type" not in c
    assert c["gradient_clipping"] == 0.0   # DeepSpeed would clip at 1.0 unless told
    assert deepspeed_config(make_spec("train.grad_clip=0.5"), 1)["gradient_clipping"] == 0.5


def test_deepspeed_buckets_are_sized_from_the_network_unless_the_spec_sets_them():
    small, big = nn.Linear(10, 10), nn.Embedding(60_000, 1000)   # 110 and 6e7 parameters
    zero = lambda spec, m: deepspeed_config(spec, 1, m)["zero_optimization"]  # noqa: E731
    assert zero(make_spec(), small)["reduce_bucket_size"] == MIN_BUCKET
    assert zero(make_spec(), big)["allgather_bucket_size"] == MAX_BUCKET < 5e8   # not DeepSpeed's 2 GB default
    mid = nn.Linear(2000, 1000)
    assert zero(make_spec(), mid)["reduce_bucket_size"] == 2_001_000
    own = make_spec("strategy.deepspeed={zero_optimization: {reduce_bucket_size: 123}}")
    assert zero(own, mid)["reduce_bucket_size"] == 123 and zero(own, mid)["allgather_bucket_size"] == 2_001_000


@pytest.mark.parametrize("family, overrides, needle", [
    ("dcgan", ["model.r1_gamma=1"], "double backward"),
    ("stylegan2", [], "double backward"),
])
def test_compile_with_deepspeed_is_refused_where_a_penalty_needs_double_backward(family, overrides, needle):
    with pytest.raises(ValueError, match=needle):   # the spec itself is refused, on the driver
        family_spec(family, "train.compile=true", "strategy.kind=deepspeed", *overrides)
    # Allowed: DDP compiles a copy (the bare module stays eager), and without the penalty nothing needs it.
    ddp = family_spec(family, "train.compile=true", *overrides)
    check_training_setup(ddp, ddp.make_family())
    plain = family_spec("dcgan", "train.compile=true", "strategy.kind=deepspeed")
    check_training_setup(plain, plain.make_family())


def test_fp16_is_refused_for_stylegan2_in_one_line_and_bf16_is_not():
    with pytest.raises(ValueError, match=r"train\.precision fp16: the stylegan2 family trains only in fp32 or bf16"):
        family_spec("stylegan2", "train.precision=fp16")
    bf16 = family_spec("stylegan2", "train.precision=bf16")
    check_training_setup(bf16, bf16.make_family())
    dcgan = make_spec("train.precision=fp16")
    check_training_setup(dcgan, dcgan.make_family())   # others keep fp16 (on GPU)


def family_spec(family: str, *overrides: str) -> JobSpec:
    from models.registry import get_family_cls

    tiny = [f"{k}={'null' if v is None else v}" for k, v in get_family_cls(family).tiny.items()]
    base = f"name: t\nfamily: {family}\ndata: {{train: 'builtin:craters'}}\ntrain: {{batch: 8, steps: 10}}\n"
    return parse_spec(base, ["scaling.num_workers=1", *tiny, *overrides])


def test_gpu_switches_are_spec_keys_that_change_nothing_on_cpu():
    spec = make_spec()
    assert (spec.train.cudnn_benchmark, spec.train.fused_adam, spec.train.channels_last) == (True, True, False)
    off = make_spec("train.cudnn_benchmark=false", "train.fused_adam=false")
    assert (off.train.cudnn_benchmark, off.train.fused_adam) == (False, False)
    assert "fused" not in linear_engine(spec).optimizer.defaults or not linear_engine(spec).optimizer.defaults["fused"]


def test_fused_adam_takes_the_same_step_as_the_loop_adam():
    """What the DDP engine builds on a GPU, checked where fused Adam also runs (CPU, torch >= 2.4)."""
    spec = make_spec()
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    b.load_state_dict(a.state_dict())
    phase = Phase("net", 0.1, (0.0, 0.99))
    opts = [make_optimizer([list(a.parameters())], phase, spec.train),
            make_optimizer([list(b.parameters())], phase, spec.train, fused=True)]
    x, y = data()
    for _ in range(3):
        for net, opt in zip((a, b), opts):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overrides, field", [
    (["train.grad_accum=3"], "train.grad_accum"),
    (["checkpoint.best_metric=lpips"], "checkpoint.best_metric"),
    (["strategy.zero_stage=3"], "strategy.zero_stage"),
    (["train.scheduler.kind=linear"], "train.scheduler.kind"),
])
def test_spec_rejects_what_the_engines_cannot_do(overrides, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        make_spec(*overrides)


def test_step_seeds_of_ranks_never_coincide():
    """Every (rank, step) of a long run has its own noise seed (the old linear mix gave rank r at
    step s the seed of rank r+1 at step s − 7,919), and the seed depends on the tuple only."""
    ranks, steps = 8, 20_000
    seeds = {step_seed(0, r, s) for r in range(ranks) for s in range(steps)}
    assert len(seeds) == ranks * steps
    assert step_seed(0, 0, 7_919) != step_seed(0, 1, 0)
    assert step_seed(3, 2, 10) == step_seed(3, 2, 10) != step_seed(4, 2, 10)
    assert all(0 <= step_seed(s, r, t) < 2**63 for s, r, t in [(0, 0, 0), (2**40, 63, 10**9)])


# --------------------------------------------------------------------------- rank 0's solo work
def _solo_work_rank(rank: int, port: int, use_on_rank0: bool, out) -> None:
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from jobs.train.loop import _from_rank0, _on_rank0

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=1))   # the run's collective timeout, scaled down
    try:
        def work():
            time.sleep(2.5)   # longer than the timeout
            return {"chosen": "vgg16"}

        def broken():
            raise OSError("no weights")
        if use_on_rank0:
            run = _on_rank0(2, rank, timeout_s=60)
            result = run(work)
            try:   # a failure on rank 0 reaches rank 1 at once, not after the long timeout
                run(broken)
            except (OSError, RuntimeError) as e:
                result = {**result, "then": type(e).__name__}
        else:
            result = _from_rank0(2)(work() if rank == 0 else None)
        out.put((rank, result))
    except Exception as e:   # noqa: BLE001 - the control case must report its failure
        out.put((rank, f"failed: {type(e).__name__}"))


@pytest.mark.parametrize("use_on_rank0", [True, False])
def test_rank0_solo_work_outlasts_the_collective_timeout_only_through_on_rank0(use_on_rank0):
    """Two gloo processes, a 1 s collective timeout and 2.5 s of work on rank 0: `on_rank0` hands the
    result to rank 1; a plain broadcast after the work (the control) times out on rank 1. Spawned:
    a fork of a test process that earlier tests left with threads (Ray's, gRPC's) can hang."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_solo_work_rank, args=(r, port, use_on_rank0, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if use_on_rank0:
        assert results == {0: {"chosen": "vgg16", "then": "OSError"}, 1: {"chosen": "vgg16", "then": "RuntimeError"}}
    else:
        assert str(results[1]).startswith("failed"), results
