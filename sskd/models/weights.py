"""Weights from outside a run, and the input normalisation each network was trained with.

- **Pretrained timm weights** (``timm:NAME.TAG`` with ``--pretrained``, or ``--teacher timm:NAME.TAG``) come
  from the local Hugging Face cache only (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``): :func:`pretrained_file` never touches the network unless downloads were
  allowed (``--allow-download``, which sets ``SSKD_ALLOW_DOWNLOAD=1``). A missing file is one line saying
  where it was looked for and the command that fetches it.
- **A weights file** (``--weights FILE``, ``--teacher-weights FILE``): a ``.safetensors`` file or a ``.pth``
  / ``.pt`` state dict, loaded weights-only (a pickle that references anything but tensors is refused and
  nothing in it runs). Its keys and shapes are checked before loading; the first key that does not fit is
  named with both shapes. A model starting from the file may get a new classifier (a student whose class
  count differs from the file's): only keys of modules that output the class count are left fresh.
- **Normalisation.** A network made from pretrained weights carries the mean and std it was trained with
  (``input_norm``: timm's pretrained config, or ImageNet's for torchvision). The views arrive normalised
  with the shards' mean and std; when a network's differ, :func:`attach_input_norm` re-normalises its input
  on the device (``x * std_data / std_net + (mean_data - mean_net) / std_net``, as timm's distillation
  task does for its teacher) with a forward pre-hook, so the views stay what they are and the state dict
  does not change. ``model.json`` records both (``normalization``), and a model rebuilt from it gets the
  same hook back (:func:`restore_input_norm`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sskd.core.errors import SSKDError

ALLOW_DOWNLOAD_ENV = "SSKD_ALLOW_DOWNLOAD"
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's pretrained weights
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in order


def downloads_allowed() -> bool:
    """Whether this process may download pretrained weights (``--allow-download`` / ``SSKD_ALLOW_DOWNLOAD=1``)."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "") not in ("", "0")


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it (read from the environment now, not at
    import, so ``HF_HOME`` set by a launcher or a test counts)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def pretrained_cfg(model_name: str):
    """timm's pretrained config of ``NAME`` or ``NAME.TAG`` (the default tag for a bare name); a name timm
    has no weights for is one line with the tags it has."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, _tag = split_model_name_tag(model_name)
    try:
        cfg = get_pretrained_cfg(model_name, allow_unregistered=True) if timm.is_model(arch) else None
    except RuntimeError:  # a tag timm does not know for this architecture
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        tags = timm.list_pretrained(f"{arch}.*")
        have = f"; timm {timm.__version__} has: {', '.join('timm:' + t for t in tags[:8])}" if tags else ""
        raise SSKDError(f"timm:{model_name}: timm has no pretrained weights by this name{have}")
    return cfg


def pretrained_file(model_name: str) -> Path:
    """The local file of ``timm:NAME.TAG``'s pretrained weights (downloaded only when allowed)."""
    cfg = pretrained_cfg(model_name)
    full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    if not cfg.hf_hub_id:
        raise SSKDError(
            f"timm:{full}: its pretrained weights are not on the Hugging Face hub ({cfg.url or cfg.file}); "
            "download them yourself and pass the file with --weights FILE"
        )
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILENAMES
    cache = hf_hub_cache()
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision or None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    if downloads_allowed():
        return _download(full, repo, revision or None, names, cache)
    folder = cache / f"models--{repo.replace('/', '--')}"
    raise SSKDError(
        f"timm:{full}: pretrained weights are not in the local Hugging Face cache (looked for "
        f"{folder}/snapshots/*/{names[0]}); fetch them where there is network with "
        f"`HF_HOME={cache.parent} python -c \"import timm; timm.create_model('{full}', pretrained=True)\"` "
        "and copy that folder here (or set HF_HOME), or rerun with --allow-download"
    )


def _download(full: str, repo: str, revision: str | None, names, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    for name in names:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache))
        except EntryNotFoundError:
            continue
        except Exception as exc:  # offline, no such repo, a proxy: one line, not a traceback
            raise SSKDError(f"timm:{full}: could not download its weights from {repo}: {exc}") from None
    raise SSKDError(f"timm:{full}: the hub repository {repo} has none of {', '.join(names)}")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a weights file's bytes: what binds a teacher made from it to caches and runs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a weights-only ``.pth``/``.pt``/``.bin`` (a ``{"state_dict": ...}``
    or ``{"model": ...}`` around it is unwrapped, a DDP ``module.`` prefix removed); one line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise SSKDError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise SSKDError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]*\w)", str(exc))
            why = f"it references {found.group(1)}" if found else "it holds more than tensors"
            raise SSKDError(
                f"{path}: refused to load: not a weights-only file ({why}, which weights-only loading does "
                "not admit); nothing in it was run: save the model's state_dict() (or a .safetensors file) instead"
            ) from None
        except Exception as exc:  # a cut-short zip, not a torch file at all
            raise SSKDError(
                f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})"
            ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict) and not torch.is_tensor(state.get(key)):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise SSKDError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise SSKDError(
                f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor: not a state dict"
            )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _head_prefixes(model: nn.Module, num_classes: int) -> list[str]:
    """The modules whose outputs are the class scores: a Linear or a 1x1 convolution with ``num_classes`` outputs."""
    out = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or (
            isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1)
        ):
            out.append(name + ".")
    return out


def load_weights_file(
    model: nn.Module,
    path: str | Path,
    num_classes: int,
    *,
    new_head: bool,
    what: str = "--weights",
    arch: str | None = None,
) -> str:
    """Load a weights file into ``model`` (checked first: nothing is loaded when a key does not fit); returns
    the file's sha256. ``new_head``: a classifier whose class count differs from the file's stays fresh
    (a student's new head); else such a file is refused naming the class counts."""
    state = read_state_dict(path)
    arch = arch or getattr(model, "arch", type(model).__name__)
    target = model
    inner = getattr(model, "net", None)  # a timm or imported model: the file may hold the bare network's keys
    if isinstance(inner, nn.Module) and not any(k.startswith("net.") for k in state):
        target = inner
    own = target.state_dict()
    heads = _head_prefixes(target, num_classes)
    kept: dict[str, torch.Tensor] = {}
    fresh = []
    for key, value in state.items():
        if key not in own:
            extra = sum(k not in own for k in state)
            raise SSKDError(
                f"{what} {path}: key {key!r} is not in {arch} ({extra} such key(s)): weights of another architecture?"
            )
        if value.shape != own[key].shape:
            in_head = any(key.startswith(h) for h in heads)
            if in_head and new_head:
                fresh.append(key)
                continue
            if in_head:
                raise SSKDError(
                    f"{what} {path}: its classifier {key} has {value.shape[0]} classes but the shards have "
                    f"{num_classes}"
                )
            raise SSKDError(
                f"{what} {path}: key {key!r} has shape {tuple(value.shape)} but {arch} expects {tuple(own[key].shape)}"
            )
        kept[key] = value
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise SSKDError(
            f"{what} {path}: key {missing[0]!r} that {arch} needs is missing ({len(missing)} missing in all)"
        )
    target.load_state_dict(kept, strict=False)
    if fresh:
        import logging

        logging.getLogger(__name__).info(
            "%s %s: new classifier for %d classes (%s left fresh)", what, path, num_classes, ", ".join(fresh)
        )
    return file_sha256(path)


# -- normalisation ------------------------------------------------------------------------------------------


class Renormalize:
    """A forward pre-hook: the input, normalised with the data's mean/std, re-normalised with the network's."""

    def __init__(self, data: dict[str, list[float]], network: dict[str, list[float]]):
        self.data, self.network = data, network
        d_mean, d_std = torch.tensor(data["mean"]), torch.tensor(data["std"])
        n_mean, n_std = torch.tensor(network["mean"]), torch.tensor(network["std"])
        self.scale = (d_std / n_std).view(1, 3, 1, 1)
        self.shift = ((d_mean - n_mean) / n_std).view(1, 3, 1, 1)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        x = args[0]
        y = x * self.scale.to(x.device, x.dtype) + self.shift.to(x.device, x.dtype)
        return (y, *args[1:]), kwargs


def _norm(mean, std) -> dict[str, list[float]]:
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def norm_record(data_mean, data_std, mean, std, source: str, input_size=None) -> dict[str, Any]:
    """What ``model.json`` records of a network's normalisation: the ``data``'s (the shards') and the
    ``network``'s own, with where it comes from and, for a pretrained config, the input size (C, H, W) its
    weights were trained at."""
    network: dict[str, Any] = {**_norm(mean, std), "source": source}
    if input_size:
        network["input_size"] = list(input_size)
    return {"data": _norm(data_mean, data_std), "network": network}


def attach_input_norm(model: nn.Module, data_mean, data_std) -> dict[str, Any] | None:
    """Re-normalise ``model``'s input from the data's normalisation to the one it was trained with
    (``model.input_norm``: ``(mean, std, source)``), when they differ; returns what ``model.json`` records
    (None for a network that uses the data's own)."""
    net = getattr(model, "input_norm", None)
    if net is None:
        return None
    record = norm_record(data_mean, data_std, *net, getattr(model, "input_size", None))
    return restore_input_norm(model, record)


def restore_input_norm(model: nn.Module, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Install the re-normalisation ``record`` (as :func:`attach_input_norm` returned it) on ``model``."""
    if not record:
        return None
    model.sskd_normalization = record
    if not torch.allclose(
        torch.tensor(record["data"]["mean"]), torch.tensor(record["network"]["mean"])
    ) or not (torch.allclose(torch.tensor(record["data"]["std"]), torch.tensor(record["network"]["std"]))):
        model.register_forward_pre_hook(Renormalize(record["data"], record["network"]), with_kwargs=True)
    return record
