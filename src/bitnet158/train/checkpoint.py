"""Training checkpoints: written atomically, read back bit for bit, never through pickle.

A checkpoint is a directory `step-000120/` inside the run directory, holding

- `model.safetensors`: the latent (full-precision) weights, full tensors even under FSDP;
- `optimizer.safetensors`: AdamW's moments and step counts, `state/<param>/<key>`, plus the
  torch RNG state;
- `state.json`: everything else (step, optimizer param groups, the training and model
  configs, the history so far, names that alias one tensor such as tied embeddings).

It is written into a temporary directory that is renamed into place once complete, so a run
killed at any moment leaves either the previous checkpoints or the new one, never a torn one.
Loading checks names, shapes and dtypes against the model and raises `FormatError` naming the
file on any mismatch or corruption.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import FormatError
from ..formats.atomic import fsync_path
from .distributed import barrier, current

FORMAT = "bitnet158-train"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _state_options(offload: bool = True):
    """Full (unsharded) tensors; gathered to rank 0 on the CPU when `offload`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=offload)


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors with one name per storage (safetensors refuses shared ones) and the aliases."""
    seen: dict[tuple[int, int], str] = {}
    unique, aliases = {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().contiguous()
    return unique, aliases


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint so that a kill at any moment never leaves a torn `step-*`: rename it
    out of the checkpoint names first (atomic), then delete; the next save sweeps leftovers."""
    trash = checkpoint.with_name(f".tmp-{checkpoint.name}-discarded")
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path | None:
    """Write checkpoint `step` of a run atomically; every process of a distributed run must call.

    `state` is JSON-serialisable (configs, history). Returns the new directory (None on ranks
    other than 0). The oldest checkpoints beyond `keep` are removed after the new one exists.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = _state_options()
    model_sd = get_model_state_dict(model, options=opts)  # collective under FSDP
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not current().is_main:
        barrier()
        return None
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for stale in run.glob(".tmp-step-*"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    final = run / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=run))
    try:
        tensors, aliases = _dedupe(model_sd)
        save_file(tensors, str(tmp / "model.safetensors"))
        opt_tensors = {"rng/torch": torch.get_rng_state()}
        for pname, pstate in optim_sd["state"].items():
            for key, value in pstate.items():
                if not torch.is_tensor(value):
                    value = torch.tensor(value)
                opt_tensors[f"state/{pname}/{key}"] = value.detach().contiguous()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "aliases": aliases,
            "param_groups": optim_sd["param_groups"],
            **state,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_jsonable))
        for f in tmp.iterdir():
            fsync_path(f)
        if final.exists():  # re-saving a step (e.g. the final one): replace it
            _discard(final)
        os.replace(tmp, final)
        fsync_path(run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(run)[:-keep] if keep > 0 else []:
        _discard(old)
    barrier()
    return final


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a checkpoint directory, validated."""
    file = Path(path) / "state.json"
    if not file.is_file():
        raise FormatError(f"{path}: not a bitnet158 training checkpoint (no state.json)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{file}: corrupt ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"{file}: not a bitnet158 training checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{file}: checkpoint format version {meta.get('format_version')!r} is not "
            f"supported (this version reads {FORMAT_VERSION})"
        )
    return meta


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FormatError(f"{file}: missing from the checkpoint")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{file}: corrupt or truncated ({exc})") from None


def load_model_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full latent state dict of a checkpoint directory (aliases restored)."""
    path = Path(path)
    meta = read_state(path)
    tensors = _load_tensors(path / "model.safetensors")
    for alias, name in meta.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    return tensors


def _check_against(where: Path, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]):
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise FormatError(
            f"{where}: does not match the model (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}); was it written for another model configuration?"
        )
    for name, t in want.items():
        if tuple(got[name].shape) != tuple(t.shape) or got[name].dtype != t.dtype:
            raise FormatError(
                f"{where}: tensor {name} is {got[name].dtype}{list(got[name].shape)}, the model "
                f"has {t.dtype}{list(t.shape)}"
            )


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore weights (and optimizer state, RNG) from a checkpoint; returns its state.json.

    Every process of a distributed run calls it with its wrapped model.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    meta = read_state(path)
    weights = load_model_weights(path)
    # sharded view: canonical names and full shapes (DTensors under FSDP) on every rank
    _check_against(path / "model.safetensors", weights, get_model_state_dict(model))
    set_model_state_dict(model, weights, options=_state_options(offload=False))
    if optimizer is not None:
        flat = _load_tensors(path / "optimizer.safetensors")
        torch.set_rng_state(flat.pop("rng/torch"))
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            _, pname, field = key.split("/", 2)
            state.setdefault(pname, {})[field] = value
        groups = meta["param_groups"]
        names = {n for g in groups for n in g["params"]}
        model_names = {n for n, p in model.named_parameters() if p.requires_grad}
        if names != {n.removeprefix("module.") for n in model_names} and names != model_names:
            raise FormatError(
                f"{path / 'state.json'}: optimizer parameters do not match the model's"
            )
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        set_optimizer_state_dict(
            model,
            optimizer,
            {"state": state, "param_groups": groups},
            options=_state_options(offload=False),
        )
    return meta
