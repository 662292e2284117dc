"""The Sa2VA-8B recipe end to end at tiny sizes: an InternLM2 Sa2VA directory in, sft_dual and grpo through the
driver, export back to the Sa2VA layout, and `dualrl.eval` on the run. The recipe's answer end `<|im_end|>` is
several tokens of the tiny tokenizer, so captions stop on it as text."""

from __future__ import annotations

import json

import torch

from dualrl.eval.cli import main as eval_main
from dualrl.export import main as export_main
from dualrl.model.build import build_model
from dualrl.model.sa2va_convert import from_sa2va
from dualrl.model.sa2va_format import load_sa2va_state, save_sa2va
from dualrl.recipe import load_recipe
from dualrl.train import run
from tests.conftest import TINY

RECIPE = "recipes/sa2va/sa2va_8b_sft_dual.yaml"
# The 8B recipe at tiny sizes: what Sa2VA-8B's checkpoint states (InternLM2, untied, the internlm2_chat turns and
# answer end) at tiny sizes. The seed model is built from these keys; the runs state them too, equal to the
# checkpoint's, so that the recipe each run writes out reads back the same wherever it is loaded.
IM_TURN = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
TINY_8B = [
    *TINY,
    "model.text.arch=internlm2",
    "model.text.tie_word_embeddings=false",
    "model.prompts.chat=" + json.dumps(IM_TURN),
    "model.prompts.answer_end=<|im_end|>",
    "model.vision.hidden_size=64",
    "model.vision.layers=2",
    "model.vision.heads=2",
    "model.vision.intermediate_size=256",
    "model.vision.image_size=128",
    "model.vision.patch_size=8",
    "model.text.hidden_size=128",
    "model.text.layers=2",
    "model.text.heads=4",
    "model.text.kv_heads=2",
    "model.text.intermediate_size=256",
    "model.text.vocab_size=512",
    "model.sam.config=configs/sam2/sam2_hiera_t.yaml",
    "model.sam.overrides=" + json.dumps(load_recipe("recipes/sft_dual.yaml", ["output_dir=x"]).model.sam.overrides),
    "model.precision=float32",
    "model.generation_cache=dynamic",
    "model.init_from=null",
    "data.refcoco=null",
    "data.sa1b=null",
    "data.sav=null",
    "data.openimages=null",
    "data.shapes={val_size: 4}",
    "data.eval_source=shapes",
    "data.eval_size=4",
    "data.num_workers=0",
    "data.image_size=128",
    "optim.accumulation=2",
    "train.steps=2",
    "train.save_every=2",
    "eval.every=2",
    "rewards=[{name: mask_iou}]",
]


def test_internlm2_sa2va_directory_through_train_export_and_eval(tmp_path):
    seed_spec = load_recipe(RECIPE, [*TINY_8B, "model.sa2va=null", f"output_dir={tmp_path / 'x'}"]).model
    assert seed_spec.text.arch == "internlm2" and seed_spec.prompts.answer_end == "<|im_end|>"
    seed_spec.trainable.lora = False
    source = build_model(seed_spec)
    assert len(source.end_ids) > 1  # <|im_end|> is text to the tiny tokenizer
    save_sa2va(source, source.tokenizer, tmp_path / "Sa2VA-8B-tiny", template="qwen_chat")

    common = [*TINY_8B, f"model.sa2va={tmp_path / 'Sa2VA-8B-tiny'}"]
    summary = run(load_recipe(RECIPE, [*common, f"output_dir={tmp_path / 'sft'}"]))
    assert "eval/cycle_miou" in summary["final"]
    grpo = run(
        load_recipe(
            RECIPE,
            [
                *common,
                f"output_dir={tmp_path / 'grpo'}",
                "algo.name=grpo",
                "algo.grpo.num_generations=2",
                f"model.init_from={tmp_path / 'sft'}",
            ],
        )
    )
    assert "eval/cycle_miou" in grpo["final"]

    assert export_main([str(tmp_path / "sft"), str(tmp_path / "export"), "--format", "sa2va"]) == 0
    state = load_sa2va_state(tmp_path / "export")
    assert "language_model.model.layers.0.attention.wqkv.weight" in state
    assert json.loads((tmp_path / "export" / "config.json").read_text())["llm_config"]["architectures"] == [
        "InternLM2ForCausalLM"
    ]
    fresh = build_model(seed_spec)
    assert not from_sa2va(fresh, state).real
    moved = [k for k in state if k.startswith(("text_hidden_fcs", "language_model.model.tok_embeddings"))]
    before = load_sa2va_state(tmp_path / "Sa2VA-8B-tiny")
    assert any(not torch.equal(state[k], before[k]) for k in moved)  # the trained weights came out

    out = tmp_path / "eval.json"
    assert eval_main([str(tmp_path / "sft"), "--data", "shapes", "--max-regions", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["regions"] == 4
