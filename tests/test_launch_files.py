"""The cluster launch material in launch/: the `ray up` config, the Slurm script and the KubeRay RayJob."""

from __future__ import annotations

import copy
import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from dualrl.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "launch" / "ray-cluster-gpu.yaml"
SBATCH = ROOT / "launch" / "slurm" / "dualrl-ray.sbatch"
RAYJOB = ROOT / "launch" / "kuberay-rayjob.yaml"
ACTORS = 3  # learner, rollout worker, reward worker


def launched(tokens: list[str]) -> tuple[str, list[str]]:
    """(recipe, overrides) of a `python -m dualrl.launch RECIPE [overrides]` command line."""
    i = next(i for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["-m", "dualrl.launch"])
    return tokens[i + 2], tokens[i + 3 :]


def check_overrides(overrides: list[str]) -> None:
    """The overrides are valid recipe keys and values (on the tiny default recipe, whose paths exist)."""
    load_recipe(str(ROOT / "recipes" / "sft_dual.yaml"), ["output_dir=unused", *overrides])


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
    """The head node type exists and hosts no actor (GPU 0); the worker types can give the three actors a GPU
    each; every node gets the checkout synced and installs it, and the head starts Ray as the head."""
    config = yaml.safe_load(CLUSTER.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and max(t["resources"]["GPU"] * t["max_workers"] for t in workers.values()) >= ACTORS
    assert config["file_mounts"] == {"~/dualrl": "."}
    assert any("pip install" in c and "-e ~/dualrl" in c for c in config["setup_commands"])
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert all("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"] if "ray start" in c)


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


def test_sbatch_recipe_from_the_environment(slurm):
    """With RECIPE set, every argument is an override; WORKER_GPUS and RAY_PORT reach the commands."""
    done = slurm("train.steps=5", DRY_RUN="1", RECIPE="recipes/grpo_dual.yaml", WORKER_GPUS="0.5", RAY_PORT="7000")
    assert done.returncode == 0, done.stderr
    assert commands(done.stdout)[-1][3:] == [
        "recipes/grpo_dual.yaml", "runtime.kind=ray", "runtime.address=10.1.2.3:7000", "runtime.worker_gpus=0.5",
        "train.steps=5",
    ]  # fmt: skip


def test_sbatch_starts_the_nodes_waits_and_launches(slurm, tmp_path):
    """Without DRY_RUN: the Ray nodes' srun steps start (the fake leaves them running), the wait asks Ray until all
    3 nodes are alive (the fake python answers how many steps have started: they start in the background, in any
    order), the launch runs, and the steps are ended on exit."""
    fake_python = tmp_path / "python"
    alive = f'grep -c "ray start" {slurm.log} 2>/dev/null || echo 0'
    fake_python.write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then {alive}; else echo "$@" > {tmp_path / "launched"}; fi\n'
    )
    fake_python.chmod(0o755)
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
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/usr/bin/env bash\n[ "$1" = -c ] && echo 2 || touch {tmp_path / "launched"}\n')
    fake_python.chmod(0o755)
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
    with valid runtime overrides, joining the cluster it runs in; its GPU workers fit the three actors."""
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    tokens = shlex.split(job["spec"]["entrypoint"])
    recipe, overrides = launched(tokens)
    assert recipe.startswith("recipes/") and (ROOT / recipe).is_file()
    assert {"runtime.kind=ray", "runtime.address=auto"} <= set(overrides)
    check_overrides(overrides)
    worker_gpus = float(next(o.split("=", 1)[1] for o in overrides if o.startswith("runtime.worker_gpus=")))
    cluster = job["spec"]["rayClusterSpec"]
    gpus = sum(
        group["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for group in cluster["workerGroupSpecs"]
        for c in group["template"]["spec"]["containers"]
    )
    assert gpus >= ACTORS * worker_gpus
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_override_check_can_fail():
    """check_overrides rejects a key that is not in the recipe (the RayJob and Slurm checks rely on it)."""
    with pytest.raises(RecipeError):
        check_overrides(["runtime.kindd=ray"])
