"""Ulysses sequence parallelism for ``solopo`` and ``longpo``, on DeepSpeed's ``UlyssesSPAttentionHF``.

Why DeepSpeed's module and not the toolkit's v1 Ulysses code: DeepSpeed's is a released API
(``deepspeed.runtime.sequence_parallel``, DeepSpeed >= 0.17) written for Hugging Face attention
functions, keeps MQA/GQA head replication, its all-to-all is a registered autograd operator, and it
runs on CPU with gloo, so the equality tests run in CI. The toolkit's v1 code is an SFT-only plugin of
its experimental trainer and expects its own batch format.

How a step runs with ``sequence_parallel_size: P``: the ``P`` consecutive ranks of a group receive the
SAME batch (:class:`GroupBatchSampler`); every row is padded to a multiple of ``P`` and each rank
feeds only its slice of the tokens (global ``position_ids``) through the model. Inside attention,
DeepSpeed's all-to-all turns "my tokens, all heads" into "all tokens, my heads" and back, so each
rank's hidden states equal the matching slice of a single-process forward. Log-prob sums and token
counts are then summed over the group (:func:`group_sum`, gradients intact) in
:func:`..logps.scored_sums`. Short rows, reference passes and LongPO's packed pairs take the same path:
the attention function is replaced process-wide, so every forward of the model is sharded (the shared
prefix's attention, installed first, runs inside Ulysses on the gathered sequence).

Any ``P``, whatever the head counts: the all-to-all hands each rank ``1/P`` of the heads, so DeepSpeed needs the
query heads divisible by ``P`` and the KV heads dividing ``P`` or divisible by it (Qwen2.5-7B, 28/4 heads: only 2
and 4). :class:`HeadPadding` lays the heads out for Ulysses first: each KV head is replicated, the replicas topped
up to a multiple of ``P``, and each replica serves ``s`` query slots, its share of the KV head's queries plus zero
queries (:func:`padded_heads`), so that every rank holds whole replicas and each query keeps its own KV head. The
padded heads' outputs are dropped after the reverse all-to-all, so they get no gradient and the result is exactly
the unpadded one; replicated KV heads receive the sum of their replicas' gradients, as one head serving all its
queries would.

Gradient scale: every rank of a group computes the same loss, and the backward of :func:`group_sum`
sums the group's (identical) upstream gradients, so a group contributes ``P`` times its gradient;
the data-parallel average (DDP or DeepSpeed, over all ``world`` ranks) divides by ``world = P x dp``,
which leaves exactly the mean over the ``dp`` data-parallel groups: the same update as without SP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Sampler
from transformers import TrainerCallback

from ..attention_kernels import ATTENTION_KERNELS
from ..errors import ConfigError

# the kernels that work without a materialized 4D mask (DeepSpeed drops masks under SP): flash_attn value by name
SUPPORTED_ATTENTION = {k.implementation: name for name, k in ATTENTION_KERNELS.items() if k.sequence_parallel}


@dataclass
class SequenceParallel:
    """Where this rank sits: its sequence-parallel group and its data-parallel coordinates."""

    group: Any
    size: int
    rank: int  # within the group: which slice of the tokens this rank feeds
    dp_size: int  # number of groups: distinct batches per step
    dp_rank: int

    def local_slice(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        targets: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's contiguous slice of every row: ids, mask, global positions and next-token targets.

        Rows are padded at the end to a multiple of the group size. Targets are shifted before the split (position
        ``p`` holds the token it predicts), so no token is lost at a slice boundary. Positions default to
        ``0 .. L-1``; they are made contiguous because DeepSpeed all-gathers them.
        """
        batch, length = input_ids.shape
        pad = -length % self.size
        if position_ids is None:
            position_ids = torch.arange(length + pad, device=input_ids.device).expand(batch, -1)
        elif pad:
            position_ids = F.pad(position_ids, (0, pad), value=0)
        if pad:
            input_ids = F.pad(input_ids, (0, pad), value=0)
            attention_mask = None if attention_mask is None else F.pad(attention_mask, (0, pad), value=1)
            targets = {k: F.pad(t, (0, pad), value=-100) for k, t in targets.items()}
        width = (length + pad) // self.size
        local = slice(self.rank * width, (self.rank + 1) * width)
        mask = None if attention_mask is None else attention_mask[:, local]
        return input_ids[:, local], mask, position_ids[:, local].contiguous(), {k: t[:, local] for k, t in targets.items()}


def padded_heads(q_heads: int, kv_heads: int, size: int) -> tuple[int, int]:
    """``(q_padded, kv_used)``: the query and KV head counts Ulysses runs at ``size`` ranks (see :class:`HeadPadding`).

    A layout serves ``s`` query slots per KV replica: each KV head needs ``ceil(group / s)`` replicas for its
    ``group`` queries, and the replicas are topped up to a multiple of ``size`` (extra replicas hold only zero
    queries), so ``kv_used = roundup(kv_heads * ceil(group / s), size)`` and ``q_padded = s * kv_used``. Of the
    ``s`` in ``1 .. group``, the fewest query slots (attention FLOPs), then the fewest KV heads (all-to-all bytes).
    Counts DeepSpeed takes as they are keep their query heads: Llama-3.1-8B, 32/8 at 16 ranks, gives (32, 16), the
    replication DeepSpeed itself would do. Qwen2.5-7B, 28/4 at 8 ranks: (32, 8).
    """
    group = q_heads // kv_heads
    layouts = []
    for slots in range(1, group + 1):
        kv_used = -(-kv_heads * -(-group // slots) // size) * size
        layouts.append((slots * kv_used, kv_used))
    return min(layouts)


@dataclass(frozen=True)
class HeadPadding:
    """Where each head goes in the padded layout of :func:`padded_heads`, and the moves in and out of it.

    Padded KV heads are ``r = ceil(group / s)`` consecutive replicas of each KV head, then the extra replicas (of the
    last KV head). Replica ``i`` of KV head ``k`` holds that head's queries ``i * s .. i * s + s - 1`` in its ``s``
    query slots (those that exist; the others, and all of an extra replica's, are zero queries). Every replica has
    ``s`` slots and each rank gets whole replicas, so the contiguous split of the all-to-all keeps each query with
    its own KV head.
    """

    q_heads: int
    kv_heads: int
    size: int

    @cached_property
    def counts(self) -> tuple[int, int]:
        """``(q_padded, kv_used)``."""
        return padded_heads(self.q_heads, self.kv_heads, self.size)

    @property
    def slots_per_kv(self) -> int:
        """Query slots per padded KV head: the model's ``num_key_value_groups`` after the all-to-all."""
        return self.counts[0] // self.counts[1]

    @property
    def _replicas(self) -> int:
        return -(-self.q_heads // self.kv_heads // self.slots_per_kv)

    @cached_property
    def query_index(self) -> list[int]:
        """For each padded query slot, the real query head it holds, or ``q_heads`` (the zero head)."""
        group, slots = self.q_heads // self.kv_heads, self._replicas * self.slots_per_kv
        index = [kv * group + m if m < group else self.q_heads for kv in range(self.kv_heads) for m in range(slots)]
        return index + [self.q_heads] * (self.counts[0] - len(index))

    @cached_property
    def kv_index(self) -> list[int]:
        """For each padded KV head, the real KV head it replicates."""
        index = [kv for kv in range(self.kv_heads) for _ in range(self._replicas)]
        return index + [self.kv_heads - 1] * (self.counts[1] - len(index))

    @cached_property
    def output_index(self) -> list[int]:
        """For each real query head, the padded slot that holds its output."""
        return [self.query_index.index(h) for h in range(self.q_heads)]

    @cached_property
    def moves_queries(self) -> bool:
        """Whether the query heads change place (else passed through, like the output)."""
        return self.query_index != list(range(self.q_heads))

    @cached_property
    def moves_kv(self) -> bool:
        """Whether the KV heads are replicated."""
        return self.kv_index != list(range(self.kv_heads))

    @cached_property
    def _tensors(self) -> dict[tuple[str, torch.device], torch.Tensor]:
        return {}

    def _index(self, name: str, device: torch.device) -> torch.Tensor:
        if (name, device) not in self._tensors:  # once per device, not per layer and call
            self._tensors[name, device] = torch.tensor(getattr(self, name), device=device)
        return self._tensors[name, device]

    def pad(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, heads, L, D]`` query, key and value in the padded layout (the zero queries: one appended zero head).
        A part already in place is passed through (e.g. the tiny model's 4/2 heads at 4 ranks: only K and V move)."""
        if self.moves_queries:
            query = F.pad(query, (0, 0, 0, 0, 0, 1)).index_select(1, self._index("query_index", query.device))
        if self.moves_kv:
            kv_index = self._index("kv_index", key.device)
            key, value = key.index_select(1, kv_index), value.index_select(1, kv_index)
        return query, key, value

    def unpad(self, output: torch.Tensor) -> torch.Tensor:
        """Attention output ``[B, L, q_padded, D]`` (or heads and D flattened) -> ``[B, L, q_heads, D]``: the padded
        heads' outputs are dropped, so no gradient reaches them."""
        out = output.reshape(*output.shape[:2], self.counts[0], -1)
        return out.index_select(2, self._index("output_index", out.device)) if self.moves_queries else out


def check_sequence_parallel(size: int, attn_implementation: Optional[str], world_size: int) -> None:
    """Raise a one-line :class:`ConfigError` for each setting Ulysses cannot run; nothing runs before this.
    Any head counts run (:class:`HeadPadding`)."""
    if world_size % size:
        raise ConfigError(
            f"sequence_parallel_size: {size} does not divide the world size {world_size}; launch a multiple of "
            f"{size} processes (FORCE_TORCHRUN=1 NPROC_PER_NODE={size} llamafactory-cli train ...)"
        )
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ConfigError(
            f"sequence_parallel_size: {size} needs flash_attn: {' or '.join(SUPPORTED_ATTENTION.values())} "
            f"(the model runs {attn_implementation!r} "
            "attention, which needs a full 4D mask that Ulysses cannot shard)"
        )


def _init_deepspeed_comm() -> None:
    """DeepSpeed's collectives ride on the process group the toolkit already created."""
    import deepspeed.comm as ds_dist

    if not ds_dist.is_initialized():
        ds_dist.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


def head_padding(config: Any, size: int) -> HeadPadding:
    """The model's heads laid out for ``size`` ranks (a text config, or a multimodal one holding it)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return HeadPadding(heads, getattr(text, "num_key_value_heads", None) or heads, size)


def padded_attention(function: Callable[..., Any], padding: HeadPadding) -> Callable[..., Any]:
    """An attention function that runs ``function`` on the padded heads and returns the real heads' outputs.

    The module's ``num_key_value_groups`` (read by transformers' SDPA and eager paths to repeat KV heads) is the
    padded layout's for the call and put back after it, so a module keeps the model's own value between calls.
    """

    def attention(
        module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, *a: Any, **kw: Any
    ) -> tuple[torch.Tensor, Any]:
        query, key, value = padding.pad(query, key, value)
        groups = getattr(module, "num_key_value_groups", None)
        if groups is not None:
            module.num_key_value_groups = padding.slots_per_kv
        try:
            out, weights = function(module, query, key, value, mask, *a, **kw)
        finally:
            if groups is not None:
                module.num_key_value_groups = groups
        return padding.unpad(out), weights

    return attention


@contextmanager
def local_head_padding(model: torch.nn.Module, size: int) -> Iterator[None]:
    """Inside the block, the model's attention runs on the heads padded for ``size`` ranks, on one process and
    without the all-to-all: the memory planner's stand-in for Ulysses. Its rows hold ``T/size`` tokens, so each
    attention tensor has the bytes one rank's has under Ulysses (``T/size`` tokens of ``q_padded`` heads, as
    ``T`` tokens of ``q_padded/size``); on whole rows, the group's attention FLOPs."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS[name]
    ALL_ATTENTION_FUNCTIONS[name] = padded_attention(original, head_padding(model.config, size))
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS[name] = original


def enable_sequence_parallel(model: torch.nn.Module, size: int) -> SequenceParallel:
    """Check the setting, build the groups and route the model's attention through Ulysses (a process-wide
    registry change: :func:`.wiring.wire_model` makes it and puts the entry back)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    config = model.config
    attn = getattr(config, "_attn_implementation", None)
    check_sequence_parallel(size, attn, world)

    _init_deepspeed_comm()
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mpu.initialize_sequence_parallel(sequence_parallel_size=size)  # groups of consecutive ranks
    group = mpu.get_sequence_parallel_group()
    text = config.get_text_config()
    padding = head_padding(config, size)
    q_padded, kv_used = padding.counts
    ulysses = UlyssesSPAttentionHF(
        attn=ALL_ATTENTION_FUNCTIONS[attn],
        batch_size=1,
        attn_head_count=q_padded,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        kv_head_count=kv_used,  # a multiple of ``size``: DeepSpeed replicates nothing more
        num_hidden_layers=text.num_hidden_layers,
        process_group=group,
        seq_length_is_variable=True,
    )
    ulysses.core_attn_implementation = attn

    def sharded(
        module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, *a: Any, **kw: Any
    ) -> Any:
        # the module is built for one batch size; ours varies (short, long and reference rows), so set it per call
        batch = query.size(0)
        if batch != ulysses.batch_size:
            ulysses.batch_size = batch
            ulysses.required_query_shape = torch.Size([1, batch, ulysses.attn_head_count, ulysses.attn_head_size])
            ulysses.required_key_value_shape = torch.Size([1, batch, ulysses.global_kv_head_count, ulysses.attn_head_size])
            ulysses.required_context_shape = torch.Size(
                [1, batch, ulysses.attn_head_size * ulysses.attn_head_count // ulysses.world_size]
            )
        # rows are right-padded and attention is causal, so no mask is needed (the model's is for the local slice)
        return ulysses(module, query, key, value, None, *a, **kw)

    # replacing the core implementation in place keeps every branch the model takes on its name (DeepSpeed does the same)
    ALL_ATTENTION_FUNCTIONS[attn] = padded_attention(sharded, padding)
    rank = dist.get_rank()
    return SequenceParallel(group=group, size=size, rank=dist.get_rank(group), dp_size=world // size, dp_rank=rank // size)


class _GroupSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def group_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum over the sequence-parallel group; differentiable (see the module docstring for the scale).
    Without grad (reference passes) the same forward runs and no graph is recorded."""
    return _GroupSum.apply(tensor, group)


class GroupBatchSampler(Sampler[int]):
    """Sample order in which every batch appears ``copies`` times in a row.

    The toolkit's data loader deals batch ``k`` to rank ``k mod world``; with each batch repeated ``P``
    times, the ``P`` consecutive ranks of a sequence-parallel group get the same batch and the groups
    get distinct ones. The order is a function of the seed and epoch only, identical on every rank;
    the last batch is completed with samples from the start so no batch is ever split.
    """

    def __init__(self, num_samples: int, batch_size: int, copies: int, shuffle: bool, seed: int) -> None:
        self.num_samples, self.batch_size, self.copies = num_samples, batch_size, copies
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size) * self.batch_size * self.copies

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.num_samples))
        while order and len(order) % self.batch_size:
            order += order[: self.batch_size - len(order) % self.batch_size]
        for start in range(0, len(order), self.batch_size):
            for _ in range(self.copies):
                yield from order[start : start + self.batch_size]


class GroupSamplingMixin:
    """Trainer methods: under sequence parallelism the ranks of a group see the same batches (:class:`GroupBatchSampler`).

    Mixed in before the toolkit's trainer; reads the trainer's ``sequence_parallel`` (``None``: the trainer's own
    samplers), and :meth:`add_group_sampling` runs in its ``__init__``.
    """

    sequence_parallel: Optional[SequenceParallel]

    def add_group_sampling(self) -> None:
        self.sampler_epoch = SamplerEpochCallback()  # inert unless sequence parallelism deals the batches
        self.add_callback(self.sampler_epoch)

    def _group_sampler(self, dataset: Any, batch_size: int, shuffle: bool) -> GroupBatchSampler:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return GroupBatchSampler(len(dataset), batch_size, self.sequence_parallel.size, shuffle, seed)

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Optional[torch.utils.data.Sampler]:
        if self.sequence_parallel is None:
            return super()._get_train_sampler(*args, **kwargs)
        dataset = args[0] if args else kwargs.get("train_dataset") or self.train_dataset
        sampler = self._group_sampler(dataset, self._train_batch_size, not self.finetuning_args.disable_shuffling)
        self.sampler_epoch.sampler = sampler
        return sampler

    def _get_eval_sampler(self, eval_dataset: Any) -> Optional[torch.utils.data.Sampler]:
        if self.sequence_parallel is None:
            return super()._get_eval_sampler(eval_dataset)
        return self._group_sampler(eval_dataset, self.args.eval_batch_size, False)


class SamplerEpochCallback(TrainerCallback):
    """Sets the group sampler's epoch at each epoch's start, resumed epochs included.

    accelerate's ``set_epoch`` looks for a sampler at most two wrappers deep. After a mid-epoch resume
    the loader is wrapped once more (``skip_first_batches``), the epoch never reaches the sampler, and the
    resumed epoch would replay epoch 0's order. ``state.epoch`` is the restored fractional epoch there
    (e.g. 1.33 -> epoch 1), and a whole number at a normal epoch start.
    """

    def __init__(self) -> None:
        self.sampler: Optional[GroupBatchSampler] = None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(math.floor(state.epoch + 1e-6))  # + 1e-6: an epoch's end may land at x.9999999
