"""Inference on ONNX Runtime: the bi-encoder's towers (``retriever.runtime``) and the reranker
(``reranker.runtime``): onnx (fp32) | onnx_int8.

Each model is exported at load time with ``torch.onnx.export`` and kept in memory (nothing is
written beside the trained model, whose weights stay the one source of truth). The export uses
eager attention: its MatMul + Softmax pattern is what ``onnxruntime.transformers.optimizer``
fuses into the Attention op for BERT-like encoders (it does not recognise SDPA's). ``onnx_int8``
then quantizes the fused graph with ``quantize_dynamic``: weights int8 per output channel,
activations quantized at run time. Needs ``pip install 'ragtrain[onnx]'``.

Batches are cut to ``ONNX_BATCH`` texts: ONNX Runtime's CPU attention materialises every score,
and 8 passages per batch ran fastest on 2 cores (int8: 130 passages/s at 8, 113 at 16, 95 at 64;
``bench/encode.py``).
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ragtrain.errors import RagtrainError

ONNX_BATCH = 8
T = TypeVar("T")
# model types onnxruntime's transformer optimizer fuses as BERT (attention, layer norms, GELU)
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert"}


def require_onnx(param: str) -> None:
    """onnx and onnxruntime importable, else an error naming ``param`` (the runtime setting)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RagtrainError(f"{param}: onnx / onnx_int8 need onnx and onnxruntime ({e}): "
                            f"pip install 'ragtrain[onnx]', or set {param}: torch") from None


def on_runtime(name: str, param: str, export: Callable[[bool], T]) -> T | None:
    """What a model runs on for ``name`` (the value of ``param``): None for torch, else
    ``export(int8)``, the ONNX Runtime copy exported now from the current weights."""
    if name == "torch":
        return None
    require_onnx(param)
    return export(name == "onnx_int8")


class _Positional(torch.nn.Module):
    """``call(module, inputs)`` with the inputs given positionally, as the exporter passes them."""

    def __init__(self, module: torch.nn.Module, names: list[str],
                 call: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> None:
        super().__init__()
        self.module, self.names, self.call = module, names, call

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.call(self.module, dict(zip(self.names, inputs, strict=True)))


def export_model(module: torch.nn.Module, example: dict[str, torch.Tensor],
                 call: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
                 out_dir: Path, int8: bool) -> Path:
    """An ONNX file of ``call(module, inputs)`` -> one float tensor (batch first), its inputs
    named as ``example``'s keys (batch and sequence axes dynamic); fused where the encoder is
    BERT-like, int8-quantized when ``int8``. Returns its path in ``out_dir``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    module = copy.deepcopy(module).float().cpu().eval()  # the torch model keeps its attention
    hf = next(m for m in module.modules() if hasattr(m, "config"))  # the transformers model
    config = hf.config
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation("eager")
    names = list(example)
    path = out_dir / "model.onnx"
    axes = {**{n: {0: "batch", 1: "seq"} for n in names}, "output": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and trace notes
        torch.onnx.export(_Positional(module, names, call), tuple(example.values()), str(path),
                          input_names=names, output_names=["output"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    if getattr(config, "model_type", "") in _BERT_LIKE:
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(str(path), model_type="bert",
                               num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
        path = out_dir / "model_fused.onnx"
        fused.save_model_to_file(str(path))
    if int8:
        q = out_dir / "model_int8.onnx"
        logging.disable(logging.WARNING)  # the quantizer's advice to pre-process (an image tip)
        try:  # the fused graph's contrib ops defeat shape inference: name the default type
            quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.disable(logging.NOTSET)
        path = q
    return path


class OnnxModel:
    """An exported model in an ONNX Runtime session: named int64 inputs -> a float32 array."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.log_severity_level = 3  # no warnings about unused initializers
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **inputs: torch.Tensor) -> np.ndarray:
        feed = {k: inputs[k].numpy().astype(np.int64, copy=False) for k in self.inputs}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


def exported(module: torch.nn.Module, example: dict[str, torch.Tensor],
             call: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
             int8: bool, what: str) -> OnnxModel:
    """``module`` exported (``export_model``) and loaded into a session; the files are gone."""
    print(f"{what}: exporting to ONNX ({'int8' if int8 else 'fp32'})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ragtrain-onnx-") as tmp:
        return OnnxModel(export_model(module, example, call, Path(tmp), int8))


def onnx_towers(query: torch.nn.Module, passage: torch.nn.Module | None, tokenizer: Any,
                int8: bool) -> tuple[OnnxModel, OnnxModel]:
    """(query, passage) ONNX Runtime towers of a bi-encoder's (the same when shared): each a
    ``Tower`` (pooled, L2-normalised embeddings) of (input_ids, attention_mask)."""
    enc = tokenizer(["a passage", "another, longer passage of text"], padding=True,
                    return_tensors="pt")
    example = {k: enc[k] for k in ("input_ids", "attention_mask")}

    def tower(m: torch.nn.Module, kw: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(**kw)

    q = exported(query, example, tower, int8, "retriever.runtime: the query encoder")
    if passage is None:
        return q, q
    return q, exported(passage, example, tower, int8, "retriever.runtime: the passage encoder")


def onnx_cross_encoder(model: torch.nn.Module, tokenizer: Any, int8: bool) -> OnnxModel:
    """A sequence-classification model's first logit over (question, passage) pairs."""
    enc = tokenizer(["a question", "another question"], ["a passage", "a longer passage text"],
                    padding=True, return_tensors="pt")
    example = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    def first_logit(m: torch.nn.Module, kw: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(**kw).logits[:, 0]

    return exported(model, example, first_logit, int8, "reranker.runtime: the reranker")
