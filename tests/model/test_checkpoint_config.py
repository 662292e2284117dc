"""The checkpoint is the source of truth for its architecture: keys a recipe leaves out come from it, and a key set
against it stops the build, named. Checkpoints are tiny Sa2VA directories written by `save_sa2va` (with or without
dualrl's SAM2 record) or, for the real-scale recipes, a config.json and a safetensors header alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualrl.model.build import build_model
from dualrl.model.checkpoint_config import resolve_model_spec, standard_sam_config, weight_shapes
from dualrl.model.sa2va_format import save_sa2va
from dualrl.model.sa2va_layout import SAM_PREFIX, TEMPLATES
from dualrl.recipe import RecipeError, load_recipe, resolve_recipe
from tests.conftest import REAL_DATA_OFF, TINY

SAM_T = ["model.sam.config=configs/sam2/sam2_hiera_t.yaml", "model.sam.overrides=[]"]  # a released trunk
OFF = [*REAL_DATA_OFF, "output_dir=x"]  # a Sa2VA recipe without its data paths (none exist here)


def _tiny(*overrides):
    return load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x", "model.trainable.lora=false", *overrides]).model


def _sa2va_dir(path: Path, spec, template: str | None = None, record: bool = True):
    """A tiny Sa2VA directory from a model built from `spec`; `record=False` drops dualrl's SAM2 entry from
    config.json, as a directory written by Sa2VA's own convert_to_hf.py has none."""
    model = build_model(spec).eval()
    save_sa2va(model, model.tokenizer, path, template=template)
    if not record:
        config = json.loads((path / "config.json").read_text())
        del config["dualrl"]
        (path / "config.json").write_text(json.dumps(config))
    return path, model


def test_sam_settings_of_a_sa2va_checkpoint_are_not_overridden_silently(tmp_path):
    """As Sa2VA writes it (a released SAM2 trunk, no dualrl record), a directory implies SAM2 at 1024 px, no
    positional gain and three masks. The default recipe's 256 px, pe_gain 3 and single mask loaded with
    '0 mismatched' and computed other masks; now each is refused by key, and left out they are the checkpoint's."""
    directory, seed = _sa2va_dir(tmp_path / "sa2va", _tiny(*SAM_T), record=False)
    # The default recipe on it, with SAM2's trunk right: its weights loaded with 0 mismatched. Now the recipe is
    # refused when it loads (before anything is written or built), and a spec made otherwise when it builds.
    overrides = ["output_dir=x", "model.pretrained=null", f"model.sa2va={directory}", *SAM_T]
    with pytest.raises(RecipeError) as err:
        load_recipe("recipes/sft_dual.yaml", overrides)
    with pytest.raises(RecipeError) as built:
        build_model(resolve_recipe("recipes/sft_dual.yaml", overrides).model)
    assert str(built.value) == str(err.value)
    message = str(err.value)
    assert "model.sam.image_size: recipe 256 vs checkpoint 1024" in message
    assert "model.sam.pe_gain: recipe 3.0 vs checkpoint 1.0" in message
    assert "model.multimask: recipe False vs checkpoint True" in message
    assert "model.sam.config" not in message  # stated as the checkpoint's: fine

    only_path = load_recipe(
        None, base={"output_dir": "x", "model": {"sa2va": str(directory), "trainable": {"lora": False}}}
    ).model
    model = build_model(only_path)  # every architecture key from the checkpoint; its weights load
    sam = model.spec.sam
    assert (sam.config, sam.overrides, sam.image_size, sam.pe_gain) == ("configs/sam2/sam2_hiera_t.yaml", [], 1024, 1.0)
    assert model.spec.multimask and model.sam.image_size == 1024
    assert seed.vlm.state_dict().keys() == model.vlm.state_dict().keys()
    for name, a in seed.vlm.state_dict().items():
        assert torch.equal(a, model.vlm.state_dict()[name]), name

    # An official SAM2 checkpoint implies the same SAM2 settings.
    torch.save({"model": seed.sam.state_dict()}, tmp_path / "sam.pt")
    with pytest.raises(
        RecipeError, match=r"model\.sam\.pe_gain: recipe 3\.0 vs checkpoint 1\.0 \(model\.sam\.checkpoint"
    ):
        build_model(_tiny(*SAM_T, f"model.sam.checkpoint={tmp_path / 'sam.pt'}"))


def test_chat_template_comes_from_the_checkpoint(tmp_path):
    """A Qwen-template checkpoint ran the default phi3 turns when the recipe left `model.prompts.chat` out; now it
    runs its own turns and answer end, and a recipe that sets phi3's is refused, naming the key."""
    directory, _ = _sa2va_dir(tmp_path / "sa2va", _tiny(), template="qwen_chat")
    model = build_model(_tiny(f"model.sa2va={directory}"))
    qwen_turns, qwen_end = TEMPLATES["qwen_chat"]
    assert (model.spec.prompts.chat, model.spec.prompts.answer_end) == (qwen_turns, qwen_end)
    phi3 = json.dumps(TEMPLATES["phi3_chat"][0])
    with pytest.raises(RecipeError, match=r"model\.prompts\.chat: recipe '<\|user\|>.* vs checkpoint '<\|im_start\|>"):
        build_model(_tiny(f"model.sa2va={directory}", f"model.prompts.chat={phi3}"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "template": "vicuna"}))
    with pytest.raises(RecipeError, match=r"model\.prompts\.chat: .*template 'vicuna'.*set it in the recipe"):
        build_model(_tiny(f"model.sa2va={directory}"))
    build_model(_tiny(f"model.sa2va={directory}", f"model.prompts.chat={phi3}"))  # stated: the recipe's turns


def test_tied_and_untied_checkpoints_name_the_key_to_set(tmp_path):
    tied, _ = _sa2va_dir(tmp_path / "tied", _tiny())
    with pytest.raises(
        RecipeError,
        match=r"model\.text\.tie_word_embeddings: recipe False vs checkpoint True .*ties lm_head to the input "
        r"embedding: set model\.text\.tie_word_embeddings=true or leave the key out",
    ):
        build_model(_tiny(f"model.sa2va={tied}", "model.text.tie_word_embeddings=false"))
    untied, _ = _sa2va_dir(tmp_path / "untied", _tiny("model.text.tie_word_embeddings=false"))
    with pytest.raises(RecipeError, match=r"set model\.text\.tie_word_embeddings=false"):
        build_model(_tiny(f"model.sa2va={untied}", "model.text.tie_word_embeddings=true"))
    assert not build_model(_tiny(f"model.sa2va={untied}")).vlm.config.tie_word_embeddings


def test_a_recipe_without_architecture_keys_builds_the_same_model(tmp_path, region_batch):
    """The Sa2VA-8B recipe at tiny size, once with every architecture key stated (as the recipe used to) and once
    with none: the same parameter shapes and the same masks and hidden states on a fixed batch."""
    from tests.test_sa2va_8b_flow import RECIPE, TINY_8B

    seed = load_recipe(RECIPE, [*TINY_8B, "model.sa2va=null", "output_dir=x", "model.trainable.lora=false"]).model
    directory, _ = _sa2va_dir(tmp_path / "sa2va", seed, template="internlm2_chat")
    common = [*OFF, f"model.sa2va={directory}", "model.precision=float32", "model.trainable.lora_r=8"]
    stated = build_model(load_recipe(RECIPE, [*TINY_8B, *common]).model).eval()
    bare = build_model(load_recipe(RECIPE, common).model).eval()
    assert bare.spec.text.arch == "internlm2" and not bare.vlm.config.tie_word_embeddings
    shapes = {n: p.shape for n, p in stated.named_parameters()}
    assert shapes == {n: p.shape for n, p in bare.named_parameters()}
    with torch.no_grad():
        a = stated.segment(region_batch["images"], region_batch["expression"])
        b = bare.segment(region_batch["images"], region_batch["expression"])
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


# Architectures the real-scale recipes stated before they left them to the checkpoint (InternViT-300M for all).
VIT_300M = {"hidden_size": 1024, "layers": 24, "heads": 16, "intermediate_size": 4096, "image_size": 448}
STATED = {
    "sa2va_4b_sft_dual": (
        "phi3_chat",
        dict(hidden_size=2048, layers=36, heads=16, kv_heads=2, intermediate_size=11008),
    ),
    "sa2va_1b_sft_dual": ("qwen_chat", dict(hidden_size=896, layers=24, heads=14, kv_heads=2, intermediate_size=4864)),
    "sa2va_internvl3_2b_sft_dual": (
        "qwen_chat",
        dict(hidden_size=1536, layers=28, heads=12, kv_heads=2, intermediate_size=8960),
    ),
    "sa2va_internvl3_8b_sft_dual": (
        "qwen_chat",
        dict(hidden_size=3584, layers=28, heads=28, kv_heads=4, intermediate_size=18944, tie_word_embeddings=False),
    ),
    "sa2va_8b_sft_dual": (
        "internlm2_chat",
        dict(
            arch="internlm2",
            hidden_size=4096,
            layers=32,
            heads=32,
            kv_heads=8,
            intermediate_size=14336,
            vocab_size=92558,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        ),
    ),
}
QWEN_TEXT = dict(
    arch="qwen2",
    vocab_size=151674,
    tie_word_embeddings=True,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)


def _stated(name: str) -> list[str]:
    """The recipe keys that recipe `name` used to state (its own and the 4B recipe's it extended)."""
    template, text = STATED[name]
    text = {**QWEN_TEXT, **text}
    vision = {**VIT_300M, "patch_size": 14, "qkv_bias": True}
    sam = {"config": "configs/sam2/sam2_hiera_l.yaml", "image_size": 1024, "overrides": [], "pe_gain": 1.0}
    chat, end = TEMPLATES[template]
    return [
        *(f"model.text.{k}={json.dumps(v)}" for k, v in text.items()),
        *(f"model.vision.{k}={json.dumps(v)}" for k, v in vision.items()),
        *(f"model.sam.{k}={json.dumps(v)}" for k, v in sam.items()),
        "model.multimask=true",
        f"model.prompts.chat={json.dumps(chat)}",
        f"model.prompts.answer_end={json.dumps(end)}",
    ]


def _sa2va_4b_like(directory: Path, name: str) -> None:
    """What resolution reads of a real Sa2VA directory: its config.json (as Sa2VA writes it, no dualrl entry) and the
    safetensors header (embedding rows, SAM2 hiera-l trunk). The header stands alone: no tensor data follows it."""
    template, text = STATED[name]
    text = {**QWEN_TEXT, **text}
    llm_names = {"qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM"}
    llm = {
        "architectures": [llm_names[text["arch"]]],
        "hidden_size": text["hidden_size"],
        "num_hidden_layers": text["layers"],
        "num_attention_heads": text["heads"],
        "num_key_value_heads": text["kv_heads"],
        "intermediate_size": text["intermediate_size"],
        "vocab_size": text["vocab_size"] - 14,  # the config predates the added tokens; the rows count
        "tie_word_embeddings": text["tie_word_embeddings"],
        "rope_theta": text["rope_theta"],
        "rms_norm_eps": text["rms_norm_eps"],
        "max_position_embeddings": text["max_position_embeddings"],
    }
    vision = {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": 448,
        "patch_size": 14,
        "qkv_bias": True,
        "layer_norm_eps": 1e-6,
    }
    config = {"architectures": ["Sa2VAChatModel"], "template": template, "llm_config": llm, "vision_config": vision}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    embed = "language_model.model.tok_embeddings.weight" if text["arch"] == "internlm2" else None
    embed = embed or "language_model.model.embed_tokens.weight"
    trunk = SAM_PREFIX + "image_encoder.trunk."
    shapes = {embed: [text["vocab_size"], text["hidden_size"]], trunk + "patch_embed.proj.weight": [144, 3, 7, 7]}
    shapes.update({f"{trunk}blocks.{i}.norm1.weight": [144] for i in range(48)})
    shapes[SAM_PREFIX + "sam_mask_decoder.conv_s0.weight"] = [32, 256, 1, 1]
    header = json.dumps({k: {"dtype": "BF16", "shape": v, "data_offsets": [0, 0]} for k, v in shapes.items()}).encode()
    (directory / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize("name", list(STATED))
def test_sa2va_recipes_take_what_they_stated_from_the_checkpoint(name, tmp_path):
    """Each real-scale Sa2VA recipe, now without architecture keys, resolves against its checkpoint to the model it
    used to state key by key (the same ModelSpec, so the same build); stating them all is still accepted."""
    _sa2va_4b_like(tmp_path / "ckpt", name)
    assert standard_sam_config(weight_shapes(tmp_path / "ckpt"), SAM_PREFIX) == "configs/sam2/sam2_hiera_l.yaml"
    overrides = [*OFF, f"model.sa2va={tmp_path / 'ckpt'}"]
    bare = resolve_recipe(f"recipes/sa2va/{name}.yaml", overrides).model  # as written, before resolution
    stated = resolve_recipe(f"recipes/sa2va/{name}.yaml", [*overrides, *_stated(name)]).model
    assert load_recipe(f"recipes/sa2va/{name}.yaml", overrides).model == resolve_model_spec(bare)
    architecture = ("vision", "text", "sam", "prompts", "multimask")
    assert not set(architecture) & bare.model_fields_set  # the recipe states none of it
    assert resolve_model_spec(bare).model_dump() == resolve_model_spec(stated).model_dump() == stated.model_dump()


@pytest.mark.parametrize("name", ["sa2va_4b_sft_dual", "sa2va_4b_grpo"])
def test_random_init_recipes_state_the_checkpoints_architecture(name, tmp_path):
    """The GPU benchmarks' Sa2VA-4B shape without a checkpoint (recipes/sa2va/random_init/) is the model the Sa2VA
    recipe takes from a Sa2VA-4B checkpoint, and the rest of that recipe is unchanged."""
    _sa2va_4b_like(tmp_path / "ckpt", "sa2va_4b_sft_dual")
    from_checkpoint = load_recipe(f"recipes/sa2va/{name}.yaml", [*OFF, f"model.sa2va={tmp_path / 'ckpt'}"])
    random_init = load_recipe(f"recipes/sa2va/random_init/{name}.yaml", [*OFF, "model.init_from=null"])
    assert random_init.model.sa2va is None
    assert random_init.model.model_copy(update={"sa2va": None, "init_from": None}).model_dump() == (
        from_checkpoint.model.model_copy(update={"sa2va": None, "init_from": None}).model_dump()
    )
    assert random_init.model_copy(update={"model": None, "output_dir": "x"}).model_dump() == (
        from_checkpoint.model_copy(update={"model": None, "output_dir": "x"}).model_dump()
    )
