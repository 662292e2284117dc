"""Regional compilation for training (`model.train_compile`): each repeated block compiled by torch.compile.

Eager, a training step is thousands of small operators (norms, rotary embedding, activations, residual adds,
autocast casts, LoRA branches), each a kernel launch and a trip through the dispatcher, forward and backward.
Compiling the whole model would trace the prompt assembly and the objectives too (host logic, data-dependent
shapes); compiling the repeated blocks only — the LLM's decoder layers, the vision tower's layers and SAM2's
two-way mask-decoder blocks — turns each block's forward and backward into a few fused kernels while the rest
stays eager.

- One compilation serves all the blocks of a stack. The blocks' attributes are constants of the compiled code
  (head sizes, norm epsilons, dropout rates, LoRA scales), which all blocks of a stack share; the one that differs,
  an LLM layer's index, is read only to update a KV cache, and training forward passes take none
  (`GroundedVLM.lm_hidden`). A block class compiles twice where a flag differs between its blocks (SAM2's first
  block skips the positional encoding), and once more per mode it runs in (the vision layers without autograd, the
  layers with gradient checkpointing).
- Training batches bring new sequence lengths at almost every step, so the blocks are compiled with dynamic sizes
  from the first call (`dynamic=True`): one compilation per block class and mode, not one per length.
- Sizes that happen to be equal at the first call stay separate symbols (no "duck sizing"): SAM2's block met 9
  masks of 9 tokens in a 4B `sft_dual` step, so its graph required the two to be equal and the next step (another
  number of masks) compiled it again.
- The compiled blocks are installed only while `active()` is entered — the learner's update, forward and
  backward — and the module's previous compiled call (None, or another one installed around it) is put back
  on exit: evaluation, the caption decoder (with its own compiled layers, `model.decode_compile`) and a rollout
  that shares the learner's model run as they would without this.
- Gradient checkpointing happens inside a layer's forward in transformers, so it is traced into the compiled
  block (torch.compile recomputes the checkpointed region itself in the backward pass).
- What calls a compiled block's kernels is inductor's wrapper, Python by default: about a millisecond of host time
  per block call at the 4B size, forward and backward, plus a trip through torch's dispatcher for each matrix product
  it hands to cuBLAS. Where the host, not the GPU, sets the pace (many small blocks, LoRA's many products),
  `wrapper="cpp"` has inductor write that wrapper in C++ and build it once per compilation (inductor's
  `cpp_wrapper`; the kernels are the same).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.fx.experimental._config
from torch import nn

# Past this many compiled variants of one function torch.compile runs it eagerly. Every compiled block's entry
# point is nn.Module's `_call_impl`, shared by the stacks here, the caption decoder's layers and any other model
# in the process (grad on/off, train/eval, float32/bf16 autocast each add a variant), hence well above the default 8.
RECOMPILE_LIMIT = 64


def block_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The repeated blocks of a GroundedVLM, by the stack's attribute path: the LLM's decoder layers, the vision
    tower's encoder layers, SAM2's two-way transformer blocks (a stack the model does not have is left out)."""
    paths = {
        "llm": ("vlm", "model", "language_model", "layers"),
        "vision": ("vlm", "model", "vision_tower", "encoder", "layer"),
        "sam_decoder": ("sam", "sam_mask_decoder", "transformer", "layers"),
    }
    stacks = {}
    for name, path in paths.items():
        module: object = model
        for attr in path:
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList) and len(module):
            stacks[name] = module
    if "llm" not in stacks:
        raise ValueError(
            f"model.train_compile: {type(model).__name__} has no LLM decoder layers to compile; "
            "set model.train_compile=false"
        )
    return stacks


class CompiledBlocks:
    """The compiled calls of a model's repeated blocks (made once; torch.compile traces lazily on first use),
    installed by `active()`."""

    def __init__(self, model: nn.Module, wrapper: Literal["python", "cpp"] = "python"):
        self.stacks = block_stacks(model)
        self.blocks: list[nn.Module] = [block for stack in self.stacks.values() for block in stack]
        self.wrapper = wrapper
        # inductor's options hold for the backward graph too, which it compiles at the first backward pass
        options = {"cpp_wrapper": wrapper == "cpp"}
        self._compiled: list[Callable] = [
            torch.compile(block._call_impl, dynamic=True, options=options) for block in self.blocks
        ]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The blocks run compiled inside the block (forward, and the backward of what ran inside it)."""
        previous = [block._compiled_call_impl for block in self.blocks]
        # float attributes as constants (with dynamic sizes torch.compile would otherwise make them inputs)
        with (
            torch._dynamo.config.patch(specialize_float=True, recompile_limit=RECOMPILE_LIMIT),
            torch.fx.experimental._config.patch(use_duck_shape=False),
        ):
            try:
                for block, compiled in zip(self.blocks, self._compiled):
                    block._compiled_call_impl = compiled
                yield
            finally:
                for block, impl in zip(self.blocks, previous):
                    block._compiled_call_impl = impl
