"""Checks of what a validated recipe names outside itself: files and folders that must exist, reward plugins that
must be found and take the options given (run by `load_recipe`), and what a launch needs of this machine: a folder
it can write, the device, a model that can be built, a Ray head that answers (`check_launch`). All of them run
before any model is built or any file written."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from dualrl.recipe.section import RecipeError

if TYPE_CHECKING:
    from dualrl.recipe.data import DataSpec
    from dualrl.recipe.model import ModelSpec
    from dualrl.recipe.run import RuntimeSpec
    from dualrl.recipe.schema import Recipe

RAY_PROBE_S = 5.0  # deadline for resolving and reaching runtime.address before the run starts


def check_paths(recipe: Recipe) -> None:
    """Files the recipe names must exist before anything is built."""
    pretrained = recipe.model.pretrained
    if pretrained is not None and not (Path(pretrained) / "model.safetensors").is_file():
        raise RecipeError(
            f"model.pretrained: no dualrl model at {pretrained!r} (expected model.safetensors "
            "there). Build it with `python -m dualrl.launch recipes/pretrain_tiny.yaml` or set "
            "model.pretrained=null to start from random init."
        )
    if sum(x is not None for x in (pretrained, recipe.model.sa2va, recipe.model.vlm)) > 1:
        raise RecipeError("model.pretrained, model.sa2va and model.vlm are exclusive: set one of them")
    vlm = recipe.model.vlm
    if vlm is not None and not (Path(vlm).expanduser() / "config.json").is_file():
        raise RecipeError(f"model.vlm: no transformers model directory at {vlm!r} (expected config.json there)")
    sa2va = recipe.model.sa2va
    if sa2va is not None:
        if pretrained is not None:
            raise RecipeError("model.sa2va and model.pretrained are exclusive: set one of them")
        folder = Path(sa2va).expanduser()
        if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            raise RecipeError(
                f"model.sa2va: no Sa2VA checkpoint at {sa2va!r} (expected model.safetensors or "
                "model.safetensors.index.json there)"
            )
    ckpt = recipe.model.sam.checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        raise RecipeError(f"model.sam.checkpoint: file not found: {ckpt!r}")
    if recipe.model.init_from is not None:
        from dualrl.checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(recipe.model.init_from)
        except FileNotFoundError as err:
            raise RecipeError(f"model.init_from: {err}") from None
    check_data_paths(recipe.data)


# Recipe keys of each source that name files or folders, and what is expected there.
DATA_PATHS = {
    "refcoco": {
        "root": "the folder of refcoco/, refcoco+/, refcocog/ (instances.json + refs(*).p)",
        "images": "the COCO train2014 image folder",
    },
    "sa1b": {"root": "the SA-1B folder (sa_*.jpg + sa_*.json, or their extracted tar folders)"},
    "sav": {"root": "the SA-V folder (sav_*.mp4 + sav_*_manual.json, or .npz frame pairs)"},
    "openimages": {
        "annotations": "train-annotations-object-segmentation.csv",
        "classes": "oidv7-class-descriptions.csv",
        "images": "the folder of <ImageID>.jpg",
        "masks": "the folder of mask PNGs or train-masks-<c>.zip files",
    },
}


def check_data_paths(data: DataSpec) -> None:
    """Every data path of an enabled source exists; the message names the recipe key."""
    for name, keys in DATA_PATHS.items():
        spec = getattr(data, name)
        if spec is None or (spec.weight == 0 and not (name == "refcoco" and data.eval_source != "shapes")):
            continue
        for key, what in keys.items():
            path = Path(getattr(spec, key)).expanduser()
            if not path.exists():
                raise RecipeError(
                    f"data.{name}.{key}: {what} not found at '{path}'. Set it in the recipe or "
                    f"with data.{name}.{key}=/path/to/it, or switch the source off with "
                    f"data.{name}=null."
                )


def check_rewards(recipe: Recipe) -> None:
    """Every reward plugin can be found and takes the options the recipe gives it."""
    from rewards.registry import RewardConfigError, resolve_plugin

    for i, spec in enumerate(recipe.rewards):
        try:
            resolve_plugin(spec)
        except RewardConfigError as err:
            raise RecipeError(f"rewards[{i}] ({spec.key}): {err}") from None


def check_launch(recipe: Recipe) -> None:
    """What a training run needs beyond a valid recipe, before it writes recipe.yaml or builds a model."""
    check_writable_folder(recipe.output_dir, "output_dir")
    check_device(recipe.train.device)
    check_model(recipe.model)
    check_runtime(recipe.runtime)


def check_writable_folder(path: str | Path, key: str) -> None:
    """`path` is a folder, or can be made one, and files can be written in it. Permission bits do not tell (root
    ignores them; a read-only or pseudo file system does not), so a uniquely named folder is made in the nearest
    existing one and removed at once."""
    folder = existing = Path(path)
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as err:  # a folder on the way that cannot be looked into
        raise RecipeError(f"{key}: {str(path)!r} cannot be reached ({err.strerror}: {err.filename})") from None
    if existing == folder and not folder.is_dir():
        raise RecipeError(f"{key}: {str(path)!r} is a file, not a folder; choose another {key}")
    if not existing.is_dir():
        raise RecipeError(f"{key}: {str(path)!r} cannot be made: {str(existing)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dualrl-write-check-", dir=existing))
    except OSError as err:
        raise RecipeError(
            f"{key}: {str(path)!r} cannot be written: making a folder in {str(existing)!r} fails ({err.strerror}); "
            "choose a folder you can write to"
        ) from None


def check_device(name: str) -> None:
    """train.device names a device this machine has."""
    from dualrl.runtime import resolve_device

    try:
        resolve_device(name)
    except RuntimeError as err:
        raise RecipeError(f"{err}; set train.device=cpu, or auto to take a GPU when there is one") from None


def check_model(spec: ModelSpec) -> None:
    """What would stop the model's build, found without building it: attention heads that do not split the width, a
    vocabulary smaller than its tokenizer, an architecture other than the one a pretrained directory was built
    with, a SAM2 config that does not compose."""
    splits = [
        ("model.vision.heads", spec.vision.heads, "model.vision.hidden_size", spec.vision.hidden_size),
        ("model.text.heads", spec.text.heads, "model.text.hidden_size", spec.text.hidden_size),
        ("model.text.kv_heads", spec.text.kv_heads, "model.text.heads", spec.text.heads),
    ]
    for key, parts, whole_key, whole in splits:
        if whole % parts:
            raise RecipeError(f"{key}={parts} does not divide {whole_key}={whole}; choose a divisor of it")
    if spec.pretrained is not None:
        from dualrl.model.build import check_arch

        try:
            check_arch(spec, Path(spec.pretrained))
        except OSError as err:
            raise RecipeError(
                f"model.pretrained: cannot read {str(Path(spec.pretrained) / 'arch.json')!r} ({err.strerror}); a "
                "dualrl model directory holds it beside model.safetensors"
            ) from None
        except json.JSONDecodeError as err:
            raise RecipeError(f"model.pretrained: {spec.pretrained}/arch.json is not JSON ({err})") from None
        except ValueError as err:  # the keys that differ from the directory's, named by check_arch
            raise RecipeError(str(err)) from None
    elif spec.sa2va is None and spec.vlm is None:
        from dualrl.model.tokenizer import build_tiny_tokenizer

        size = len(build_tiny_tokenizer(spec.text.vocab_size))
        if size > spec.text.vocab_size:
            raise RecipeError(
                f"model.text.vocab_size={spec.text.vocab_size} is smaller than the tiny tokenizer ({size} tokens); "
                f"set it to at least {size}"
            )
    check_sam_config(spec.sam.config, spec.sam.image_size, spec.sam.overrides)


def check_sam_config(config: str, image_size: int, overrides: list[str]) -> None:
    """The SAM2 config composes with its overrides, as `dualrl.model.sam.build_sam` composes it."""
    import sam2  # noqa: F401  (registers the package's configs with hydra)
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.resolve(compose(config_name=config, overrides=[f"++model.image_size={image_size}", *overrides]))
    except (HydraException, OmegaConfBaseException) as err:
        reason = str(err).strip().splitlines()[0]
        raise RecipeError(
            f"model.sam.config={config!r} with model.sam.overrides does not compose: {reason} (configs live in the "
            "sam2 package, e.g. configs/sam2.1/sam2.1_hiera_t.yaml)"
        ) from None


def check_runtime(spec: RuntimeSpec) -> None:
    """Under runtime.kind=ray, runtime.address is `auto`, `local`, null, `host:port` or `ray://host:port`, and
    something answers at the last two before the run starts (Ray itself would wait for it without a deadline)."""
    address = spec.address
    if spec.kind != "ray" or address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 host is written [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RecipeError(
            f"runtime.address={address!r} is not an address Ray joins: give host:port (the head's GCS port, e.g. "
            "10.0.0.1:6379), ray://host:port, auto, or null to start a local Ray"
        )
    try:
        _reach(host, int(port), RAY_PROBE_S)
    except OSError as err:
        reason = err.strerror or str(err) or f"no answer in {RAY_PROBE_S:.0f} s"
        raise RecipeError(
            f"runtime.address={address!r}: nothing answers at {host}:{port} ({reason}); start the Ray head there "
            "(`ray start --head`) or set runtime.address=null to start a local Ray"
        ) from None


def _reach(host: str, port: int, timeout: float) -> None:
    """Open and close a TCP connection to host:port within `timeout` for the name lookup and as much for the
    connection (the lookup runs in a daemon thread: it has no deadline of its own and must not hold the exit)."""
    found: dict[str, object] = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            found["error"] = err

    thread = threading.Thread(target=lookup, name="dualrl-ray-address-lookup", daemon=True)
    thread.start()
    thread.join(timeout)
    if "error" in found:
        raise found["error"]  # type: ignore[misc]
    if "infos" not in found:
        raise TimeoutError(f"looking up {host} took over {timeout:.0f} s")
    family, kind, proto, _, where = found["infos"][0]  # type: ignore[index]
    with socket.socket(family, kind, proto) as probe:
        probe.settimeout(timeout)
        probe.connect(where)
