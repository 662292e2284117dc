"""The cluster launch material in launch/: the `ray up` config, the Slurm script and the KubeRay RayJob."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from dualrl.recipe import RecipeError, load_recipe
from dualrl.recipe.load import resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "launch" / "ray-cluster-gpu.yaml"
SBATCH = ROOT / "launch" / "slurm" / "dualrl-ray.sbatch"
RAYJOB = ROOT / "launch" / "kuberay-rayjob.yaml"
README = ROOT / "launch" / "README.md"
EIGHT_GPU = "recipes/sa2va/sa2va_4b_sft_dual_8gpu.yaml"


def launched(tokens: list[str]) -> tuple[str, list[str]]:
    """(recipe, overrides) of a `python -m dualrl.launch RECIPE [overrides]` command line."""
    i = next(i for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["-m", "dualrl.launch"])
    return tokens[i + 2], tokens[i + 3 :]


def check_overrides(overrides: list[str]) -> None:
    """The overrides are valid recipe keys and values (on the tiny default recipe, whose paths exist)."""
    load_recipe(str(ROOT / "recipes" / "sft_dual.yaml"), ["output_dir=unused", *overrides])


def actors(recipe: str, overrides: list[str]) -> tuple[int, float, float]:
    """(actors, CPUs and GPUs each asks for) of a launch: the recipe with the overrides, validated but for the
    files it names (model and data paths are the cluster's)."""
    r = resolve_recipe(ROOT / recipe, overrides).runtime
    return r.learners + r.rollout_workers + r.reward_workers, r.worker_cpus, r.worker_gpus


def written_launches(text: str) -> list[tuple[str, list[str]]]:
    """(recipe, overrides) of every launch written in `text` (a README or a file's header comments): a
    `python -m dualrl.launch RECIPE ...` command, or `dualrl-ray.sbatch RECIPE ...` (which adds runtime.kind=ray),
    its continuation lines joined, up to a closing quote or a comment; placeholders (RECIPE.yaml) left out."""
    lines = [line.lstrip("# ").rstrip() if line.lstrip().startswith("#") else line for line in text.splitlines()]
    joined = "\n".join(lines).replace("\\\n", " ")
    found = []
    for m in re.finditer(r"(python -m dualrl\.launch|dualrl-ray\.sbatch) +([^'\s][^'\n]*)", joined):
        if not (ROOT / m.group(2).split()[0]).is_file():
            continue
        recipe, *overrides = shlex.split(m.group(2), comments=True)
        found.append((recipe, ["runtime.kind=ray", *overrides] if "sbatch" in m.group(1) else overrides))
    return found


# ------------------------------------------------------------------------------ ray up cluster config
def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def schema_errors(config: dict) -> list[str]:
    schema = ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


def test_cluster_config_matches_rays_own_schema():
    """launch/ray-cluster-gpu.yaml passes the cluster-config JSON schema shipped in the installed ray package."""
    assert schema_errors(yaml.safe_load(CLUSTER.read_text())) == []


def test_schema_check_rejects_a_broken_config():
    """The schema check can fail: an unknown key and a fractional GPU count are both reported."""
    config = yaml.safe_load(CLUSTER.read_text())
    broken = copy.deepcopy(config)
    broken["max_worker"] = 2
    broken["available_node_types"]["head"]["resources"]["GPU"] = 0.5
    errors = schema_errors(broken)
    assert any("max_worker" in e for e in errors) and any("resources/GPU" in e for e in errors), errors


def test_cluster_config_has_gpu_workers_and_installs_dualrl():
    """The head node type exists and hosts no actor (GPU 0); one worker type holds the 8-GPU recipe's actors on
    one node (a GPU and its CPUs each), and two such nodes the 16 of its two-node command in the header; every
    node gets the checkout synced and installs it, and the head starts Ray as the head."""
    config = yaml.safe_load(CLUSTER.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    count, cpus, gpus = actors(EIGHT_GPU, [])
    assert count * gpus == 8
    one_node = [t for t in workers.values() if t["resources"]["GPU"] >= count * gpus]
    assert one_node and all(t["resources"]["CPU"] >= count * cpus for t in one_node)
    assert max(t["resources"]["GPU"] * t["max_workers"] for t in one_node) >= 16
    assert config["max_workers"] >= 2
    assert config["file_mounts"] == {"~/dualrl": "."}
    assert any("pip install" in c and "-e ~/dualrl" in c for c in config["setup_commands"])
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert all("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"] if "ray start" in c)


# ------------------------------------------------------------------------------- written commands
@pytest.mark.parametrize("path", [README, CLUSTER, SBATCH, ROOT / EIGHT_GPU], ids=lambda p: p.name)
def test_written_launch_commands_are_valid_recipes(path):
    """Every launch command written in launch/README.md, the cluster files' headers and the 8-GPU recipe's header
    names a recipe that, with its overrides, validates; each file shows a run with several learners."""
    found = written_launches(path.read_text())
    assert found, f"no launch command with an existing recipe in {path}"
    for recipe, overrides in found:
        resolve_recipe(ROOT / recipe, overrides)
    assert any(actors(recipe, overrides)[0] > 3 for recipe, overrides in found)


def test_written_launches_finds_continued_and_quoted_commands():
    """The command reader joins continued lines, stops at a closing quote or a comment, adds the Slurm script's
    runtime.kind=ray and skips placeholders; a bad override in a written command fails validation."""
    text = (
        "#   ray exec c.yaml 'cd x && python -m dualrl.launch \\\n"
        "#       recipes/sft_dual.yaml runtime.learners=2' # two\n"
        "sbatch launch/slurm/dualrl-ray.sbatch recipes/grpo_dual.yaml train.steps=5  # five\n"
        "python -m dualrl.launch RECIPE.yaml runtime.kind=ray\n"
    )
    assert written_launches(text) == [
        ("recipes/sft_dual.yaml", ["runtime.learners=2"]),
        ("recipes/grpo_dual.yaml", ["runtime.kind=ray", "train.steps=5"]),
    ]
    with pytest.raises(RecipeError, match=r"runtime\.learners"):
        resolve_recipe(ROOT / "recipes/sft_dual.yaml", ["runtime.learners=2"])  # kind local: refused


# -------------------------------------------------------------------------------------- Slurm script
def test_sbatch_script_parses():
    """`bash -n` finds no syntax error."""
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def fake_bin(folder: Path, scripts: dict[str, str]) -> Path:
    folder.mkdir()
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.fixture
def slurm(tmp_path):
    """Runs the script with a fake `scontrol` (3 nodes) and `srun` (answers the head-address look-up; anything
    else it would start is logged to started.log and left running as `sleep`) on PATH, in a fake allocation."""
    log = tmp_path / "started.log"
    fake = fake_bin(
        tmp_path / "bin",
        {
            "scontrol": '[ "$1 $2" = "show hostnames" ] || exit 97\nprintf "%s\\n" gpu01 gpu02 gpu03\n',
            "srun": f'case "$*" in\n  *"hostname --ip-address") echo "10.1.2.3 fe80::1" ;;\n'
            f'  *) echo "$*" >> {log}; echo $$ >> {log}.pids; exec sleep 60 ;;\nesac\n',
        },
    )

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        base = {
            "PATH": f"{fake}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "SLURM_SUBMIT_DIR": str(ROOT),
            "SLURM_JOB_NODELIST": "gpu[01-03]",
            "SLURM_GPUS_ON_NODE": "1",
            "SLURM_CPUS_PER_TASK": "16",
        }
        return subprocess.run(
            ["bash", str(SBATCH), *args], env={**base, **env}, capture_output=True, text=True, timeout=60
        )

    run.log = log
    return run


def commands(stdout: str) -> list[list[str]]:
    """The printed commands: the lines after '+ ', split as the shell would (comments dropped)."""
    return [shlex.split(line[2:], comments=True) for line in stdout.splitlines() if line.startswith("+ ")]


def test_sbatch_dry_run_prints_head_workers_then_the_launch(slurm):
    """DRY_RUN=1 prints, in order: the Ray head on the first node at its address, a wait for it, one worker per
    other node joining that address, a wait for all 3, then the launch with the runtime overrides before the
    user's (so the user's win); nothing is started."""
    done = slurm("recipes/sft_dual.yaml", "train.steps=5", "wandb.name=a b", DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    printed = commands(done.stdout)
    srun = ["srun", "--nodes=1", "--ntasks=1", "-w"]
    resources = ["--num-cpus=16", "--num-gpus=1", "--block", "&"]  # left running in the background
    assert printed == [
        [*srun, "gpu01", "ray", "start", "--head", "--node-ip-address=10.1.2.3", "--port=6379", *resources],
        [],
        [*srun, "gpu02", "ray", "start", "--address=10.1.2.3:6379", *resources],
        [*srun, "gpu03", "ray", "start", "--address=10.1.2.3:6379", *resources],
        [],
        ["python", "-m", "dualrl.launch", "recipes/sft_dual.yaml", "runtime.kind=ray",
         "runtime.address=10.1.2.3:6379", "runtime.worker_gpus=1", "train.steps=5", "wandb.name=a b"],
    ]  # fmt: skip
    assert "wait until 1 Ray node(s)" in done.stdout and "wait until 3 Ray node(s)" in done.stdout
    assert not slurm.log.exists()
    recipe, overrides = launched(printed[-1])
    assert (ROOT / recipe).is_file()
    check_overrides(overrides)


def test_sbatch_reads_the_actors_of_the_recipe_and_overrides(slurm):
    """The 8-GPU recipe on 3 nodes x 8 GPUs with runtime.learners=12: the script counts 16 actors (12 + 2 + 2, each
    a GPU and 4 CPUs) from the recipe with the overrides, finds they fit, and launches with the overrides."""
    done = slurm(
        EIGHT_GPU, "runtime.learners=12", "data.batch_size=96", DRY_RUN="1", SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="64",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3 node(s) with 8 GPU(s) and 64 CPUs each, 16 actors" in done.stdout
    assert commands(done.stdout)[-1][3:] == [
        EIGHT_GPU, "runtime.kind=ray", "runtime.address=10.1.2.3:6379", "runtime.worker_gpus=1",
        "runtime.learners=12", "data.batch_size=96",
    ]  # fmt: skip


def test_sbatch_recipe_from_the_environment(slurm):
    """With RECIPE set, every argument is an override; WORKER_GPUS and RAY_PORT reach the commands."""
    done = slurm("train.steps=5", DRY_RUN="1", RECIPE="recipes/grpo_dual.yaml", WORKER_GPUS="0.5", RAY_PORT="7000")
    assert done.returncode == 0, done.stderr
    assert commands(done.stdout)[-1][3:] == [
        "recipes/grpo_dual.yaml", "runtime.kind=ray", "runtime.address=10.1.2.3:7000", "runtime.worker_gpus=0.5",
        "train.steps=5",
    ]  # fmt: skip


def python_answering(folder: Path, alive: str, launch: str) -> Path:
    """A fake `python` for the script: the recipe read goes to the real interpreter, the question how many Ray
    nodes are alive runs `alive`, and the launch runs `launch`."""
    fake = folder / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'case "$1 $2" in\n  "-c "*resolve_recipe*) exec {shlex.quote(sys.executable)} "$@" ;;\n'
        f"  -c*) {alive} ;;\n  *) {launch} ;;\nesac\n"
    )
    fake.chmod(0o755)
    return fake


def test_sbatch_starts_the_nodes_waits_and_launches(slurm, tmp_path):
    """Without DRY_RUN: the Ray nodes' srun steps start (the fake leaves them running), the wait asks Ray until all
    3 nodes are alive (the fake python answers how many steps have started: they start in the background, in any
    order), the launch runs, and the steps are ended on exit."""
    alive = f'grep -c "ray start" {slurm.log} 2>/dev/null || echo 0'
    fake_python = python_answering(tmp_path, alive, f'echo "$@" > {tmp_path / "launched"}')
    done = slurm("recipes/sft_dual.yaml", "train.steps=5", PYTHON=str(fake_python))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "launched").read_text().split() == [
        "-m", "dualrl.launch", "recipes/sft_dual.yaml", "runtime.kind=ray", "runtime.address=10.1.2.3:6379",
        "runtime.worker_gpus=1", "train.steps=5",
    ]  # fmt: skip
    started = slurm.log.read_text().splitlines()
    assert sorted(line.split()[3:6] for line in started) == [[n, "ray", "start"] for n in ("gpu01", "gpu02", "gpu03")]
    for pid in Path(f"{slurm.log}.pids").read_text().split():
        with pytest.raises(ProcessLookupError):  # ended (and reaped) by the script's exit trap
            os.kill(int(pid), 0)


def test_sbatch_gives_up_at_the_deadline(slurm, tmp_path):
    """When fewer nodes than allocated join before RAY_WAIT_S, the script fails with one error line and exit 2,
    and does not launch."""
    fake_python = python_answering(tmp_path, "echo 2", f"touch {tmp_path / 'launched'}")
    done = slurm("recipes/sft_dual.yaml", PYTHON=str(fake_python), RAY_WAIT_S="0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: 2 of 3 Ray nodes joined 10.1.2.3:6379 within 0 s")
    assert not (tmp_path / "launched").exists()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {}, "usage:"),
        (("recipes/missing.yaml",), {}, "recipe recipes/missing.yaml not found"),
        (("recipes/sft_dual.yaml",), {"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
        (("recipes/sft_dual.yaml",), {"SLURM_GPUS_ON_NODE": "0"}, "do not fit the 0 GPU(s)"),
        (("recipes/sft_dual.yaml",), {"WORKER_GPUS": "one"}, "WORKER_GPUS must be a number"),
        ((EIGHT_GPU,), {"SLURM_GPUS_ON_NODE": "2"}, "8 actors asking 8.0 GPU(s) in all"),
        ((EIGHT_GPU,), {"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "8"}, "do not fit the 24 CPU(s)"),
        (("recipes/sft_dual.yaml", "runtime.learners=0"), {}, "runtime.learners: Input should be greater than"),
        (("recipes/sft_dual.yaml", "runtime.learner=2"), {}, "runtime.learner: unknown key"),
    ],
)
def test_sbatch_bad_input_is_one_error_line(slurm, args, env, message):
    """Bad input ends the script before anything starts, with one `error:` line naming the problem."""
    done = slurm(*args, DRY_RUN="1", **env)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr and done.stderr.count("\n") == 1
    assert "+ " not in done.stdout


# ------------------------------------------------------------------------------------ KubeRay RayJob
def test_rayjob_entrypoint_launches_an_existing_recipe_on_ray():
    """The manifest is a ray.io RayJob whose entrypoint runs `python -m dualrl.launch` on a recipe in recipes/
    with valid runtime overrides, joining the cluster it runs in; its worker pods have the GPUs and CPUs of the
    run's actors, several of them (the multi-GPU layout)."""
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    tokens = shlex.split(job["spec"]["entrypoint"])
    recipe, overrides = launched(tokens)
    assert recipe.startswith("recipes/") and (ROOT / recipe).is_file()
    assert {"runtime.kind=ray", "runtime.address=auto"} <= set(overrides)
    check_overrides(overrides)
    count, cpus_each, gpus_each = actors(recipe, overrides)
    cluster = job["spec"]["rayClusterSpec"]
    limits = [
        (group["replicas"], c["resources"]["limits"])
        for group in cluster["workerGroupSpecs"]
        for c in group["template"]["spec"]["containers"]
    ]
    gpus = sum(n * int(lim.get("nvidia.com/gpu", 0)) for n, lim in limits)
    cpus = sum(n * int(lim["cpu"]) for n, lim in limits)
    assert count > 3 and gpus >= count * gpus_each and cpus >= count * cpus_each, (count, gpus, cpus)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_override_check_can_fail():
    """check_overrides rejects a key that is not in the recipe (the RayJob and Slurm checks rely on it)."""
    with pytest.raises(RecipeError):
        check_overrides(["runtime.kindd=ray"])
