"""The `model:` section: the GroundedVLM's architecture, where its weights come from, what trains, its prompts
and how it generates. The sizes default to the tiny CPU model; a real checkpoint's recipe states its own."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dualrl.recipe.section import MAX_IMAGE_SIZE, Section


class VisionSpec(Section):
    """InternViT-shaped vision tower (tiny sizes by default; real ones come with a pretrained directory)."""

    hidden_size: int = Field(64, gt=0, description="Width of the vision transformer (InternViT-300M: 1024).")
    layers: int = Field(2, gt=0, description="Transformer blocks of the vision tower (InternViT-300M: 24).")
    heads: int = Field(2, gt=0, description="Attention heads per block; must divide hidden_size.")
    intermediate_size: int = Field(256, gt=0, description="Hidden width of each block's MLP (InternViT-300M: 4096).")
    image_size: int = Field(
        128,
        gt=0,
        le=MAX_IMAGE_SIZE,
        description="The VLM's input tile in pixels (InternVL: 448). Not SAM2's input (model.sam.image_size) nor "
        "the data's working square (data.image_size): the working square is resized to this size for the VLM only.",
    )
    patch_size: int = Field(
        8,
        gt=0,
        description="ViT patch size in pixels (InternViT: 14). The VLM sees (image_size / patch_size)^2 / 4 image "
        "tokens per tile after InternVL's 0.5 pixel shuffle.",
    )
    qkv_bias: bool = Field(False, description="Biases on the attention projections (InternViT-300M: true).")
    layer_norm_eps: float = Field(1e-6, gt=0, description="Epsilon of the vision tower's layer norms.")


class TextSpec(Section):
    """The language model: Qwen2-shaped (Sa2VA-1B/4B, InternVL3) or InternLM2-shaped (Sa2VA-8B)."""

    arch: Literal["qwen2", "internlm2"] = Field(
        "qwen2",
        description="qwen2: Qwen2/2.5 (biases on q, k, v). internlm2: InternLM2/2.5, run as transformers' Llama (no "
        "biases; Sa2VA's fused `wqkv` is split on load, fused on export).",
    )
    hidden_size: int = Field(128, gt=0, description="Width of the language model (Qwen2.5-3B: 2048).")
    layers: int = Field(2, gt=0, description="Decoder layers of the language model (Qwen2.5-3B: 36).")
    heads: int = Field(4, gt=0, description="Query heads per layer; must divide hidden_size.")
    kv_heads: int = Field(
        2, gt=0, description="Key/value heads per layer (grouped-query attention); must divide heads."
    )
    intermediate_size: int = Field(512, gt=0, description="Hidden width of each layer's MLP (Qwen2.5-3B: 11008).")
    vocab_size: int = Field(
        512,
        gt=0,
        description="Rows of the token embedding. Random init: the size of the tiny offline BPE vocabulary; a "
        "checkpoint: its number of rows (a tokenizer with more tokens is refused).",
    )
    tie_word_embeddings: bool = Field(True, description="Share the input embedding with the output head.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (Qwen2.5: 1e6).")
    rms_norm_eps: float = Field(1e-6, gt=0, description="Epsilon of the RMS norms.")
    max_position_embeddings: int = Field(
        4096, gt=0, description="Longest sequence, in tokens, that the position embedding is built for."
    )


NANO_SAM_OVERRIDES = [
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    # From scratch, the stride-4/8 skip features let the decoder reach an "every object" mask without
    # reading its prompt, and it then never learns to (measured: identical IoU for true and random
    # clicks after 400 steps). Real SAM2 checkpoints keep the skip path.
    "++model.use_high_res_features_in_sam=false",
]


class SamSpec(Section):
    """SAM2 built by the official `sam2` package from one of its configs."""

    config: str = Field(
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        description="Config name inside the sam2 package, e.g. configs/sam2/sam2_hiera_l.yaml for Sa2VA's SAM2.",
    )
    image_size: int = Field(
        128,
        gt=0,
        le=MAX_IMAGE_SIZE,
        description="SAM2's square input in pixels (real SAM2: 1024); its image encoder and positional encodings are "
        "built for it. Also the data's working square unless data.image_size says otherwise. Not the VLM's tile "
        "(model.vision.image_size).",
    )
    overrides: list[str] = Field(
        default_factory=lambda: list(NANO_SAM_OVERRIDES),
        description="Hydra overrides composed onto the config; the default shrinks the trunk to the nano size of "
        "the tiny model. Set [] for a real SAM2 config.",
    )
    checkpoint: str | None = Field(
        None,
        description="An official SAM2 `.pt` or `.safetensors` file to load (real use); null: random init. For a "
        "released trunk, config, overrides, image_size and pe_gain left out come from it.",
    )
    pe_gain: float = Field(
        1.0,
        gt=0,
        description="Gain on the prompt encoder's random-Fourier positional encodings. From scratch, 3 shortens the "
        "plateau before the mask decoder starts using its prompt; keep 1 for pretrained SAM2.",
    )


class TrainableSpec(Section):
    """What trains. Defaults are Sa2VA's set: LoRA on the LLM, mask decoder, projection, mlp1, new rows."""

    lora: bool = Field(True, description="Adapt the frozen LLM with LoRA (exclusive with `llm`).")
    lora_r: int = Field(128, gt=0, description="LoRA rank (Sa2VA: 128).")
    lora_alpha: int = Field(
        256, gt=0, description="LoRA scale numerator: updates are scaled by alpha / r (Sa2VA: 256)."
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input, in [0, 1).")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="LLM linear layers (by module name) that get LoRA adapters.",
    )
    llm: bool = Field(False, description="Train the whole LLM (no LoRA); used by tiny pretraining.")
    vision: bool = Field(False, description="Train the vision tower (frozen in Sa2VA).")
    projector: bool = Field(True, description="Train InternVL's mlp1 (multi_modal_projector), vision -> LLM.")
    sam_encoder: bool = Field(False, description="Train SAM2's image encoder (frozen in Sa2VA).")
    sam_decoder: bool = Field(True, description="Train SAM2's mask decoder (and its prompt encoder).")
    seg_projection: bool = Field(True, description="Train text_hidden_fcs: [SEG] hidden state -> SAM2 prompt.")
    new_token_rows: bool = Field(
        True, description="Train the embedding and output rows of the added special tokens ([SEG], <vp>, ...)."
    )

    @model_validator(mode="after")
    def _one_llm_mode(self) -> TrainableSpec:
        if self.lora and self.llm:
            raise ValueError("lora and llm are exclusive: LoRA adapts a frozen LLM, llm trains all of it")
        return self


class PromptSpec(Section):
    """Sa2VA's prompt texts. `{input}`, `{expression}` are filled in; `<image>` marks the image tokens."""

    chat: str = Field(
        "<|user|>\n{input}<|end|>\n<|assistant|>\n",
        description="The chat turn around every prompt (phi3-style by default); must contain {input}, where the "
        "user's text goes. Use the checkpoint's own template (Sa2VA: phi3_chat, qwen_chat, internlm2_chat).",
    )
    region: str = Field(
        "<image>\nThere are 1 part regions in the picture: region1<region>.\n{question}",
        description="The describe prompt: <image> becomes the image tokens, <region> the region's tokens (the image "
        "tokens under its mask), {question} region_question.",
    )
    region_question: str = Field(
        "Please give me a short description of the region in the picture marked by region1.",
        description="The question asked about a region; fills {question} of `region`.",
    )
    segment_question: str = Field(
        "<image>\nPlease segment {expression} in this image.",
        description="The segment prompt: {expression} becomes the referring text or the caption to segment.",
    )
    segment_answer: str = Field(
        "Sure, [SEG].",
        description="The answer the segmenter is trained to give; the hidden state of its [SEG] token prompts SAM2.",
    )
    answer_end: str | None = Field(
        None,
        min_length=1,
        description="The text that ends every answer and stops caption generation: Sa2VA's template suffix "
        "(phi3_chat `<|end|>`, qwen_chat and internlm2_chat `<|im_end|>`); one token or a text of several. "
        "null: the tokenizer's eos token.",
    )


class ModelSpec(Section):
    """The GroundedVLM: a VLM joined to SAM2 by a [SEG] token. Weights come from random init, then from at most
    one of `pretrained`, `sa2va` or `vlm` (+ sam.checkpoint), then from `init_from`'s trained weights. With
    `sa2va`, `vlm` or `sam.checkpoint`, the architecture keys a recipe leaves out are the checkpoint's, filled in
    when the recipe loads (dualrl/model/checkpoint_config.py; recipe.yaml records them); `--help` lists the
    recipe as written, so for those keys it shows the defaults."""

    pretrained: str | None = Field(
        None, description="A dualrl model directory to start from (model.safetensors + tokenizer files + arch.json)."
    )
    vlm: str | None = Field(
        None,
        description="A transformers-native InternVL directory (config.json, safetensors, tokenizer), e.g. "
        "InternVL2.5-4B converted to the HF format, whose weights start the VLM; SAM2 then comes from "
        "model.sam.checkpoint. model.vision and model.text keys left out come from its config.json; one set to "
        "another value stops the build, naming it. Exclusive with `pretrained` and `sa2va`.",
    )
    sa2va: str | None = Field(
        None,
        description="A Sa2VA Hugging Face checkpoint directory (model.safetensors or its sharded index, tokenizer "
        "files, config.json) whose weights start the model. The architecture keys left out (model.text, "
        "model.vision, model.prompts, model.sam, model.multimask) come from it; one set to another value stops the "
        "build, naming it. Exclusive with `pretrained`.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let transformers run the tokenizer code shipped in the model.sa2va / model.vlm directory "
        "(InternLM2's tokenizer, Sa2VA-8B, is only there). Local files only; nothing is downloaded.",
    )
    init_from: str | None = Field(
        None,
        description="A dualrl training run (its output_dir, its checkpoints/ folder or one step_N folder) whose "
        "trainable weights start this run, on top of `pretrained`: how grpo continues from an sft_dual run.",
    )
    init_weights: Literal["ema", "policy"] = Field(
        "ema", description="Which weights of `init_from` to take: the EMA teacher's or the student's."
    )
    vision: VisionSpec = Field(default_factory=VisionSpec, description="The vision tower's architecture.")
    text: TextSpec = Field(default_factory=TextSpec, description="The language model's architecture.")
    sam: SamSpec = Field(default_factory=SamSpec, description="SAM2: config, input size, weights.")
    trainable: TrainableSpec = Field(default_factory=TrainableSpec, description="Which parts train.")
    prompts: PromptSpec = Field(default_factory=PromptSpec, description="The prompt texts (Sa2VA's by default).")
    multimask: bool = Field(
        True,
        description="Decode 3 masks, keep the best by predicted IoU (Sa2VA); false: single-mask output, steadier "
        "from scratch.",
    )
    max_caption_tokens: int = Field(
        24,
        gt=0,
        le=512,
        description="Most tokens a generated caption has (the answer_end token not counted): the EMA teacher's "
        "captions (sft_dual), evaluation captions, and GRPO samples unless algo.grpo.max_completion_length sets "
        "their own cap.",
    )
    seed: int | None = Field(
        None,
        description="Seed of the random init of the weights that are built (the whole model from scratch; on top "
        "of a checkpoint, only what it does not hold). null: the same as train.seed. LoRA adapters are drawn from "
        "train.seed, after the build.",
    )
    precision: Literal["float32", "tf32", "bf16"] = Field(
        "float32",
        description="bf16: frozen weights stored in bfloat16, trainable ones in float32, forward passes under bf16 "
        "autocast (Sa2VA trains with bf16 mixed precision). tf32: float32 weights and activations, with matrix "
        "products and convolutions on CUDA's TF32 tensor cores (10-bit mantissa inputs, float32 sums; set for the "
        "whole process). On CPUs tf32 is float32.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernels of the VLM (flash_attention_2 needs the flash-attn package)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute the LLM's activations in the backward pass (less memory, ~30 % more compute)."
    )
    train_compile: bool = Field(
        False,
        description="Compile the learner's repeated blocks with torch.compile for training, forward and backward (the "
        "LLM's decoder layers, the vision tower's layers, SAM2's two-way mask-decoder blocks; the rest stays eager): "
        "each block's norms, rotary embedding, casts, LoRA branches and residual adds become a few fused kernels. One "
        "compilation per block kind serves all its layers and every sequence length (dynamic sizes). Costs compile "
        "time on the first steps (about a minute on 2 CPU cores at the tiny size; benchmarks/gpu/sa2va_steps.py "
        "--compare-compile times it on a GPU); gradients agree with eager up to rounding. Evaluation, rollout and "
        "caption decoding are not affected.",
    )
    train_compile_wrapper: Literal["python", "cpp"] = Field(
        "python",
        description="With train_compile: what calls the compiled blocks' kernels. python: inductor's Python wrapper. "
        "cpp: inductor writes it in C++ and builds it with the system compiler once per compilation (longer first "
        "steps, less host time per block call: for learners whose GPU waits on the host; benchmarks/gpu/"
        "sa2va_steps.py --compare-wrapper times both on a GPU). Same kernels, same gradients.",
    )
    train_fuse_projections: bool = Field(
        False,
        description="In the learner's updates, compute each LLM layer's query/key/value projections, and its MLP's "
        "gate/up projections, together: their frozen base products as one product over a concatenated copy of the "
        "base weights, their LoRA A products as one batched product (each with its own dropout mask), the B "
        "products one each (model/train_projections.py). Fewer, larger products: a Qwen2 layer runs 15 "
        "instead of 21 forward and 26 instead of 35 backward, for learners whose GPU waits on the host launching "
        "them. Costs a copy of those base weights (3.6 GB at Sa2VA-4B in bf16). Same loss and gradients up to "
        "rounding; not with train_graphs or sharded learners.",
    )
    train_graphs: bool = Field(
        False,
        description="On CUDA, capture the fixed-shape parts of the learner's update as CUDA graphs, forward and "
        "backward (torch.cuda.make_graphed_callables): the two image encoders, SAM2's prompt-to-mask decoding and the "
        "LLM, once per input signature (batch size, sequence width; up to 32 kept, then new shapes run eagerly). For "
        "small models whose step is bound by the host's operator dispatch (the tiny pretraining: "
        "benchmarks/gpu/tiny_steps.py --compare-graphs); prompt assembly, the output head and the losses stay eager. "
        "Ignored on CPUs; not with train_compile, gradient_checkpointing or several learners. Same gradients up "
        "to float rounding.",
    )
    generation: Literal["engine", "generate"] = Field(
        "engine",
        description="How captions are decoded. engine: dualrl's decoder (model/decode.py: one prefill per region "
        "shared by its samples, a fixed-shape decode step replayed as a CUDA graph on GPUs; its attention is sdpa "
        "whatever attn_implementation trains, eager stays eager). generate: transformers' generate, every sample "
        "its own prompt (the path before 0.5; same greedy captions).",
    )
    decode_graphs: bool = Field(
        True,
        description="generation=engine on CUDA: capture the decode step as a CUDA graph (once per number of rows "
        "and prompt capacity); false runs it eagerly.",
    )
    decode_compile: bool = Field(
        False,
        description="generation=engine: compile the decoder layers with torch.compile for the prefill and for the "
        "decode step, which is then captured (fuses their hundreds of small elementwise kernels). The layers are "
        "alike, so one compilation serves them all (a first step of 12 s on an H200 at the 4B shape, against "
        "31-56 s for the whole step compiled); a second shape compiles once more with dynamic sizes, then no "
        "shape compiles again.",
    )
    decode_merge_lora: bool = Field(
        True,
        description="generation=engine: decode with LoRA folded into a copy of each adapted weight (one product "
        "per layer instead of the adapter's extra kernels; costs that copy's memory, 5.5 GB at Sa2VA-4B's LoRA, "
        "kept between calls). Same captions up to rounding: in bf16, W + BA rounded once shifts log-probs by bf16 "
        "noise (grpo/rollout_logp_gap shows the sampler-learner gap).",
    )
    decode_fuse_projections: bool = Field(
        False,
        description="generation=engine: decode with each layer's query/key/value projections, and its MLP's "
        "gate/up projections, as one product each over concatenated copies of their weights (LoRA folded in; the "
        "small key/value products cost a decode step several times their read time). Costs a copy of those "
        "weights unless LoRA already copies them (with decode_merge_lora the fused copies replace LoRA's). Same "
        "captions up to rounding.",
    )
    generation_cache: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="generation=generate only: its KV cache; static preallocates it and compiles per prompt shape "
        "(same captions).",
    )

    @model_validator(mode="after")
    def _wrapper_with_compile(self) -> ModelSpec:
        if self.train_compile_wrapper != "python" and not self.train_compile:
            raise ValueError(
                f"train_compile_wrapper={self.train_compile_wrapper} chooses how compiled blocks are called, and "
                "nothing is compiled: set train_compile=true too, or leave train_compile_wrapper at python"
            )
        if self.train_graphs and self.gradient_checkpointing:
            raise ValueError(
                "model.train_graphs with model.gradient_checkpointing: recomputation inside a captured graph is not "
                "something dualrl does; set one of them to false"
            )
        if self.train_graphs and self.train_fuse_projections:
            raise ValueError(
                "model.train_graphs with model.train_fuse_projections: the graphs would capture the swapped "
                "projections, which dualrl does not do; choose one"
            )
        if self.train_graphs and self.train_compile:
            raise ValueError(
                "model.train_graphs with model.train_compile: the graphs would capture the compiled SAM2 decoder "
                "blocks, which dualrl does not do; choose one (train_graphs for small host-bound models, train_compile "
                "for large ones)"
            )
        return self
