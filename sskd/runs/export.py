"""The deployable student of a run: its plain classifier as ONNX, TorchScript or safetensors, checked.

:func:`export_run` rebuilds a run's trained model, strips what its method added around the classifier (the SS
head, HSSAKD's branches, KDSS's heads: every such wrapper holds the classifier as ``.backbone``), writes the
classifier, which maps images ``(b, 3, H, W)`` to logits ``(b, K)``, and then compares the written file,
loaded back the way a deployment loads it (onnxruntime, ``torch.jit.load``, a fresh model with the saved
weights), against the PyTorch model on the given inputs. The file is published (renamed into place) only if
the largest absolute logit difference is within the tolerance; beside it ``FILE.json`` records what a user
of the file needs: the input size and preprocessing (the normalisation the run's shards use), the class
names, the run it came from with its weights' sha256, and the check's figures.

:class:`OnnxClassifier` runs an exported ONNX file as a module, so ``sskd evaluate`` scores it on shards
like a run. onnx and onnxruntime are imported only when used.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sskd import runs
from sskd.core import atomic
from sskd.core.errors import SSKDError
from sskd.models.base import logits_of

# The formats, and the packages each needs beyond torch (the `export` extra installs onnx's).
FORMATS = {
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "torchscript": (),
    "safetensors": ("safetensors",),
}
INFO_SUFFIX = ".json"  # FILE.json: the description written beside an exported FILE
# A logit may differ by DEFAULT_ATOL + DEFAULT_RTOL * |logit| (fp32): the absolute part bounds the logits of a
# trained classifier (tens at most); the relative part, a few fp32 roundings, admits the larger logits of a
# deep network early in training, whose exported graph (BatchNorm folded into convolutions) rounds as often.
DEFAULT_ATOL, DEFAULT_RTOL = 1e-4, 1e-5
RANDOM_INPUTS = 128  # images of the check when no shards are given (standard normal, fixed seed)
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"


def require_format(fmt: str) -> None:
    """Fail in one line when ``fmt`` is unknown or a package it needs cannot be imported."""
    if fmt not in FORMATS:
        raise SSKDError(f"--format {fmt!r}: unknown export format (one of {', '.join(FORMATS)})")
    for name in FORMATS[fmt]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SSKDError(
                f"--format {fmt} needs the package {name!r}, which cannot be imported ({exc}): "
                f"pip install 'sskd[export]' (or pip install {' '.join(FORMATS[fmt])})"
            ) from None


def info_path(path: str | Path) -> Path:
    """Where the description of an exported file lies: ``FILE.json`` beside ``FILE``."""
    path = Path(path)
    return path.with_name(path.name + INFO_SUFFIX)


def plain_classifier(model: nn.Module) -> nn.Module:
    """The classifier inside a run's model: method wrappers (SS head, branches, KDSS heads; each names itself
    in ``wrapper`` and holds the classifier as ``backbone``) are peeled off, however deep."""
    while getattr(model, "wrapper", None) and isinstance(getattr(model, "backbone", None), nn.Module):
        model = model.backbone
    return model


class Logits(nn.Module):
    """A classifier as a module whose only output is the logits tensor (what an exported graph returns)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.net(x))


def preprocessing(run: str | Path, info: dict[str, Any], shards: str | Path | None = None) -> dict[str, Any]:
    """How images must be prepared for the run's model, as the evaluation loader prepares them.

    The normalisation is that of the shards (``shards``, else the shards the run's ``config.yaml`` names): RGB
    pixels scaled to 0-1, minus ``mean``, divided by ``std``. The size is the run's ``data.size``, else the
    layout's default (32 for CIFAR-like shards, 224 for ImageNet-like); ImageNet-like images are first resized
    so their shorter side is ``size / 0.875`` (bilinear, antialiased), then centre-cropped to ``size``.
    """
    import yaml

    from pipelines.loader import DEFAULT_SIZE
    from shards.format import load_manifest_and_sha256

    config_path = Path(run) / runs.CONFIG
    try:
        cfg = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    data = cfg.get("data") if isinstance(cfg, dict) and isinstance(cfg.get("data"), dict) else {}
    source = shards if shards is not None else data.get("shards")
    if not source:
        raise SSKDError(
            f"{config_path}: names no shards; pass --shards (the shards the run trained on) for the normalisation"
        )
    try:
        manifest, sha = load_manifest_and_sha256(source)
    except SSKDError as exc:
        if shards is not None:
            raise
        raise SSKDError(
            f"{exc} (the shards {config_path} names); pass --shards with the shards the run trained on"
        ) from None
    if manifest["num_classes"] != info["num_classes"]:
        raise SSKDError(
            f"{run}: the model has {info['num_classes']} classes but the shards {source} have "
            f"{manifest['num_classes']}"
        )
    layout = manifest["layout"]
    size = int(data.get("size") or DEFAULT_SIZE[layout])
    return {
        "size": size,
        "layout": layout,
        "resize_shorter": round(size / 0.875) if layout == "imagenet" else None,
        "center_crop": size,
        "channels": "RGB",
        "scale": "pixel / 255",
        "mean": list(manifest["mean"]),
        "std": list(manifest["std"]),
        "shards": str(source),
        "shards_sha256": sha,
    }


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter: their deprecation and tracer warnings, and the ONNX optimiser's
    INFO log lines (one per graph pass)."""
    before = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(max(before, logging.INFO))
        try:
            yield
        finally:
            logging.disable(before)


def _write(fmt: str, module: Logits, example: torch.Tensor, path: Path, what: str) -> None:
    """Write ``module`` (eval mode) in ``fmt`` to ``path``; a failing exporter is one line naming ``what``."""
    try:
        with _quiet(), torch.no_grad():
            if fmt == "onnx":
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    verbose=False,
                    input_names=[ONNX_INPUT],
                    output_names=[ONNX_OUTPUT],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                )
                program.save(str(path))
            elif fmt == "torchscript":
                torch.jit.save(torch.jit.trace(module, example, check_trace=False), str(path))
            else:
                from safetensors.torch import save

                state = {k: v.detach().cpu().contiguous() for k, v in module.net.state_dict().items()}
                path.write_bytes(save(state))
    except OSError:  # disk full, read-only folder: the command line words it with the file
        raise
    except Exception as exc:  # the exporters raise many types (unsupported operator, tracing, dynamic shapes)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SSKDError(f"{what}: {fmt} export failed ({type(exc).__name__}: {first})") from exc


def _load(fmt: str, path: Path, arch: str, num_classes: int, normalization: dict | None = None):
    """The written file loaded back as a deployment loads it: a function from images to logits (for weights,
    with the re-normalisation ``normalization`` records, so it is checked on the same inputs as the graphs)."""
    if fmt == "onnx":
        return OnnxClassifier(path)
    if fmt == "torchscript":
        with _quiet():
            return torch.jit.load(str(path), map_location="cpu").eval()
    from safetensors.torch import load_file

    from sskd.models import create_model
    from sskd.models.weights import restore_input_norm

    model = create_model(arch, num_classes=num_classes)
    model.load_state_dict(load_file(str(path)))
    restore_input_norm(model, normalization)
    return Logits(model).eval()


def _network_norm(fmt: str, normalization: dict | None) -> dict[str, Any]:
    """A network trained with its own normalisation (pretrained weights): an ONNX or TorchScript graph holds
    the re-normalisation (it takes the data's normalisation, as ``prep`` says); bare weights do not, so their
    input is normalised with the network's mean and std. Both are recorded."""
    if not normalization:
        return {}
    out: dict[str, Any] = {"normalization": normalization}
    if fmt == "safetensors":
        out.update(mean=normalization["network"]["mean"], std=normalization["network"]["std"])
    return out


def compare(reference, exported, batches: Iterable, atol: float, rtol: float) -> dict[str, Any]:
    """Run both on every ``(images, labels or None)`` of ``batches``: the largest absolute logit difference, the
    largest absolute logit (the scale it is measured against), whether every logit is within ``atol + rtol *
    |reference logit|`` (NaN is not), the top-1 agreement (percent of inputs whose arg-max class is the same)
    and, with labels, each one's top-1."""
    worst, scale, within, agree, n, hits = 0.0, 0.0, True, 0, 0, [0, 0]
    labelled = True
    with torch.no_grad():
        for images, labels in batches:
            images = images.float().cpu()
            a, b = reference(images).double(), exported(images).double()
            if a.shape != b.shape:
                raise SSKDError(
                    f"the exported model returns shape {tuple(b.shape)}, the run's {tuple(a.shape)}"
                )
            if a.numel():
                diff = (a - b).abs()
                within &= bool((diff <= atol + rtol * a.abs()).all())  # NaN compares False
                d = diff.max().item()
                worst = d if math.isnan(d) else max(worst, d)
                scale = max(scale, a.abs().max().item())
            pa, pb = a.argmax(1), b.argmax(1)
            agree += int((pa == pb).sum())
            n += len(images)
            if labels is None:
                labelled = False
            else:
                labels = labels.cpu()
                hits[0] += int((pa == labels).sum())
                hits[1] += int((pb == labels).sum())
    if n == 0:
        raise SSKDError("the equivalence check saw no inputs")
    out = {
        "max_abs_logit_diff": worst,
        "max_abs_logit": scale,
        "within_tolerance": within,
        "top1_agreement": round(100 * agree / n, 3),
        "count": n,
    }
    if labelled:
        out.update(top1_pytorch=round(100 * hits[0] / n, 3), top1_exported=round(100 * hits[1] / n, 3))
    return out


def random_batches(size: int, count: int = RANDOM_INPUTS, batch_size: int = 32, seed: int = 0):
    """``count`` standard-normal images ``(3, size, size)`` (a fixed seed), in batches, without labels."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, count, batch_size):
        yield torch.randn(min(batch_size, count - start), 3, size, size, generator=gen), None


def export_run(
    run: str | Path,
    fmt: str,
    out: str | Path,
    *,
    prep: dict[str, Any],
    batches: Iterable | None = None,
    data: str = "",
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> dict[str, Any]:
    """Export the plain classifier of ``run`` to ``out`` in ``fmt``, check it and write ``out.json``.

    ``prep``: :func:`preprocessing`'s answer for the run; ``batches``: ``(images, labels or None)`` the check
    runs on (default: :func:`random_batches` of the run's size), ``data`` says what they are. Raises
    :class:`SSKDError` (and publishes nothing) when the export fails or a logit differs by more than ``atol +
    rtol * |logit|``; returns the description written beside the file (with the check's figures).
    """
    from sskd import __version__
    from sskd.runs.models import load_run_model

    require_format(fmt)
    model, info = load_run_model(run)
    classifier = plain_classifier(model).float().eval()
    module = Logits(classifier).eval()
    size = prep["size"]
    if batches is None:
        batches, data = (
            random_batches(size),
            f"{RANDOM_INPUTS} random inputs (standard normal; no shards given)",
        )
    out = Path(out)
    described = info_path(out)
    with atomic.atomic_path(out) as tmp:
        _write(fmt, module, torch.zeros(2, 3, size, size), tmp, f"{out} ({info['arch']})")
        loaded = _load(fmt, tmp, info["arch"], info["num_classes"], info.get("normalization"))
        check = compare(module, loaded, batches, atol, rtol)
        if not check["within_tolerance"]:
            raise SSKDError(
                f"{out}: the exported model differs from the run's: max |Δlogit| {check['max_abs_logit_diff']:.3g} "
                f"(logits up to {check['max_abs_logit']:.3g}) beyond --atol {atol:g} + --rtol {rtol:g} x |logit| "
                f"(top-1 agreement {check['top1_agreement']:.2f}% on {data}); nothing written"
            )
        sha = atomic.sha256_file(tmp)
        with contextlib.suppress(FileNotFoundError):
            described.unlink()  # an earlier export's description never sits beside this file
    record = {
        "format": fmt,
        "file": out.name,
        "sha256": sha,
        "arch": info["arch"],
        "num_classes": info["num_classes"],
        "classes": info.get("classes"),
        "input": {
            "shape": ["batch", 3, size, size],
            **({"name": ONNX_INPUT} if fmt == "onnx" else {}),
            **prep,
            **_network_norm(fmt, info.get("normalization")),
        },
        "output": {"shape": ["batch", info["num_classes"]], "what": "logits (no softmax)"},
        "source_run": str(Path(run).resolve()),
        "weights_sha256": info.get("weights_sha256"),
        "method": info.get("method"),
        "check": {"data": data, "atol": atol, "rtol": rtol, **check},
        "created_by": f"sskd {__version__}",
    }
    atomic.write_json(described, record)
    return record


def read_info(path: str | Path) -> dict[str, Any] | None:
    """The description written beside an exported file, or None when there is none."""
    described = info_path(path)
    if not described.is_file():
        return None
    try:
        record = json.loads(described.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SSKDError(f"{described}: unreadable ({exc})") from None
    if not isinstance(record, dict):
        raise SSKDError(f"{described}: not an export description (expected a JSON object)")
    return record


class OnnxClassifier(nn.Module):
    """An exported ONNX classifier run by onnxruntime (CPU) as a module: ``forward(images) -> logits`` on the
    images' device. ``num_classes`` and ``size`` come from the graph (None where a dimension is symbolic)."""

    def __init__(self, path: str | Path):
        super().__init__()
        require_format("onnx")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own error types for unreadable graphs
            first = (str(exc).strip().splitlines() or [""])[0]
            raise SSKDError(f"{path}: onnxruntime cannot load it ({first})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs[0].shape) != 2:
            raise SSKDError(
                f"{path}: not an image classifier (expects one (b, 3, H, W) input and (b, K) logits)"
            )
        self.input_name = inputs[0].name
        self.size = inputs[0].shape[2] if isinstance(inputs[0].shape[2], int) else None
        self.num_classes = outputs[0].shape[1] if isinstance(outputs[0].shape[1], int) else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {self.input_name: images.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(images.device)
