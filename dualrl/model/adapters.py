"""Export a LoRA-trained model as a PEFT adapter directory.

    DEST/adapter_config.json        PEFT's LoraConfig (target modules, r, alpha, trainable token rows)
    DEST/adapter_model.safetensors  the LLM's LoRA A/B and new-token rows, PEFT's key names
    DEST/dualrl_heads.safetensors   everything else that trained: SAM2's mask decoder and prompt encoder,
                                    text_hidden_fcs, InternVL's projector (mlp1), under dualrl's module names

The adapter applies to the transformers-native `InternVLForConditionalGeneration` the model was built on:
`PeftModel.from_pretrained(base_vlm, DEST)` gives its language model exactly as trained here. The heads file
is what a GroundedVLM needs on top (`GroundedVLM.load_trainable` reads it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from dualrl.model.grounded_vlm import GroundedVLM

PEFT_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules


def save_peft_adapter(model: GroundedVLM, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    if not hasattr(model.vlm, "peft_config"):
        raise ValueError(
            "the model has no LoRA adapter (model.trainable.lora was false): export it as a model "
            "directory or in the Sa2VA layout instead"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter = get_peft_model_state_dict(model.vlm)
    save_file(
        {PEFT_PREFIX + k: v.detach().to("cpu", dtype).contiguous() for k, v in adapter.items()},
        str(directory / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = model.vlm.peft_config["default"]
    config.base_model_name_or_path = None
    config.save_pretrained(str(directory))
    heads = {
        k: v.detach().to("cpu", dtype).contiguous()
        for k, v in model.trainable_state().items()
        if "lora_" not in k and "token_adapter" not in k
    }
    save_file(heads, str(directory / "dualrl_heads.safetensors"), metadata={"format": "pt"})
    return directory
