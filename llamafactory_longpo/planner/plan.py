"""Per-rank peak memory of a run: traced activations, DeepSpeed's model-state formulas, a fit verdict.

How a prediction is made (:func:`estimate`):

1. Trace the step (:mod:`.step`, :mod:`.trace`) at two reduced depths; every part of the peak and the
   step's FLOPs are linear in depth (each layer adds its parameters, its checkpointed input and its
   share of compute; one layer is recomputed at a time), so two depths give the full-depth values.
2. Sequence parallelism (Ulysses): each rank holds ``1/P`` of every row's tokens for all heads, or
   inside attention all tokens for ``1/P`` of the heads as padded for ``P`` ranks (``train.sequence_parallel.
   padded_heads``: Qwen2.5-7B's 28 query heads are 32 at ``P`` = 8, its 4 KV heads 8). The memory trace runs
   rows of ``T/P`` tokens with the padded heads in attention, the same bytes; the FLOPs come from a trace of
   whole rows with the padded heads (attention is quadratic in ``T``, and the zero queries cost as much).
3. Model states: without DeepSpeed, as traced (the toolkit keeps trainable weights in fp32 with bf16
   autocast; AdamW keeps two states per weight). With DeepSpeed, ZeRO's formulas (Rajbhandari et al.,
   2020, arXiv 1910.02054; DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs``, whose totals these
   equal): bf16 weights (2 B per parameter), gradients (ZeRO-2: bf16 + fp32, 6 B; ZeRO-3: 4 B), fp32 master
   weights and Adam moments (12 B) per trainable parameter, partitioned over the ranks by stage, and under
   ZeRO-3 the largest gathered layer (4 B per parameter) on top.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from ..checks import GIB, size
from .attention import gpu_attention
from .step import DEFAULT_RESPONSE_TOKENS, Lengths, RunConfig, StepSetup, autocast_context, step_setup
from .trace import GRADIENTS, KINDS, OPTIMIZER, REAL_LIMIT, REFERENCE, WEIGHTS, StepTrace, fake_mode, trace_step

NOT_MODELLED = (
    "not modelled: allocator fragmentation and cache, CUDA context, NCCL buffers, cuBLAS/cuDNN workspaces, "
    "DeepSpeed bucket and prefetch buffers, padding (rows are traced at full length)"
)


@dataclass
class ModelCounts:
    """Parameter counts at full depth (linear in depth, like everything else here)."""

    total: float
    trainable: float
    largest_layer: float
    largest_trainable: bool


@dataclass
class DepthTrace:
    """One traced depth: peak parts of the forward/backward and of the optimizer step, FLOPs, counts."""

    layers: int
    fwd_bwd: dict[str, int]
    optimizer_step: dict[str, int]
    flops: int
    counts: ModelCounts
    transient: dict[str, float]  # see StepTrace
    reference_weights: float = 0.0  # bytes of a separate reference model's weights (inside the reference part)
    host: float = 0.0  # offloaded checkpoint inputs in host memory at their most (see StepTrace)
    moved: float = 0.0  # bytes the offload hooks copied to the host and back in the step


@dataclass(frozen=True)
class Node:
    """What the planner assumes of each node; the report states every value.

    ``pcie_gbps``: GB/s each way between one GPU and pinned host memory (25: what a PCIe 4.0 x16 link sustains;
    PCIe 5.0 hosts reach about twice that). ``tflops``: dense bf16 TFLOP/s one GPU sustains in training (400:
    40% of an H100's 989)."""

    gpus: int = 8  # GPUs per node: the ranks whose offloaded inputs share one host's memory
    host_gib: Optional[float] = None  # host memory per node for the verdict (None: not checked)
    pcie_gbps: float = 25.0
    tflops: float = 400.0


@dataclass
class Estimate:
    """Predicted peak of one rank at one length, with its parts (bytes), the step's FLOPs and what the rank puts
    in host memory: offloaded checkpoint inputs (``host_activations``, their copies down and up: ``moved``) and,
    per node, the model states DeepSpeed offloads (``host_states``)."""

    length: int
    parts: dict[str, float]
    flops: float
    counts: ModelCounts
    device_bytes: Optional[float] = None
    sp: int = 1
    host_activations: float = 0.0
    moved: float = 0.0
    host_states: float = 0.0
    node: Node = Node()

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def host_per_node(self) -> float:
        return self.node.gpus * self.host_activations + self.host_states

    @property
    def host_fits(self) -> Optional[bool]:
        return None if self.node.host_gib is None else self.host_per_node <= self.node.host_gib * GIB

    @property
    def pcie_seconds(self) -> float:
        """Seconds one rank's offload copies take at the node's PCIe rate (down and up share no direction)."""
        return self.moved / 2 / (self.node.pcie_gbps * 1e9)

    @property
    def compute_seconds(self) -> float:
        """Seconds of one rank's share of the step's FLOPs (``1/P`` of each row under sequence parallelism)."""
        return self.flops / self.sp / (self.node.tflops * 1e12)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.device_bytes is None else self.total <= self.device_bytes

    @property
    def largest(self) -> str:
        return max(self.parts, key=lambda k: self.parts[k])


def _counts(model: torch.nn.Module) -> ModelCounts:
    seen: dict[int, torch.nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    largest, largest_trainable = 0, False
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        size = sum(p.numel() for p in own)
        if size > largest:
            largest, largest_trainable = size, any(p.requires_grad for p in own)
    return ModelCounts(total, trainable, largest, largest_trainable)


def traced_step(run: RunConfig, setup: StepSetup, layers: int) -> StepTrace:
    """Peak parts and FLOPs of one steady-state step (the optimizer's states already made); fake or real."""
    setup.warm_optimizer()
    autocast = autocast_context(run)

    def step() -> None:
        with autocast:
            setup.run_step()

    track = [setup.model, setup.optimizer, setup.batch]
    return trace_step(step, setup.optimizer_step, track, run.model_config.vocab_size, layers, reference=setup.ref_model)


def bookkeeping_limit(run: RunConfig, lengths: Lengths) -> int:
    """The most elements of an integer or boolean tensor the trace computes for real: 4M, or four full-length rows
    per sample of the micro-batch when that is more. The batch's token ids and labels, the packed rows of a shared
    prefix and the scored-token masks are that big at any length, and the code under trace decides from their
    values (a fake one has none: ``.item()`` of it fails); a ``[T, T]`` mask is ``T`` times bigger and stays fake."""
    return max(REAL_LIMIT, 4 * run.training_args.per_device_train_batch_size * lengths.long)


def trace_depth(
    run: RunConfig,
    layers: int,
    lengths: Lengths,
    attention: Optional[str],
    sp: int = 1,
    spec_changes: Optional[dict] = None,
) -> DepthTrace:
    """Trace one step of the run at ``layers`` layers on fake tensors (``attention``: see :func:`estimate`; ``sp``:
    attention on the heads as padded for that many sequence-parallel ranks; ``spec_changes``: see
    :func:`.step.traced_spec`)."""
    from ..train.sequence_parallel import local_head_padding

    with (
        fake_mode(bookkeeping_limit(run, lengths)),
        gpu_attention() if attention is None else nullcontext(),
        step_setup(run, layers, lengths, attention or "sdpa", spec_changes=spec_changes) as setup,
        local_head_padding(setup.model, sp) if sp > 1 else nullcontext(),
    ):
        traced = traced_step(run, setup, layers)
        ref = setup.ref_model
        ref_bytes = sum(t.nbytes for t in [*ref.parameters(), *ref.buffers()]) if ref is not None else 0
        counts = _counts(setup.model)
        moved = setup.offloaded.down + setup.offloaded.up if setup.offloaded is not None else 0
        return DepthTrace(
            layers, traced.fwd_bwd, traced.optimizer_step, traced.flops, counts, traced.transient, ref_bytes, traced.host, moved
        )


def _extrapolate(a: float, b: float, la: int, lb: int, layers: int) -> float:
    return a + (b - a) * (layers - la) / (lb - la)


def trace_depths(run: RunConfig, full_layers: int) -> tuple[int, int]:
    """The two depths traced: 2 and 3 layers (the first and last layer may differ from the middle ones)."""
    return (2, 3) if full_layers > 3 else (max(1, full_layers - 1), full_layers)


def scaled_trace(
    run: RunConfig,
    lengths: Lengths,
    attention: Optional[str],
    layers: Optional[int] = None,
    sp: int = 1,
    spec_changes: Optional[dict] = None,
) -> DepthTrace:
    """The step at full depth (``layers``, default the model's), from traces at two reduced depths."""
    full = layers or run.model_config.num_hidden_layers
    la, lb = trace_depths(run, full)
    if la == lb:
        return trace_depth(run, full, lengths, attention, sp, spec_changes)
    a = trace_depth(run, la, lengths, attention, sp, spec_changes)
    b = trace_depth(run, lb, lengths, attention, sp, spec_changes)

    def parts(x: dict[str, int], y: dict[str, int]) -> dict[str, float]:
        return {k: max(0.0, _extrapolate(x[k], y[k], la, lb, full)) for k in KINDS}

    ca, cb = a.counts, b.counts
    counts = ModelCounts(
        _extrapolate(ca.total, cb.total, la, lb, full),
        _extrapolate(ca.trainable, cb.trainable, la, lb, full),
        max(ca.largest_layer, cb.largest_layer),
        cb.largest_trainable,
    )
    return DepthTrace(
        full,
        parts(a.fwd_bwd, b.fwd_bwd),
        parts(a.optimizer_step, b.optimizer_step),
        _extrapolate(a.flops, b.flops, la, lb, full),
        counts,
        parts(a.transient, b.transient),
        _extrapolate(a.reference_weights, b.reference_weights, la, lb, full),
        _extrapolate(a.host, b.host, la, lb, full),
        _extrapolate(a.moved, b.moved, la, lb, full),
    )


def zero_model_states(run: RunConfig, counts: ModelCounts, world: int) -> dict[str, float]:
    """Weights, gradients and optimizer states per rank under DeepSpeed (see the module docstring)."""
    z = run.zero
    psi, psi_t = counts.total, counts.trainable
    shard = world if z.stage >= 3 else 1
    grad_shard = world if z.stage >= 2 else 1
    weights = 2 * psi / shard
    if z.stage >= 3:
        weights = (0 if z.offload_param else weights) + (4 if counts.largest_trainable else 2) * counts.largest_layer
    if z.offload_optimizer or z.offload_param:
        return {WEIGHTS: weights, GRADIENTS: 0.0, OPTIMIZER: 0.0}
    # ZeRO-2 holds bf16 and fp32 gradient partitions (18 B per parameter with the 12 of the optimizer, and the
    # bf16 weights whole); ZeRO-3 counts 18 B per parameter in all, its bf16 weights partition among them
    fp32_grads = 4 if z.stage < 3 else 2
    grads = 2 * psi_t / grad_shard + fp32_grads * psi_t / (world if z.stage >= 1 else 1)
    optimizer = 12 * psi_t / (world if z.stage >= 1 else 1)
    return {WEIGHTS: weights, GRADIENTS: grads, OPTIMIZER: optimizer}


def zero_host_states(run: RunConfig, counts: ModelCounts, world: int) -> float:
    """Bytes of model states one rank's DeepSpeed keeps in host memory: with ``offload_optimizer``, fp32 master
    weights, Adam moments and fp32 gradients (16 B per trainable parameter); with ``offload_param``, the bf16
    weights (2 B per parameter); partitioned over the ranks (the 18 B per parameter of DeepSpeed's
    ``estimate_zero3_model_states_mem_needs`` with both, before its 1.5 buffer factor)."""
    z = run.zero
    held = (16 * counts.trainable if z.offload_optimizer else 0) + (2 * counts.total if z.offload_param else 0)
    return held / (world if z.stage >= 1 else 1)


def per_rank(run: RunConfig, traced: DepthTrace, world: int) -> dict[str, float]:
    """The rank's peak parts: as traced without DeepSpeed; ZeRO's model states with it."""
    if not run.zero.enabled:
        fwd, opt = traced.fwd_bwd, traced.optimizer_step
        return dict(fwd) if sum(fwd.values()) >= sum(opt.values()) else dict(opt)
    parts = {k: float(v) for k, v in traced.transient.items()}  # gradients leave for their partitions as they come
    parts.update(zero_model_states(run, traced.counts, world))
    if run.zero.stage >= 3:  # a separate reference's weights are partitioned like the policy's
        parts[REFERENCE] -= traced.reference_weights * (1 - 1 / world)
    return {k: parts[k] for k in KINDS}


def row_lengths(run: RunConfig, length: int, sp: int, response: Optional[int]) -> Lengths:
    """Tokens per row on one rank: the long rows at ``length``, the short ones at ``short_cutoff_len``."""
    short = min(getattr(run.data_args, "short_cutoff_len", length) or length, length)
    on_policy = run.spec is not None and run.spec.on_policy  # S2LD's sampled responses: as long as they may grow
    resp = response if response is not None else run.finetuning_args.s2ld_max_new_tokens if on_policy else DEFAULT_RESPONSE_TOKENS
    local_long, local_short = -(-length // sp), -(-short // sp)
    short_rows = run.stage in ("solopo", "s2ld")  # the response must fit the short rows too
    return Lengths(local_long, local_short, max(1, min(resp, local_short // 2 if short_rows else local_long // 2)))


def estimate(
    run: RunConfig,
    length: int,
    gpus: int = 1,
    sp: Optional[int] = None,
    device_gib: Optional[float] = None,
    response: Optional[int] = None,
    attention: Optional[str] = None,
    layers: Optional[int] = None,
    flops: bool = True,
    node: Node = Node(),
) -> Estimate:
    """Predict one rank's peak for rows of ``length`` tokens (``cutoff_len`` of the long rows).

    ``sp``: sequence-parallel size (default the run's); ``attention``: None traces SDPA as a GPU kernel holds
    it (:mod:`.attention`), a name traces that implementation as it runs here (the CPU validation passes
    ``sdpa``); ``layers``: full depth (default the model's); ``node``: what a node holds and how fast it runs.
    """
    sp = sp or int(getattr(run.finetuning_args, "sequence_parallel_size", 1) or 1)
    traced = scaled_trace(run, row_lengths(run, length, sp, response), attention, layers, sp)
    step_flops = traced.flops
    if sp > 1:  # attention is quadratic in the row: count the whole rows (``flops=False``: not needed, not traced)
        whole = row_lengths(run, length, 1, response)
        # one MLP tile per row: a tile count changes no FLOP, and a whole row in hidden_size tiles takes long to trace
        one_tile = {"mlp_tile_tokens": whole.long}
        step_flops = scaled_trace(run, whole, attention, layers, sp, spec_changes=one_tile).flops if flops else 0
    device = device_gib * GIB if device_gib else None
    node = dataclasses.replace(node, gpus=min(node.gpus, gpus))
    host_states = node.gpus * zero_host_states(run, traced.counts, gpus) if run.zero.enabled else 0.0
    return Estimate(
        length, per_rank(run, traced, gpus), step_flops, traced.counts, device, sp, traced.host, traced.moved, host_states, node
    )


def format_report(run: RunConfig, estimates: list[Estimate], gpus: int, sp: int, counts_line: str) -> str:
    """The ``estimate`` command's table: one column per length, one line per part, then the verdict."""
    fa, ta = run.finetuning_args, run.training_args
    z = run.zero
    zero = "no DeepSpeed" if not z.enabled else f"ZeRO-{z.stage}"
    offload = [k for k, on in (("optimizer", z.offload_optimizer), ("params", z.offload_param)) if on]
    if offload:
        zero += f" (offload {', '.join(offload)})"
    loss = f" ({fa.pref_loss})" if run.stage != "sft" else ""
    lines = [
        f"model: {run.model_args.model_name_or_path} ({run.model_source}): {counts_line}",
        f"run: stage {run.stage}{loss}, {fa.finetuning_type}, {str(run.dtype).removeprefix('torch.')}, {gpus} GPU(s), "
        f"{zero}, sequence parallel {sp}, {ta.per_device_train_batch_size} sample(s) per device",
        "traced: the stage's own training step on fake tensors at {} and {} layers, scaled to {}; "
        "attention as a flash kernel holds it (no T x T scores)".format(
            *trace_depths(run, run.model_config.num_hidden_layers), run.model_config.num_hidden_layers
        ),
    ]
    width = 24
    unit, scale = ("GiB", GIB) if max(e.total for e in estimates) >= GIB else ("MiB", 1 << 20)
    head = f"{f'per rank ({unit})':<{width}}" + "".join(f"{e.length:>12,}" for e in estimates)
    lines += ["", head]
    for kind in KINDS:
        lines.append(f"  {kind:<{width - 2}}" + "".join(f"{e.parts[kind] / scale:>12.2f}" for e in estimates))
    lines.append(f"  {'total':<{width - 2}}" + "".join(f"{e.total / scale:>12.2f}" for e in estimates))
    lines.append(f"  {'step TFLOPs':<{width - 2}}" + "".join(f"{e.flops / 1e12:>12.1f}" for e in estimates))
    lines += _host_lines(estimates, width, unit, scale)
    if estimates and estimates[0].device_bytes:
        cap = estimates[0].device_bytes / GIB
        lines.append(f"  {f'fits {cap:g} GiB':<{width - 2}}" + "".join(f"{'yes' if e.fits else 'NO':>12}" for e in estimates))
        for e in estimates:
            if not e.fits:
                lines.append(
                    f"{e.length:,} tokens does not fit {cap:g} GiB: needs {size(e.total)}; "
                    f"largest part: {e.largest} ({size(e.parts[e.largest])})"
                )
    for e in estimates:
        if e.host_fits is False:
            lines.append(
                f"{e.length:,} tokens does not fit {e.node.host_gib:g} GiB of host memory per node: needs {size(e.host_per_node)}"
            )
    lines.append(NOT_MODELLED)
    return "\n".join(lines)


def _host_lines(estimates: list[Estimate], width: int, unit: str, scale: float) -> list[str]:
    """Host memory and copy time beside compute time, when the run keeps anything in host memory."""
    if not estimates or not any(e.host_activations or e.host_states for e in estimates):
        return []
    node = estimates[0].node

    def row(label: str, values: list[str]) -> str:
        return f"  {label:<{width - 2}}" + "".join(f"{v:>12}" for v in values)

    lines = [
        "",
        f"host ({unit}; {node.gpus} GPU(s) per node, {node.pcie_gbps:g} GB/s PCIe each way, {node.tflops:g} TFLOP/s per GPU)",
        row("offloaded / rank", [f"{e.host_activations / scale:.2f}" for e in estimates]),
        row("states / node", [f"{e.host_states / scale:.2f}" for e in estimates]),
        row("total / node", [f"{e.host_per_node / scale:.2f}" for e in estimates]),
        row("copied / rank / step", [f"{e.moved / scale:.2f}" for e in estimates]),
        row("PCIe s / step", [f"{e.pcie_seconds:.2f}" for e in estimates]),
        row("compute s / step", [f"{e.compute_seconds:.2f}" for e in estimates]),
    ]
    if node.host_gib is not None:
        lines.append(row(f"fits {node.host_gib:g} GiB host", ["yes" if e.host_fits else "NO" for e in estimates]))
    return lines
