"""The bi-encoder's inference on ONNX Runtime (``retriever.runtime``: onnx | onnx_int8).

Each tower is exported at load time with ``torch.onnx.export`` and kept in memory (nothing is
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragtrain.errors import RagtrainError

RUNTIMES = ("torch", "onnx", "onnx_int8")
ONNX_BATCH = 8
# model types onnxruntime's transformer optimizer fuses as BERT (attention, layer norms, GELU)
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert"}


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RagtrainError(f"retriever.runtime: onnx / onnx_int8 need onnx and onnxruntime "
                            f"({e}): pip install 'ragtrain[onnx]', or set retriever.runtime: "
                            "torch") from None


class _Inputs(torch.nn.Module):
    """The tower called with positional (input_ids, attention_mask), as the exporter calls."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tower(input_ids=input_ids, attention_mask=attention_mask)


def export_tower(tower: torch.nn.Module, tokenizer: Any, out_dir: Path, int8: bool) -> Path:
    """An ONNX file of ``tower`` (a ``Tower``: pooled, L2-normalised embeddings), fused where
    the encoder is BERT-like, int8-quantized when ``int8``; returns its path in ``out_dir``."""
    require_onnx()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tower = copy.deepcopy(tower).float().cpu().eval()  # the torch model keeps its attention
    config = tower.model.config
    if hasattr(tower.model, "set_attn_implementation"):
        tower.model.set_attn_implementation("eager")
    enc = tokenizer(["a passage", "another, longer passage of text"], padding=True,
                    return_tensors="pt")
    path = out_dir / "tower.onnx"
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "embedding": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and trace notes
        torch.onnx.export(_Inputs(tower), (enc["input_ids"], enc["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    if getattr(config, "model_type", "") in _BERT_LIKE:
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(str(path), model_type="bert",
                               num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
        path = out_dir / "tower_fused.onnx"
        fused.save_model_to_file(str(path))
    if int8:
        q = out_dir / "tower_int8.onnx"
        logging.disable(logging.WARNING)  # the quantizer's advice to pre-process (an image tip)
        try:  # the fused graph's contrib ops defeat shape inference: name the default type
            quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.disable(logging.NOTSET)
        path = q
    return path


class OnnxTower:
    """An exported tower in an ONNX Runtime session: (input_ids, mask) -> embeddings."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3  # no warnings about unused initializers
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        feed = {"input_ids": input_ids.numpy().astype(np.int64),
                "attention_mask": mask.numpy().astype(np.int64)}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


def onnx_towers(query: torch.nn.Module, passage: torch.nn.Module | None, tokenizer: Any,
                int8: bool) -> tuple[OnnxTower, OnnxTower]:
    """(query, passage) ONNX Runtime towers of a bi-encoder's (the same when shared)."""
    threads = torch.get_num_threads()
    what = "int8" if int8 else "fp32"
    print(f"retriever.runtime: exporting the encoder to ONNX ({what})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ragtrain-onnx-") as tmp:
        q_dir = Path(tmp) / "query"
        q_dir.mkdir()
        q = OnnxTower(export_tower(query, tokenizer, q_dir, int8), threads)
        if passage is None:
            return q, q
        p_dir = Path(tmp) / "passage"
        p_dir.mkdir()
        return q, OnnxTower(export_tower(passage, tokenizer, p_dir, int8), threads)
