"""Depth-linear calibration: compress a model's chain of repeated blocks one block at a time.

GPTQ / AQLM style. The calibration batches run once up to the first block, whose inputs are
cached (the hidden-state "stream" per batch, on CPU, plus the other arguments the model passes,
e.g. attention mask and position embeddings). Each block then gets its layers compressed group
by group (execution order within the block) from statistics collected by running only that
block on the cached inputs, and the compressed block turns its inputs into the next block's. With
the original-output target, a second "original" stream runs through the block with its
original layers swapped back in; only the current block's original layers are kept.

A container qualifies when its blocks form a chain on a calibration batch: each block runs once,
block i+1 gets block i's output as its stream, and every block gets the same other arguments
(the same objects). Otherwise ``compress`` falls back to whole-model passes and warns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .calibration import (
    BatchPass,
    LayerStats,
    _StopForward,
    accumulate_statistics,
    batch_token_mask,
    checked_run,
    flat_tokens,
    layer_input,
)
from .output_memo import OutputMemo

_STREAM_KWARGS = ("hidden_states", "x", "input", "hidden_state")


class _StopAtBlock(_StopForward):
    """Raised by the first block's pre-hook once its inputs are captured: the rest is not needed."""


def find_blocks(model: nn.Module, eligible: Iterable[str], spec: str | None) -> tuple[str, list[nn.Module]] | None:
    """The container of repeated blocks to calibrate block by block, or None (generic path).

    ``spec``: "auto" picks the nn.ModuleList / nn.Sequential of same-class (non-Linear) modules
    that holds the most selected layers (at least two of its blocks must hold some); a module
    name picks that container; None disables the block path.
    """
    names = list(eligible)
    if spec is None:
        return None
    if spec != "auto":
        try:
            container = model.get_submodule(spec)
        except AttributeError as exc:
            raise ValueError(f"compress: blocks={spec!r} names no submodule of the model") from exc
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"compress: blocks={spec!r} is a {type(container).__name__}; expected an nn.ModuleList or nn.Sequential"
            )
        return spec, list(container)
    best, best_held = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        kids = list(module)
        if len({type(k) for k in kids}) != 1 or isinstance(kids[0], nn.Linear):
            continue
        per_block = [sum(n.startswith(f"{name}.{i}." if name else f"{i}.") for n in names) for i in range(len(kids))]
        held = sum(per_block)
        if sum(c > 0 for c in per_block) >= 2 and held > best_held:
            best, best_held = (name, kids), held
    return best


def _stream_key(args: tuple, kwargs: dict) -> int | str | None:
    """Where a block's hidden-state input sits: first positional argument, or a known keyword."""
    if args and isinstance(args[0], Tensor):
        return 0
    for key in _STREAM_KWARGS:
        if isinstance(kwargs.get(key), Tensor):
            return key
    return None


def output_stream(output: Any) -> Tensor:
    """A block's output hidden states: the output itself, or the first element of a tuple/list."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"block output: expected a Tensor or a tuple starting with one, got {type(output).__name__}")
    return output


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # objects without a usable == (e.g. caches): only identity counts
        return False


@dataclass
class BlockInput:
    """The arguments the model passed to the first block for one batch, stream left out."""

    args: tuple
    kwargs: dict
    stream_key: int | str

    @classmethod
    def capture(cls, args: tuple, kwargs: dict) -> tuple["BlockInput", Tensor]:
        key = _stream_key(args, kwargs)
        if key is None:
            raise ValueError("block input: found no hidden-state tensor (first positional argument or hidden_states=)")
        stream = args[key] if isinstance(key, int) else kwargs[key]
        kwargs = {k: _without_cache(k, v) for k, v in kwargs.items()}
        return cls(tuple(args), kwargs, key), stream

    def call(self, block: nn.Module, stream: Tensor) -> Tensor:
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(self.stream_key, int):
            args[self.stream_key] = stream
        else:
            kwargs[self.stream_key] = stream
        return output_stream(block(*args, **kwargs))


def _without_cache(key: str, value: Any) -> Any:
    """A block is re-run several times on the same inputs: a key/value cache would grow each time."""
    if key == "use_cache":
        return False
    if "cache" in type(value).__name__.lower() or key in ("cache", "past_key_value", "past_key_values", "layer_past"):
        return None
    return value


def trace_blocks(
    model: nn.Module, blocks: list[nn.Module], layers: dict[str, nn.Module], batch: Any
) -> dict[str, Any] | str:
    """Run one batch; return each layer's place (block index, "prefix" or "suffix"), or why the
    blocks do not form a chain that can be calibrated block by block."""
    seen: list[tuple[int, tuple, dict, Any]] = []  # (block, args, kwargs, output) per call
    place: dict[str, Any] = {}
    state = {"active": "prefix"}

    def pre(i):
        def hook(module, args, kwargs):
            state["active"] = i
            seen.append((i, args, kwargs, None))

        return hook

    def post(i):
        def hook(module, args, kwargs, output):
            state["active"] = "between" if i < len(blocks) - 1 else "suffix"
            seen[-1] = (*seen[-1][:3], output)

        return hook

    def layer_hook(name):
        def hook(module, args):
            where = state["active"]
            if place.setdefault(name, where) != where:
                place[name] = "several"

        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [m.register_forward_pre_hook(layer_hook(n)) for n, m in layers.items()]
    try:
        checked_run(model, batch, 0)
    finally:
        for h in handles:
            h.remove()
    return _chain_problem(seen, len(blocks)) or place


def _chain_problem(seen: list[tuple[int, tuple, dict, Any]], num_blocks: int) -> str | None:
    """Why the traced block calls are not a chain (None when they are)."""
    if [s[0] for s in seen] != list(range(num_blocks)):
        return f"the blocks ran in the order {[s[0] for s in seen]}, not once each in order"
    key0 = _stream_key(seen[0][1], seen[0][2])
    if key0 is None:
        return "the first block gets no hidden-state tensor (first positional argument or hidden_states=)"
    for (i, args, kwargs, _), (_, _, _, prev_out) in zip(seen[1:], seen):
        key = _stream_key(args, kwargs)
        stream = None if key is None else (args[key] if isinstance(key, int) else kwargs[key])
        if key != key0 or stream is not output_stream(prev_out):
            return f"block {i} does not get block {i - 1}'s output as its input"
        rest = [a for j, a in enumerate(args) if j != key] + [v for k, v in kwargs.items() if k != key]
        rest0 = [a for j, a in enumerate(seen[0][1]) if j != key0] + [v for k, v in seen[0][2].items() if k != key0]
        if len(rest) != len(rest0) or kwargs.keys() != seen[0][2].keys() or not all(map(_same, rest, rest0)):
            return f"block {i} gets other arguments than block 0 (e.g. a per-layer attention mask)"
    return None


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: list[Any]
) -> tuple[list[BlockInput], list[Tensor]]:
    """Run every batch up to the first block; return its arguments and its stream (on CPU) per batch."""
    captured: list[tuple[BlockInput, Tensor]] = []

    def hook(module, args, kwargs):
        block_input, stream = BlockInput.capture(args, kwargs)
        captured.append((block_input, stream.detach().cpu()))
        raise _StopAtBlock

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            try:
                checked_run(model, batch, i)
            except _StopAtBlock:
                pass
            if len(captured) != i + 1:
                raise ValueError(f"calibration batch {i} never reached the first block")
    finally:
        handle.remove()
    return [c[0] for c in captured], [c[1] for c in captured]


class BlockSession(Protocol):
    """What the block loop needs from ``compress``: compress a group, and swap the original layers
    of the current block in and out (``use_original``) or drop them (``release_originals``)."""

    keep_originals: bool

    def compress_group(self, group: list[str], stats: dict[str, LayerStats]) -> None: ...

    def compressed_layer(self, name: str) -> nn.Module: ...

    def nothing_compressed(self) -> bool: ...

    def use_original(self, original: bool) -> None: ...

    def release_originals(self) -> None: ...


@dataclass
class Streams:
    """Per batch: the block inputs in the partly compressed model and in the original model (the
    same list until they differ), each (batch..., hidden) on CPU."""

    compressed: list[Tensor]
    original: list[Tensor]


def _run_block(
    block: nn.Module, inputs: list[BlockInput], streams: list[Tensor], memo: OutputMemo | None = None
) -> list[Tensor]:
    device = _device_of(block)
    if memo is None:
        return [inp.call(block, x.to(device)).detach().cpu() for inp, x in zip(inputs, streams)]
    return [
        memo.run(i, lambda inp=inp, x=x: inp.call(block, x.to(device))).detach().cpu()
        for i, (inp, x) in enumerate(zip(inputs, streams))
    ]


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _block_passes(
    block,
    inputs,
    streams: Streams,
    masks,
    session: BlockSession,
    reference: bool,
    recorded: Recorded | None,
    memo: OutputMemo,
) -> list[BatchPass]:
    device = _device_of(block)

    def original(inp, x):
        session.use_original(True)
        try:
            inp.call(block, x.to(device))
        finally:
            session.use_original(False)

    replayed = reference and recorded is not None
    replay = recorded.inputs if replayed else [None] * len(inputs)
    powers = recorded.powers if replayed else [None] * len(inputs)
    outputs = recorded.layer_outputs if replayed else [None] * len(inputs)
    return [
        BatchPass(
            run=lambda i=i, inp=inp, x=x: memo.run(i, lambda: inp.call(block, x.to(device))),
            run_reference=(lambda inp=inp, x=xr: original(inp, x)) if reference else None,
            mask=mask,
            reference_inputs=rec,
            reference_powers=power,
            reference_outputs=out,
        )
        for i, (inp, x, xr, mask, rec, power, out) in enumerate(
            zip(inputs, streams.compressed, streams.original, masks, replay, powers, outputs)
        )
    ]


# Memory for recording the original block's layer inputs in one pass (instead of re-running the
# original block for every layer group): ~110 MB for SmolLM2-135M with 8,192 calibration tokens;
# a 7B model with 128 x 2048 tokens would need ~24 GB and re-runs the original block instead.
RECORD_BUDGET_BYTES = 2 << 30


@dataclass
class Recorded:
    """One pass of the original block over the original stream: per batch, the inputs of the
    selected layers (one tensor per call), their output power (the sum over counted tokens of
    ||x_ref W^T||^2, all calls) and the block's output (the next original stream)."""

    inputs: list[dict[str, list[Tensor]]]
    powers: list[dict[str, float]]
    outputs: list[Tensor]
    layer_outputs: list[dict[str, list[Tensor]]]  # x_ref W^T per call, for ``output_target_layers`` only


def record_original(
    block: nn.Module,
    names: list[str],
    layers: dict[str, nn.Module],
    inputs: list[BlockInput],
    streams: Streams,
    masks: list[Tensor | None],
    session: BlockSession,
    keep_outputs: set[str] = frozenset(),
) -> Recorded | None:
    """Run the original block once per batch, keeping its selected layers' inputs and output power
    (the reported errors' denominator, here for free instead of an (in, in) moment per layer); None
    (nothing kept) as soon as the kept inputs extrapolate to more than ``RECORD_BUDGET_BYTES`` for all batches."""
    per_batch: list[dict[str, list[Tensor]]] = []
    powers: list[dict[str, float]] = []
    layer_outputs: list[dict[str, list[Tensor]]] = []
    handles = [layers[n].register_forward_pre_hook(_recorder(n, per_batch), with_kwargs=True) for n in names]
    handles += [
        layers[n].register_forward_hook(_power_meter(n, powers, masks, layer_outputs if n in keep_outputs else None))
        for n in names
    ]
    outputs, kept = [], 0
    session.use_original(True)
    try:
        for inp, x in zip(inputs, streams.original):
            per_batch.append({})
            powers.append({})
            layer_outputs.append({})
            outputs.append(inp.call(block, x.to(_device_of(block))).detach().cpu())
            tensors = [t for d in (per_batch[-1], layer_outputs[-1]) for ts in d.values() for t in ts]
            unique = {id(t): t for t in tensors}.values()  # q/k/v share one input
            kept += sum(t.numel() * t.element_size() for t in unique)
            if kept * len(inputs) > RECORD_BUDGET_BYTES * len(per_batch):
                return None
    finally:
        session.use_original(False)
        for h in handles:
            h.remove()
    return Recorded(per_batch, powers, outputs, layer_outputs)


def _power_meter(
    name: str, powers: list[dict[str, float]], masks: list[Tensor | None], keep: list[dict] | None
) -> Callable:
    """Adds the layer's output power ||x_ref W^T||^2 (and with ``keep`` keeps x_ref W^T itself)."""

    def hook(module, args, output):
        y = output.detach()
        if getattr(module, "bias", None) is not None:
            y = y - module.bias.detach()  # the reported error compares weights: x W^T, without the bias
        flat = flat_tokens(y, masks[len(powers) - 1])
        powers[-1][name] = powers[-1].get(name, 0.0) + float(flat.double().pow(2).sum())
        if keep is not None:
            keep[-1].setdefault(name, []).append(y)

    return hook


def output_target_layers(groups: list[list[str]], layers: dict[str, nn.Module]) -> set[str]:
    """Layers of groups whose outputs are narrower than their shared input (e.g. a Llama down_proj):
    for them W C comes from the recorded original outputs, tokens x out x in flops instead of
    C = X_ref^T X's tokens x in^2 (docs/llm.md, "Compression time")."""
    chosen: set[str] = set()
    for group in groups:
        widths = [(getattr(layers[n], "out_features", None), getattr(layers[n], "in_features", None)) for n in group]
        if all(isinstance(o, int) and isinstance(i, int) for o, i in widths):
            if sum(o for o, _ in widths) < widths[0][1]:
                chosen.update(group)
    return chosen


def _recorder(name: str, per_batch: list[dict[str, list[Tensor]]]) -> Callable:
    def hook(module, args, kwargs):
        per_batch[-1].setdefault(name, []).append(layer_input(args, kwargs).detach())

    return hook


def compress_block(
    block: nn.Module,
    groups: list[list[str]],
    layers: dict[str, nn.Module],
    inputs: list[BlockInput],
    streams: Streams,
    masks: list[Tensor | None],
    calls: dict[str, int],
    session: BlockSession,
    memo: OutputMemo,
) -> list[Tensor] | None:
    """Compress one block's layer groups in order, each from statistics of this block alone.

    Every compressed layer is watched by ``memo``: later passes over the same batch reuse its output.

    With the original-output target the original block runs once first, recording its layers'
    inputs (within ``RECORD_BUDGET_BYTES``); its outputs (the next original stream) are returned,
    None when nothing was recorded."""
    names = [n for g in groups for n in g]
    recorded = None
    if session.keep_originals:
        narrow = output_target_layers(groups, layers)
        recorded = record_original(block, names, layers, inputs, streams, masks, session, narrow)
    for group in groups:
        untouched = session.nothing_compressed()
        reference = session.keep_originals and not untouched
        passes = _block_passes(block, inputs, streams, masks, session, reference, recorded, memo)
        stats = accumulate_statistics({n: layers[n] for n in group}, passes, calls, reference)
        if session.keep_originals and untouched:
            # Nothing upstream is compressed yet: the inputs are the original model's.
            for st in stats.values():
                st.cross = st.reference = st.hessian
        session.compress_group(group, stats)
        for name in group:
            memo.watch(session.compressed_layer(name))
    return None if recorded is None else recorded.outputs


def original_outputs(
    block: nn.Module, inputs: list[BlockInput], streams: Streams, session: BlockSession
) -> list[Tensor]:
    """The original block's outputs on the original stream (its original layers swapped in)."""
    session.use_original(True)
    try:
        return _run_block(block, inputs, streams.original)
    finally:
        session.use_original(False)


def advance(
    block: nn.Module,
    inputs: list[BlockInput],
    streams: Streams,
    original: list[Tensor] | None,
    memo: OutputMemo | None = None,
) -> Streams:
    """The next block's inputs: this block (compressed) on the compressed stream, and ``original``
    (``original_outputs``; None without the original-output target)."""
    compressed = _run_block(block, inputs, streams.compressed, memo)
    return Streams(compressed, compressed if original is None else original)


def block_runs(block: nn.Module, inputs: list[BlockInput]) -> list[Callable[[Tensor], Tensor]]:
    """Per batch: stream tensor -> block output, with that batch's other arguments."""
    return [lambda x, inp=inp: inp.call(block, x) for inp in inputs]


def batch_masks(batches: list[Any]) -> list[Tensor | None]:
    return [batch_token_mask(b) if isinstance(b, Mapping) else None for b in batches]
