"""Caption decoding engine: one prefill per region prompt, a fixed-shape decode step, CUDA graphs on GPUs.

`generate` pays for every prompt copy and every token step in Python and kernel launches, and a static
cache compiled per prompt shape recompiles whenever a batch brings new prompt lengths. This engine runs the
same transformers modules (the VLM's language model, its input embedding and `lm_head`) in three parts:

1. **prefill**: the B distinct region prompts, left-padded to a multiple of `prefill_bucket` tokens (a few
   shapes only), in one forward pass; its keys and values are written once per sample row (G rows per region
   share one prefill) into a KV cache of fixed slots;
2. **decode**: one token per row per step against that cache. The cache holds `capacity` prompt slots (the
   prompt sits right-aligned in them, the unused ones masked) plus `max_new` answer slots, so the step's
   shapes depend on the number of rows and the capacity only — not on this batch's prompt lengths. On CUDA
   the step is captured once as a CUDA graph per (rows, capacity) and replayed (the gpt-fast idea, around
   transformers' own modules), optionally compiled by torch.compile first (`compile`: fused elementwise kernels);
   the capacity grows in steps of `bucket` when a longer prompt comes;
3. **choice**: greedy argmax, or sampling as `generate` samples (temperature, then top-k, then top-p), with
   the chosen token's log-prob under the temperature-scaled distribution; rows stop at the answer end, and
   the loop stops when every row has ended.

Positions and masks are `generate`'s for left-padded prompts (positions count the row's real tokens), so
greedy captions are `generate`'s (tested on the tiny model). Attention runs as `packed_sdpa` (eager stays eager),
and plain LoRA is folded into weight copies for the call (`lora_merge.py`); the model itself is left as it was.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualrl.model.decode_attention import (
    PACKED_SDPA,
    additive_mask,
    attention_implementation,
    decode_mask,
    register_packed_sdpa,
)
from dualrl.model.fused_projections import FusedProjections
from dualrl.model.lora_merge import MergedLora
from dualrl.model.sampling import Sampling, choose


@dataclass
class Decoded:
    tokens: Tensor  # [N, T] generated ids; `pad_id` after a row ended
    logprobs: Tensor  # [N, T] float32 log-prob of each token under the temperature-scaled distribution


class _PromptKV:
    """What the attention layers write during the prefill: each layer's prompt keys and values, kept to be
    copied into the decode cache. Attention runs over the prompt itself, so `update` returns its input."""

    def __init__(self):
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    @torch.compiler.disable  # compiled layers would specialise on the layer number (one compilation per layer)
    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked by some transformers versions; no past here
        return 0


class _SlotKV:
    """A KV cache of fixed slots, [layers, rows, kv_heads, slots, head_dim] for keys and for values. The attention
    layers call `update`, which writes the step's keys and values at `slot` (a device tensor, so a captured graph
    reads the position it is replayed at) and returns the layer's whole cache; the attention mask hides unused
    slots. One tensor for all layers, indexed by the layer's number, so the compiled layers share one compilation
    (a list of tensors would be indexed at trace time, one compilation per layer)."""

    def __init__(self, prompt: _PromptKV, rows: int, slots: int):
        def alloc(t: Tensor) -> Tensor:
            return t.new_zeros(len(prompt.keys), rows, t.shape[1], slots, t.shape[3])

        self.keys = alloc(prompt.keys[0])
        self.values = alloc(prompt.values[0])
        self.slot = torch.zeros(1, dtype=torch.long, device=self.keys.device)

    def fits(self, prompt: _PromptKV) -> bool:
        k = prompt.keys[0]
        mine = self.keys[0]
        return len(prompt.keys) == len(self.keys) and k.dtype == mine.dtype and k.shape[1] == mine.shape[1]

    def load(self, prompt: _PromptKV, group: int, start: int) -> None:
        """The prompt's keys and values into slots start .. start+L, each prompt row copied to its `group` rows."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            length = prompt.keys[layer].shape[2]
            k[:, :, start : start + length] = prompt.keys[layer].repeat_interleave(group, dim=0)
            v[:, :, start : start + length] = prompt.values[layer].repeat_interleave(group, dim=0)

    @torch.compiler.disable
    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        # outside the compiled layers: compiled, the write into a view at a layer-dependent offset cannot be proven
        # not to overlap, and inductor copies the layer's whole cache to write one slot (measured: 12 us a write)
        self.keys[layer_idx].index_copy_(2, self.slot, key)
        self.values[layer_idx].index_copy_(2, self.slot, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # positions are always passed explicitly
        return 0


class _DecodeState:
    """Everything one (rows, capacity) shape needs across steps and calls: the slot cache, the step's input
    buffers (token, position, the slots each row may attend), its output (logits) and, on CUDA, the captured graph."""

    def __init__(self, prompt: _PromptKV, rows: int, capacity: int, max_new: int):
        self.rows, self.capacity, self.max_new = rows, capacity, max_new
        self.kv = _SlotKV(prompt, rows, capacity + max_new)
        device = self.kv.slot.device
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.allowed = torch.zeros(rows, capacity + max_new, dtype=torch.bool, device=device)
        self.logits: Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None


def _not_reentrant(method: Callable) -> Callable:
    """A decoding call inside another (e.g. a describe from an answer-end callback) would overwrite the outer
    call's cache and buffers: refused."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self._busy:
            raise RuntimeError(
                "CaptionDecoder is not re-entrant: a describe inside a decoding call (e.g. from an "
                "answer-end callback) would overwrite its cache"
            )
        self._busy = True
        try:
            return method(self, *args, **kwargs)
        finally:
            self._busy = False

    return guarded


class CaptionDecoder:
    """Decodes captions for assembled, left-padded region prompts with a model's language model.

    `lm` is the transformers decoder (called with `inputs_embeds`, a 4-D attention mask, explicit positions and a
    cache object). `weights()` gives the token embedding matrix and the output head's matrix as this call must use
    them (trainable token rows merged in, once per call rather than once per token step; one tensor for both when
    tied). With `graphs`, the decode step is a CUDA graph on CUDA devices (ignored elsewhere). `autocast` is the
    context forward passes run in (bf16 autocast or none); inside graphs its weight-cast cache is off, so trainable
    float32 weights updated in place between calls are cast again at every replay."""

    def __init__(
        self,
        weights: Callable[[], tuple[Tensor, Tensor]],
        lm: nn.Module,
        attn_implementation: str,
        autocast: Callable[[], contextlib.AbstractContextManager],
        graphs: bool = True,
        bucket: int = 128,
        keep: int = 2,
        merge_lora: bool = True,
        prefill_bucket: int = 64,
        compile: bool = False,
        fuse: bool = False,
    ):
        self.weights, self.lm = weights, lm
        # q/k/v and gate/up as one product each (LoRA folded into the fused copies, not into MergedLora's)
        self.fused = FusedProjections(lm) if fuse else None
        self.lora = MergedLora(lm, skip=self.fused.lora_layers() if fuse else ()) if merge_lora else None
        self._merged = False  # this call decodes with the merged LoRA copies
        self._fusing = False  # ... and with the fused projections
        self._busy = False
        self._placed: dict[str, tuple[int, bool]] = {}  # held matrix -> (its storage as placed, a model parameter)
        # attention runs as `packed_sdpa` here (no KV copy per query head); eager stays transformers' own
        self.attn_implementation = "eager" if attn_implementation == "eager" else PACKED_SDPA
        self._attention = None
        if self.attn_implementation == PACKED_SDPA:
            register_packed_sdpa()
            self._attention = PACKED_SDPA
        self._embed: Tensor | None = None  # this call's matrices, at addresses that stay (graphs read them)
        self._head: Tensor | None = None
        # transformers renamed the decoder's cache argument (past_key_values -> cache) in 5.2x
        self._cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self.autocast = autocast
        self.graphs, self.bucket, self.keep, self.prefill_bucket = graphs, bucket, keep, prefill_bucket
        self._states: OrderedDict[tuple[int, int], _DecodeState] = OrderedDict()
        self.captures = 0  # CUDA graphs captured so far (a new shape, or a longer prompt than seen)
        # the step's decoder layers compiled by torch.compile (inductor fuses the norms, rotary embedding,
        # activations and residual adds: hundreds of small kernels a step), then captured as a graph on CUDA.
        # The layers are alike, so one compilation serves them all (compiling the whole step took 30-45 s at 4B)
        self.compile = compile
        self._compiled: list[Callable] | None = None
        self._lengths_dynamic = False  # the compiled layers have met two prefill lengths

    # ------------------------------------------------------------------------------------------ run
    @torch.no_grad()
    @_not_reentrant
    def __call__(
        self,
        embeds: Tensor,
        attention: Tensor,
        group: int,
        max_new: int,
        sampling: Sampling,
        eos_id: int | None,
        pad_id: int,
        ended: Callable[[Tensor], Tensor] | None = None,
    ) -> Decoded:
        """`embeds` [B, L, H] and `attention` [B, L] (1 = real token): B left-padded prompts, each decoded into
        `group` consecutive rows. A row ends at `eos_id`, or where `ended(tokens so far)` says so (a text
        answer end, checked on the host each step); later tokens of an ended row are `pad_id`."""
        pad = -attention.shape[1] % self.prefill_bucket
        if pad:  # a few prefill lengths only: attention kernels prepare a plan per new shape (seen: ~1 s each)
            embeds = F.pad(embeds, (0, 0, pad, 0))
            attention = F.pad(attention, (pad, 0))
        b, length = attention.shape
        rows = b * group
        device = embeds.device
        valid = attention.bool()
        self._load_weights()
        compiled = self._compiled_layers() if self.compile else contextlib.nullcontext()
        with self.autocast(), self._attending(), compiled:
            if self.compile and not self._lengths_dynamic:
                # A second prompt length in the first call: torch.compile then compiles the layers for any length,
                # here, in the warm-up, rather than in whichever later step first brings a new length (seen: a 9 s
                # stall at the 4B shape). The prompt padded by one more bucket on the left; its output is dropped.
                bucket = self.prefill_bucket
                self._prefill(F.pad(embeds, (0, 0, bucket, 0)), F.pad(attention, (bucket, 0)))
                self._lengths_dynamic = True
            prompt, hidden = self._prefill(embeds, attention)
            logits = F.linear(hidden[:, -1], self._head).float().repeat_interleave(group, dim=0)

        state = self._state(prompt, rows, length, max_new)
        start = state.capacity - length  # the prompt sits right-aligned in the prompt slots
        state.kv.load(prompt, group, start)
        del prompt, hidden
        state.allowed.zero_()
        state.allowed[:, start : state.capacity] = valid.repeat_interleave(group, dim=0)
        state.positions.copy_(valid.sum(dim=1, keepdim=True).repeat_interleave(group, dim=0))

        tokens = torch.full((rows, max_new), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, max_new, dtype=torch.float32, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        steps = 0
        for t in range(max_new):
            token, logprob = choose(logits, sampling)
            token = token.masked_fill(done, pad_id)
            tokens[:, t], logprobs[:, t] = token, logprob
            steps = t + 1
            if eos_id is not None:
                done |= token == eos_id
            if ended is not None:
                done |= ended(tokens[:, :steps])
                if bool(done.all()):
                    break
            elif (t % 8 == 7 or t == max_new - 1) and bool(done.all()):  # a host sync every 8 steps only
                break
            if t == max_new - 1:
                break
            slot = state.capacity + t
            state.tokens[:, 0] = token
            state.kv.slot.fill_(slot)
            state.allowed[:, slot] = True
            logits = self._step(state)
            state.positions += 1
        return Decoded(tokens[:, :steps], logprobs[:, :steps])

    # ------------------------------------------------------------------------------------- internals
    def _prefill(self, embeds: Tensor, attention: Tensor) -> tuple[_PromptKV, Tensor]:
        """The prompts through the LLM: their keys and values, and the last layer's hidden states."""
        length, device = attention.shape[1], embeds.device
        valid = attention.bool()
        # generate's positions for left padding: each row counts its own tokens from 0
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)[None]
        prompt = _PromptKV()
        hidden = self.lm(
            inputs_embeds=embeds,
            attention_mask=self._mask(allowed, embeds.dtype),
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: prompt},
        ).last_hidden_state
        return prompt, hidden

    def _mask(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        return decode_mask(allowed, self.attn_implementation, dtype)

    def _state(self, prompt: _PromptKV, rows: int, length: int, max_new: int) -> _DecodeState:
        """The decode state for `rows` rows whose prompt slots hold `length` tokens, reused while the shape
        holds; the `keep` most recently used shapes stay allocated."""
        key = (rows, max_new)
        state = self._states.get(key)
        if state is None or state.capacity < length or not state.kv.fits(prompt):
            capacity = -(-length // self.bucket) * self.bucket
            if state is not None:
                capacity = max(capacity, state.capacity)
            self._states.pop(key, None)
            state = _DecodeState(prompt, rows, capacity, max_new)
            while len(self._states) >= self.keep:
                self._states.popitem(last=False)
        self._states[key] = state
        self._states.move_to_end(key)
        return state

    def _load_weights(self) -> None:
        """This call's embedding, head and merged LoRA matrices into place. A plain parameter is used where it is;
        a merged matrix (made afresh) is copied into the buffer the graphs read. When a buffer had to be replaced
        (another shape or dtype), every captured graph is dropped: it would read the old one."""
        embed, head = self.weights()
        merged = self.lora is not None and self.lora.usable()
        fusing = self.fused is not None and self.fused.usable()
        replaced = merged != self._merged or fusing != self._fusing  # graphs captured with the other weights
        self._merged, self._fusing = merged, fusing
        if merged:
            replaced |= self.lora.refresh()
        if fusing:
            replaced |= self.fused.refresh()

        def place(name: str, new: Tensor, held: Tensor | None) -> Tensor:
            """A model parameter is used where it is, as long as it keeps the storage it was placed with; a fresh
            merged matrix is copied into the buffer this decoder owns (never into a parameter)."""
            nonlocal replaced
            ptr, was_param = self._placed.get(name, (None, False))
            fits = held is not None and held.shape == new.shape and held.dtype == new.dtype
            if isinstance(new, nn.Parameter):
                if fits and was_param and new is held and new.data_ptr() == ptr:
                    return held
            elif fits and not was_param:
                held.copy_(new)
                return held
            replaced = True
            self._placed[name] = (new.data_ptr(), isinstance(new, nn.Parameter))
            return new

        self._embed = place("embed", embed, self._embed)
        self._head = self._embed if head is embed else place("head", head, self._head)
        if replaced:
            self._states.clear()

    @contextlib.contextmanager
    def _attending(self):
        """How the decoder's modules run here: packed sdpa, and merged LoRA weights when there are any."""
        merged = self.lora.active() if self._merged else contextlib.nullcontext()
        fused = self.fused.active() if self._fusing else contextlib.nullcontext()
        with attention_implementation(self.lm.config, self._attention), merged, fused:
            yield

    @contextlib.contextmanager
    def _compiled_layers(self):
        """The decoder layers run compiled for the block's duration: the decode step, and the prefill (its lengths
        come in buckets of `prefill_bucket`, so few shapes). Static shapes at first; a second shape makes
        torch.compile mark those sizes dynamic, so later shapes reuse that compilation instead of compiling again.
        The layers' integer attributes are left unspecialised, so the second layer's number makes it dynamic rather
        than compiling once per layer. The layers' code is transformers' own, shared by every model in the process
        (eval, float32 checks, another dtype), so the recompilation limit is raised: past it torch.compile would
        run them eagerly."""
        layers = _decoder_layers(self.lm)
        if self._compiled is None:
            self._compiled = [torch.compile(layer._call_impl) for layer in layers]
        previous = [layer._compiled_call_impl for layer in layers]  # None, or the learner's (model.train_compile)
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, recompile_limit=64):
            try:
                for layer, compiled in zip(layers, self._compiled):
                    layer._compiled_call_impl = compiled
                yield
            finally:
                for layer, impl in zip(layers, previous):
                    layer._compiled_call_impl = impl

    def _lm_step(self, tokens: Tensor, positions: Tensor, allowed: Tensor, kv: _SlotKV) -> Tensor:
        """The decode step proper: next-token logits (float32) for the rows' last tokens. The mask is made additive
        here, once for all layers (sdpa would otherwise convert a boolean one in every layer)."""
        embeds = F.embedding(tokens, self._embed)
        hidden = self.lm(
            inputs_embeds=embeds,
            attention_mask=additive_mask(allowed[:, None, None, :], kv.keys[0].dtype),
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: kv},
        ).last_hidden_state
        return F.linear(hidden[:, -1], self._head).float()

    def _forward(self, state: _DecodeState, compiled: bool = False) -> Tensor:
        with self._attending(), self._compiled_layers() if compiled else contextlib.nullcontext():
            return self._lm_step(state.tokens, state.positions, state.allowed, state.kv)

    def _step(self, state: _DecodeState) -> Tensor:
        """One decode step: eager, or the state's CUDA graph (captured on first use)."""
        use_graph = self.graphs and state.kv.slot.device.type == "cuda"
        if not use_graph:
            with self.autocast():
                return self._forward(state, self.compile)
        if state.graph is None:
            self._capture(state)
        state.graph.replay()
        return state.logits

    def _capture(self, state: _DecodeState) -> None:
        """Warm up on a side stream (lazy initialisations stay out of the graph), then capture. The warm-up
        and the capture compute this very step (same slot, same inputs), so what they write is what the
        replay that follows writes."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self.autocast(), _cast_cache_off("cuda"):
            for _ in range(2):
                self._forward(state, self.compile)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self.autocast(), _cast_cache_off("cuda"):
            state.logits = self._forward(state, self.compile)
        state.graph = graph
        self.captures += 1


def _decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The transformers decoder's stack of layers (`layers`, as every decoder-only LM in transformers names it)."""
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"model.decode_compile: {type(lm).__name__} has no `layers` list of decoder layers to compile")
    return layers


def _cast_cache_off(device_type: str) -> contextlib.AbstractContextManager:
    """The autocast in force (the model's, or a caller's) with its weight-cast cache off: a cast cached before the
    capture would be frozen into the graph, which must cast the current weights at every replay."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)
