"""Malformed launches, exports and evaluations (issue 14): each ends with exactly one `error:` line on stderr and exit
status 2, before any model is built or any file written, in seconds.

The corpus is a table run in-process through each command's `main(argv)` (`run_case`), plus a few end-to-end calls
in a subprocess. `run_case` sorts a call into one of four outcomes:
- clear: exit 2, one `error:` line, nothing built, nothing written;
- late: the same message, but after a model was built or a file written;
- traceback: an exception escaped `main`;
- accepted: the command went ahead (exit 0, or a launch that got past its checks).
A launch that gets past its checks meets `_probe_run` in place of training: it does what a run does first (makes
output_dir, writes recipe.yaml, opens the data, starts the runtime, which builds the model) and stops there, so what
slips through is seen to fail or to be accepted without training.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import dualrl.eval.cli
import dualrl.export
import dualrl.launch

REPO = Path(__file__).resolve().parents[2]
TINY_DIR = REPO / "recipes" / "pretrained" / "shapes-tiny"
UNWRITABLE = "/proc/dualrl-malformed"  # no folder can be made there, whoever runs the test (root included)
FAST_S = 5.0  # a refusal comes before anything is built: well under this on 2 shared CPU cores


@dataclass(frozen=True)
class Case:
    """One malformed call. `args` may name `{tmp}` (the test's folder), `{run}` (a LoRA run's folder) and `{repo}`."""

    id: str
    command: str  # launch, export or eval
    args: tuple[str, ...]
    says: str = ""  # what the error line must name
    setup: Callable[[Path], None] | None = None
    no_cuda: bool = False  # the machine shows no CUDA device (monkeypatched where there is one)
    slow_before: bool = False  # the code before issue 14 waits for minutes (Ray joining an address nobody serves)


@dataclass
class Result:
    """What came of a call: its exit status and stderr, or the exception that escaped; whether a launch reached the
    run, whether a model was built; the files and folders that changed."""

    code: int | None = None
    stderr: str = ""
    exception: BaseException | None = None
    reached_run: bool = False
    built: bool = False
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        if self.exception is not None:
            return "traceback"
        if self.reached_run or self.code == 0:
            return "accepted"
        lines = self.stderr.splitlines()
        if self.code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
            return "late" if self.built or self.written else "clear"
        return "other"

    def describe(self) -> str:
        exc = f"{type(self.exception).__name__}: {self.exception}" if self.exception else None
        return (
            f"outcome {self.outcome}: exit {self.code}, exception {exc}, built {self.built}, written "
            f"{self.written[:5]}, stderr {self.stderr!r}"
        )


def _write(name: str, text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)

    return setup


def _folder(name: str, *files: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).mkdir(parents=True)
        for f in files:
            (tmp / name / f).write_text("keep me\n")

    return setup


# A launch of the embedded default (its checkpoint named absolutely: the calls run in an empty folder), then the
# case's own overrides, which win.
BASE = (
    "{repo}/recipes/sft_dual.yaml",
    f"model.pretrained={TINY_DIR}",
    "output_dir={tmp}/run",
    "wandb.mode=disabled",
)
SCRATCH = ("model.pretrained=null",)  # random init: the tokenizer and the SAM2 config are the recipe's own


def launch(id: str, *overrides: str, says: str = "", **kw) -> Case:
    return Case(id, "launch", (*BASE, *overrides), says, **kw)


LAUNCHES = [
    # the 14 of issue 14: 7 tracebacks ...
    launch("output_dir_is_a_file", "output_dir={tmp}/file", says="output_dir", setup=_write("file", "x\n")),
    launch("output_dir_unwritable", f"output_dir={UNWRITABLE}/run", says="output_dir"),
    launch("device_cuda_without_cuda", "train.device=cuda", says="train.device", no_cuda=True),
    launch("no_data_source", "data.shapes=null", says="no training source"),
    launch("vocabulary_differs_from_checkpoint", "model.text.vocab_size=1024", says="vocab_size"),
    launch("sam2_config_missing", *SCRATCH, "model.sam.config=configs/sam2.1/nope.yaml", says="model.sam.config"),
    launch(
        "ray_address_nobody_serves",
        "runtime.kind=ray",
        "runtime.address=127.0.0.1:1",
        says="runtime.address",
        slow_before=True,
    ),
    # ... and 7 accepted
    launch("lr_inf", "optim.lr=.inf", says="optim.lr"),
    launch("output_dir_empty", "output_dir=''", says="output_dir"),
    launch("reward_weight_nan", "rewards=[{name: mask_iou, weight: .nan}]", says="rewards.0.weight"),
    launch("batch_size_1e9", "data.batch_size=1000000000", says="data.batch_size"),
    launch("steps_true", "train.steps=true", says="train.steps"),
    launch(
        "reward_weights_all_zero", "rewards=[{name: mask_iou, weight: 0}, {name: length, weight: 0}]", says="non-zero"
    ),
    launch("reward_weight_negative", "rewards=[{name: mask_iou, weight: -1}]", says="rewards.0.weight"),
    # the rest of the same kinds
    launch("output_dir_under_a_file", "output_dir={tmp}/file/run", says="output_dir", setup=_write("file", "x\n")),
    launch("output_dir_blank", "output_dir=' '", says="output_dir"),
    launch("vocabulary_smaller_than_tokenizer", *SCRATCH, "model.text.vocab_size=100", says="vocab_size"),
    launch("vision_heads_not_dividing", *SCRATCH, "model.vision.heads=3", says="model.vision.heads"),
    launch("kv_heads_not_dividing", *SCRATCH, "model.text.kv_heads=3", says="model.text.kv_heads"),
    launch("sam2_override_unparsable", *SCRATCH, "model.sam.overrides=['++model.image_size=[']", says="model.sam"),
    launch(
        "ray_address_malformed",
        "runtime.kind=ray",
        "runtime.address=head-node",
        says="runtime.address",
        slow_before=True,
    ),
    launch(
        "ray_address_bad_port",
        "runtime.kind=ray",
        "runtime.address=10.0.0.1:99999",
        says="runtime.address",
        slow_before=True,
    ),
    launch("lr_nan", "optim.lr=.nan", says="optim.lr"),
    launch("lr_true", "optim.lr=true", says="optim.lr"),
    launch("betas_nan", "optim.betas=[0.9, .nan]", says="optim.betas"),
    launch("max_minutes_inf", "train.max_minutes=.inf", says="train.max_minutes"),
    launch("reward_timeout_inf", "rewards=[{name: mask_iou, timeout_s: .inf}]", says="timeout_s"),
    launch("ema_decay_nan", "algo.ema_decay=.nan", says="algo.ema_decay"),
    launch("steps_float", "train.steps=300.0", says="train.steps"),
    launch("steps_1e12", "train.steps=1000000000000", says="train.steps"),
    launch("flag_as_number", "model.multimask=1", says="model.multimask"),
    launch("sam_image_size_huge", "model.sam.image_size=100000", says="model.sam.image_size"),
    launch("data_image_size_huge", "data.image_size=65536", says="data.image_size"),
    launch("eval_batch_huge", "eval.batch_size=10000000", says="eval.batch_size"),
    launch("generations_huge", "algo.name=grpo", "algo.grpo.num_generations=100000", says="num_generations"),
    launch("eval_source_off", "data.eval_source=refcoco", says="data.eval_source"),
    # kinds that were already refused clearly: they must stay so
    launch("unknown_key", "trian.steps=3", says="trian"),
    launch("unknown_nested_key", "optim.learning_rate=1e-3", says="optim.learning_rate"),
    launch("bad_type", "train.steps=many", says="train.steps"),
    launch("bad_choice", "algo.name=ppo", says="algo.name"),
    launch("lr_negative", "optim.lr=-1", says="optim.lr"),
    launch("warmup_over_one", "optim.warmup_ratio=2", says="optim.warmup_ratio"),
    launch("betas_one_value", "optim.betas=[0.9]", says="optim.betas"),
    launch("objects_min_over_max", "data.shapes.min_objects=5", "data.shapes.max_objects=2", says="min_objects"),
    launch("lora_and_full_llm", "model.trainable.llm=true", says="lora and llm"),
    launch("unknown_reward", "rewards=[{name: nope}]", says="nope"),
    launch("duplicate_rewards", "rewards=[{name: length}, {name: rewards.shaping:length}]", says="same name"),
    launch(
        "pretrained_without_arch",
        "model.pretrained={tmp}/model",
        says="arch.json",
        setup=_write("model/model.safetensors", "not read\n"),
    ),
    launch("pretrained_missing", "model.pretrained={tmp}/nowhere", says="model.pretrained"),
    launch("sam_checkpoint_missing", *SCRATCH, "model.sam.checkpoint={tmp}/sam.pt", says="model.sam.checkpoint"),
    launch("override_without_equals", "train.steps", says="train.steps"),
    launch("override_empty_part", "train..steps=3", says="train..steps"),
    launch("override_bad_yaml", "optim.betas=[0.9,", says="optim.betas"),
    launch("override_index_past_end", "rewards=[{name: mask_iou}]", "rewards.3.weight=1", says="rewards.3"),
    launch("override_into_a_value", "train.steps.x=1", says="train.steps"),
    Case("recipe_missing", "launch", ("{tmp}/nope.yaml",), "nope.yaml"),
    Case("recipe_is_a_folder", "launch", ("{tmp}",), "recipe file"),
    Case(
        "recipe_bad_yaml",
        "launch",
        ("{tmp}/bad.yaml",),
        "bad.yaml",
        _write("bad.yaml", "output_dir: x\nmodel: {sam: [\n"),
    ),
    Case("recipe_not_a_mapping", "launch", ("{tmp}/list.yaml",), "mapping", _write("list.yaml", "- a\n- b\n")),
    Case(
        "recipe_extends_missing",
        "launch",
        ("{tmp}/child.yaml",),
        "gone.yaml",
        _write("child.yaml", "extends: gone.yaml\n"),
    ),
    Case(
        "recipe_extends_loop",
        "launch",
        ("{tmp}/a.yaml",),
        "loops",
        lambda tmp: (_write("a.yaml", "extends: b.yaml\n")(tmp), _write("b.yaml", "extends: a.yaml\n")(tmp)),
    ),
    Case("no_recipe", "launch", (), "recipe"),
    Case("unknown_flag", "launch", (*BASE, "--fast"), "--fast"),
]


def export(id: str, *args: str, says: str = "", **kw) -> Case:
    return Case(id, "export", args, says, **kw)


EXPORTS = [
    export("no_arguments", says="required"),
    export("no_dest", "{tmp}/run", says="dest"),
    export("unknown_format", "{tmp}/run", "{tmp}/dest", "--format", "onnx", says="--format"),
    export("unknown_weights", "{tmp}/run", "{tmp}/dest", "--weights", "best", says="--weights"),
    export("unknown_dtype", "{tmp}/run", "{tmp}/dest", "--dtype", "float8", says="--dtype"),
    export("run_dir_missing", "{tmp}/nowhere", "{tmp}/dest", says="nowhere"),
    export("run_dir_not_a_run", "{tmp}/empty", "{tmp}/dest", says="recipe.yaml", setup=_folder("empty")),
    export("run_dir_is_a_file", "{tmp}/file", "{tmp}/dest", says="file", setup=_write("file", "x\n")),
    export(
        "run_recipe_broken",
        "{tmp}/broken",
        "{tmp}/dest",
        says="optim.lr",
        setup=_write("broken/recipe.yaml", "output_dir: x\noptim: {lr: -1}\n"),
    ),
    export("dest_is_a_file", "{run}", "{tmp}/file", "--format", "sa2va", says="DEST", setup=_write("file", "x\n")),
    export(
        "dest_under_a_file", "{run}", "{tmp}/file/out", "--format", "sa2va", says="DEST", setup=_write("file", "x\n")
    ),
    export("dest_unwritable", "{run}", f"{UNWRITABLE}/out", "--format", "sa2va", says="DEST"),
    export("dest_is_the_run", "{run}", "{run}", "--format", "sa2va", says="DEST"),
    export(
        "dest_holds_other_files",
        "{run}",
        "{tmp}/mine",
        "--format",
        "sa2va",
        says="DEST",
        setup=_folder("mine", "notes.txt"),
    ),
    export("lora_run_as_full_weights", "{run}", "{tmp}/dest", says="--format sa2va"),
]


def evaluate(id: str, *args: str, says: str = "", **kw) -> Case:
    return Case(id, "eval", args, says, **kw)


MODEL = (str(TINY_DIR), "--data", "shapes", "--max-regions", "2")  # a model directory on 2 shapes regions
EVALS = [
    evaluate("no_arguments", says="required"),
    evaluate("checkpoint_missing", "{tmp}/nowhere", "--data", "shapes", says="nowhere"),
    evaluate("unknown_data", str(TINY_DIR), "--data", "coco", says="--data"),
    evaluate("batch_size_zero", *MODEL, "--batch-size", "0", says="--batch-size"),
    evaluate("batch_size_text", *MODEL, "--batch-size", "many", says="--batch-size"),
    evaluate("batch_size_huge", *MODEL, "--batch-size", "1000000", says="--batch-size"),
    evaluate("unknown_resolution", *MODEL, "--resolution", "high", says="--resolution"),
    evaluate("device_cuda_without_cuda", *MODEL, "--device", "cuda", says="--device", no_cuda=True),
    evaluate("unknown_shapes_split", *MODEL, "--split", "nope", says="nope"),
    evaluate("max_regions_zero", str(TINY_DIR), "--data", "shapes", "--max-regions", "0", says="--max-regions"),
    evaluate("max_regions_negative", str(TINY_DIR), "--data", "shapes", "--max-regions", "-3", says="--max-regions"),
    evaluate("unknown_refcoco_split", str(TINY_DIR), "--data", "refcoco", "--split", "tset", says="tset"),
    evaluate("refcoco_not_configured", str(TINY_DIR), "--data", "refcoco", "--max-regions", "2", says="data.refcoco"),
    evaluate("out_is_a_folder", *MODEL, "--out", "{tmp}", says="--out"),
    evaluate("out_under_a_file", *MODEL, "--out", "{tmp}/file/e.json", says="--out", setup=_write("file", "x\n")),
    evaluate("out_unwritable", *MODEL, "--out", f"{UNWRITABLE}/e.json", says="--out"),
    evaluate("unknown_override", *MODEL, "--out", "{tmp}/e.json", "modle.seed=1", says="modle"),
    evaluate(
        "override_out_of_range", *MODEL, "--out", "{tmp}/e.json", "model.max_caption_tokens=0", says="max_caption"
    ),
    evaluate(
        "model_differs_from_checkpoint",
        *MODEL,
        "--out",
        "{tmp}/e.json",
        "model.text.vocab_size=1024",
        says="vocab_size",
    ),
    evaluate("recipe_missing", *MODEL, "--out", "{tmp}/e.json", "--recipe", "{tmp}/nope.yaml", says="nope.yaml"),
]

CASES = LAUNCHES + EXPORTS + EVALS


# ----------------------------------------------------------------------------------------------- running a case
class _ReachedRun(Exception):
    """The launch got past its checks and the probe did what a run does first without failing."""


def _probe_run(recipe):
    """The first things `dualrl.train.run` does, then stop: what an accepted launch would have built and written."""
    from dualrl.data.loader import EvalBatches, train_batches
    from dualrl.recipe import dump_recipe
    from dualrl.runtime import start_runtime

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    EvalBatches(recipe.data, recipe.model.sam.image_size, recipe.eval.batch_size, recipe.eval.split)
    runtime = start_runtime(recipe)
    try:
        train_batches(recipe.data, recipe.model.sam.image_size).close()
    finally:
        runtime.shutdown()
    raise _ReachedRun


def _snapshot(roots: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots`: files by size and modification time, folders by name only (a folder's
    time changes when anything is made and removed in it, which a write check does)."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            stat = path.lstat()
            seen[str(path)] = (0, 0) if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return seen


def _fill(arg: str, tmp: Path, run: Path | None = None) -> str:
    """`{tmp}`, `{run}` and `{repo}` in an argument replaced (not str.format: YAML values hold braces)."""
    return arg.replace("{tmp}", str(tmp)).replace("{run}", str(run)).replace("{repo}", str(REPO))


def run_case(case: Case, tmp: Path, run_dir: Path | None) -> Result:
    """Call the command's `main` in-process, in an empty working folder under `tmp`, and say what came of it."""
    mains = {"launch": dualrl.launch.main, "export": dualrl.export.main, "eval": dualrl.eval.cli.main}
    argv = [_fill(a, tmp=tmp, run=run_dir) for a in case.args]
    (tmp / "cwd").mkdir(exist_ok=True)
    if case.setup is not None:
        case.setup(tmp)
    roots = [tmp, TINY_DIR, *([run_dir] if run_dir is not None else [])]
    before = _snapshot(roots)
    result, err = Result(), io.StringIO()

    def recorded(build):
        def build_model(*args, **kwargs):
            result.built = True
            return build(*args, **kwargs)

        return build_model

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp / "cwd")
        mp.setattr("dualrl.train.run", _probe_run)
        for module in (dualrl.export, dualrl.eval.cli):
            mp.setattr(module, "build_model", recorded(module.build_model))
        if case.no_cuda:
            mp.setattr("torch.cuda.is_available", lambda: False)
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err):
            try:
                result.code = mains[case.command](argv)
            except SystemExit as exit_:
                result.code = exit_.code if isinstance(exit_.code, int) else 1
            except _ReachedRun:
                result.reached_run = True
            except Exception as exc:  # what the test reports: an exception escaping main is the fault
                result.exception = exc
        result.seconds = time.perf_counter() - t0
    result.stderr = err.getvalue()
    after = _snapshot(roots)
    result.written = sorted(p for p in after.keys() | before.keys() if after.get(p) != before.get(p))
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A LoRA run's folder as export reads it first: its recipe.yaml. Every check comes before the checkpoint is
    looked for, so none is made here (`run_case` takes a trained run's folder as well)."""
    from dualrl.recipe import dump_recipe, load_recipe
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("malformed") / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text(
        dump_recipe(load_recipe(REPO / "recipes/sft_dual.yaml", [*TINY, f"output_dir={out}"]))
    )
    return out


def _needs_run(case: Case) -> bool:
    return any("{run}" in a for a in case.args)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}-{c.id}" for c in CASES])
def test_malformed_call_is_one_error_line_before_anything_is_built_or_written(case, tmp_path, request):
    run = request.getfixturevalue("run_dir") if _needs_run(case) else None
    result = run_case(case, tmp_path, run)
    assert result.outcome == "clear", result.describe()
    assert case.says in result.stderr, result.stderr
    assert result.seconds < FAST_S, f"{result.seconds:.1f} s: {result.describe()}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_output_dir_in_a_read_only_folder(tmp_path):
    """Permission bits refuse a non-root user: output_dir under a folder without write permission."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    case = launch("output_dir_read_only", "output_dir={tmp}/locked/run", says="output_dir")
    try:
        result = run_case(case, tmp_path, None)
    finally:
        locked.chmod(0o700)
    assert result.outcome == "clear" and "cannot be written" in result.stderr, result.describe()


@pytest.mark.parametrize(
    "argv",
    [
        ["dualrl.launch", "recipes/sft_dual.yaml", "train.steps=true", "output_dir={tmp}/run"],
        ["dualrl.launch", "recipes/sft_dual.yaml", "output_dir={tmp}/file"],
        ["dualrl.export", "{tmp}/nowhere", "{tmp}/dest", "--format", "onnx"],
    ],
    ids=["launch-steps-true", "launch-output-dir-a-file", "export-unknown-format"],
)
def test_end_to_end_one_error_line_and_exit_2(argv, tmp_path):
    """As a user runs them: `python -m ...` prints one `error:` line and nothing else on stderr, exits 2, and
    writes nothing."""
    (tmp_path / "file").write_text("x\n")
    before = _snapshot([tmp_path])
    args = [sys.executable, "-m", *(_fill(a, tmp_path) for a in argv)]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert _snapshot([tmp_path]) == before


def test_healthy_launch_passes_the_checks_and_writes_nothing(tmp_path):
    """The default recipe passes every launch check; the checks leave output_dir unmade and its parent as it was."""
    from dualrl.recipe import check_launch, load_recipe

    out = tmp_path / "runs" / "run"
    recipe = load_recipe(REPO / "recipes/sft_dual.yaml", [f"model.pretrained={TINY_DIR}", f"output_dir={out}"])
    before = _snapshot([tmp_path])
    check_launch(recipe)
    assert _snapshot([tmp_path]) == before and not out.exists()
