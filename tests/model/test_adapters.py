"""PEFT adapter export: PeftModel.from_pretrained on the native base VLM gives the trained LLM's logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from dualrl.model.adapters import save_peft_adapter
from dualrl.model.build import build_model
from dualrl.model.tokenizer import SA2VA_TOKENS


@pytest.mark.parametrize("arch", ["qwen2", "internlm2"])
def test_peft_adapter_round_trip(tiny_spec, tmp_path, arch):
    spec = tiny_spec.model_copy(deep=True)
    spec.trainable.lora_dropout = 0.0
    spec.text.arch = arch  # internlm2: the adapter is for the Llama-named native model
    trained = build_model(spec).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: non-zero LoRA B and new-token rows
        for name, p in trained.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "sam_mask_decoder" in name:
                p.add_(0.01)
    save_peft_adapter(trained, tmp_path)
    base_spec = spec.model_copy(deep=True)
    base_spec.trainable.lora = False
    base = build_model(base_spec).eval()  # same seed: the same base weights, no adapter
    seg = trained.tokenizer.convert_tokens_to_ids(list(SA2VA_TOKENS))
    ids = torch.tensor([[5, 6, *seg, 7]])
    with torch.no_grad():
        want = trained.vlm(input_ids=ids).logits
        before = base.vlm(input_ids=ids).logits
        got = PeftModel.from_pretrained(base.vlm, str(tmp_path)).eval()(input_ids=ids).logits
    assert (want - before).abs().max() > 1e-2  # the adapter matters
    assert (want - got).abs().max() < 1e-5
    heads = load_file(str(tmp_path / "dualrl_heads.safetensors"))
    assert any("sam_mask_decoder" in k for k in heads) and not any("lora_" in k for k in heads)
    torch.testing.assert_close(
        heads["sam.sam_mask_decoder.iou_token.weight"], trained.sam.sam_mask_decoder.iou_token.weight
    )
