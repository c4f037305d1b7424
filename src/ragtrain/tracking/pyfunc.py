"""The RAG model as an MLflow pyfunc: part of the tracking layer (it imports mlflow).

``save_rag_pyfunc`` writes an MLflow model folder around a RAG bundle (the self-contained folder
``bundle.export_bundle`` writes; weights in safetensors). The model is saved "from code": the model
folder holds a three-line Python file that builds ``RAGPyfunc``, so nothing is pickled. Loading
(``mlflow.pyfunc.load_model("models:/<name>@champion")`` or ``mlflow models serve``) runs
``RAGPyfunc.load_context``, which calls ``RAGModel.load`` on the bundle copied into the model's
artifacts. The environment that loads it must have ragtrain installed (``pip install -e .``;
``mlflow models serve --env-manager local`` uses the current one).

Input: a DataFrame with a ``question`` column, a list of questions, or ``{"question": [...]}``;
optional param ``top_k``. Output: one dict per question, ``{"question", "answer", "passages":
[{"id", "title", "text", "score"}, ...], "answer_score", "answer_passage"}`` (the cited
passages with their retrieval scores, best first; the id of the one the answer comes from).
A malformed request (no question, a null or a number, a blank or too long question, top_k out
of range: the limits in ``generation.questions``) raises an MlflowException with
INVALID_PARAMETER_VALUE, which ``mlflow models serve`` answers with HTTP 400 and its message.
A retriever bundle (kind "retriever": data without answers) answers ``{"question", "passages"}``:
the ranked passages and their scores, no answer (its signature says so).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

with warnings.catch_warnings():  # mlflow's own PythonModel subclasses warn about type hints
    warnings.filterwarnings("ignore", message=".*type hints", category=UserWarning)
    import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ragtrain.errors import RequestError
from ragtrain.generation.questions import check_top_k, questions_in

# what loads the bundle: a class with load() and answer()
RAG_CLASS = "ragtrain.generation.rag:RAGModel"
BUNDLE_ARTIFACT = "bundle"
# model_config key of models whose top_k param defaults to null (so 0 is refused); models saved
# before it default to 0, which there means "the bundle's own top_k"
CHECKED_TOP_K = "top_k_checked"
_CODE = (
    "from mlflow.models import set_model\n"
    "from ragtrain.tracking.pyfunc import RAGPyfunc\n"
    "set_model(RAGPyfunc())\n"
)
# Recorded in the model's requirements.txt (for a serving environment built elsewhere; ragtrain
# itself is installed from the repo).
_REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "faiss-cpu", "bm25s", "numpy",
                 "pandas")


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def questions_of(model_input: Any) -> list[str]:
    """The questions in a pyfunc input: a DataFrame/dict with a ``question`` column, or a list;
    raises ``RequestError`` (a ValueError) naming what is wrong (``generation.questions``)."""
    return questions_in(model_input)


def _plain(answer: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready copy of one answer (numpy scalars -> float/str); a retriever model's result
    (no "answer" key) keeps only the question and its ranked passages."""
    passages = [{"id": str(p["id"]), "title": str(p.get("title", "")),
                 "text": str(p["text"]), "score": float(p["score"])}
                for p in answer.get("passages", [])]
    if "answer" not in answer:
        return {"question": str(answer["question"]), "passages": passages}
    return {
        "question": str(answer["question"]),
        "answer": str(answer["answer"]),
        "answer_score": float(answer.get("answer_score", float("nan"))),
        "answer_passage": (None if answer.get("answer_passage") is None
                           else str(answer["answer_passage"])),  # the passage it comes from
        "passages": passages,
        # a bundle with abstention: whether the answer is "" because its score was too low
        **({"abstained": bool(answer["abstained"]), "relevance": float(answer["relevance"])}
           if "abstained" in answer else {}),
    }


def guard_scoring_server() -> None:
    """Two requests that MLflow's scoring server (3.x) fails with HTTP 500 and no message, before
    the model sees them: JSON nested deeper than Python's recursion limit (RecursionError in its
    ``json.loads``) and a request without a Content-Type header (``None.split``). Called where
    the served model loads (the server's own process), it wraps the two module functions once,
    so that they answer 400 and 415 with a message; a no-op where MLflow no longer has them."""
    from mlflow.pyfunc import scoring_server as server

    names = ("_decode_json_input", "invocations", "MlflowInvalidInputException",
             "InvocationsResponse")
    if not all(hasattr(server, n) for n in names) or getattr(server.invocations, "guarded", 0):
        return
    decode, invocations = server._decode_json_input, server.invocations
    bad_input, response = server.MlflowInvalidInputException, server.InvocationsResponse

    def decode_json(json_input: Any) -> Any:
        try:
            return decode(json_input)
        except RecursionError:
            raise bad_input(
                "input: the JSON is nested too deeply to decode; send a flat list of "
                "question strings") from None

    def invocations_typed(data: Any, content_type: str | None, *args: Any) -> Any:
        if content_type is None:
            return response(
                response="no Content-Type header: send Content-Type: application/json",
                status=415, mimetype="text/plain")
        return invocations(data, content_type, *args)

    invocations_typed.guarded = True  # type: ignore[attr-defined]
    server._decode_json_input = decode_json
    server.invocations = invocations_typed


# MLflow warns, when the class is defined, that predict has no type hints: on purpose (the
# explicit signature rules), so that warning is silenced here.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*type hints", category=UserWarning)

    class RAGPyfunc(mlflow.pyfunc.PythonModel):
        """Questions in, answers with their cited passages and scores out."""

        def load_context(self, context: Any) -> None:
            config = context.model_config or {}
            cls = _import(config.get("rag_class", RAG_CLASS))
            self.model = cls.load(Path(context.artifacts[BUNDLE_ARTIFACT]))
            self.zero_top_k_is_default = not config.get(CHECKED_TOP_K, False)
            # MLflow's scoring server calls predict from several threads at once
            # (asyncio.to_thread), but the model is not thread-safe: the copy generator flips
            # its backbone's config.is_decoder while decoding, so a concurrent request failed
            # with a shape mismatch (bench/serve_load.py: 16 of 208 requests, 4 clients). One
            # answer at a time; parallelism comes from `mlflow models serve -w N` processes.
            self.lock = threading.Lock()
            guard_scoring_server()

        # No type hints: MLflow would read them as a signature (the explicit one rules).
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            """Answers; a bad request raises MlflowException(INVALID_PARAMETER_VALUE), which
            the scoring server sends as HTTP 400 with this message."""
            try:
                top_k = (params or {}).get("top_k")
                if top_k == 0 and getattr(self, "zero_top_k_is_default", True):
                    top_k = None  # an older model: 0 (its default) = the bundle's top_k
                questions = questions_of(model_input)
                top_k = check_top_k(top_k)
            except RequestError as e:
                raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
            with self.lock:
                answers = self.model.answer(questions, top_k=top_k)
            return [_plain(a) for a in answers]


def signature(kind: str = "rag") -> Any:
    """Input: a column ``question`` (typed Any so that MLflow passes nulls and numbers through
    unconverted, to be refused by ``questions_of``: typed string, it would answer a null as the
    question "None"); output: answer and cited passages (a retriever model: the ranked passages
    alone); param top_k (null: the bundle's own)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import (
        AnyType,
        Array,
        ColSpec,
        Object,
        ParamSchema,
        ParamSpec,
        Property,
        Schema,
    )

    passage = Object([Property("id", "string"), Property("title", "string"),
                      Property("text", "string"), Property("score", "double")])
    outputs = [ColSpec("string", "question"), ColSpec("string", "answer"),
               ColSpec("double", "answer_score"),
               ColSpec("string", "answer_passage", required=False),
               ColSpec(Array(passage), "passages"),
               ColSpec("boolean", "abstained", required=False),
               ColSpec("double", "relevance", required=False)]
    if kind == "retriever":
        outputs = [outputs[0], outputs[4]]
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "question")]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("top_k", "long", None)]),
    )


def requirements(onnx: bool = False) -> list[str]:
    """Pinned versions of what the model needs, as installed here (with ``onnx``: ONNX Runtime
    too, for a retriever or reranker that runs on it)."""
    out = []
    for dist in (*_REQUIREMENTS, *(("onnx", "onnxruntime") if onnx else ())):
        try:
            out.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bar for copying the bundle, no hint to add type hints to predict."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def save_rag_pyfunc(bundle: Path, out: Path, example_questions: Sequence[str], *,
                    rag_class: str = RAG_CLASS) -> Path:
    """Write the MLflow pyfunc model folder ``out`` around ``bundle`` (copied into it).

    Nothing is run: the signature is explicit and the requirements are pinned, so saving takes
    well under a second and does not load the model.
    """
    import json

    import pandas as pd

    manifest = Path(bundle) / "rag.json"
    meta = json.loads(manifest.read_text()) if manifest.is_file() else {}
    kind = meta.get("kind", "rag")
    onnx = any((meta.get(part) or {}).get("runtime", "torch") != "torch"
               for part in ("retriever", "reranker"))  # retriever.runtime / reranker.runtime
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        code = Path(tmp) / "rag_model.py"
        code.write_text(_CODE)
        mlflow.pyfunc.save_model(
            path=str(out), python_model=str(code),
            artifacts={BUNDLE_ARTIFACT: str(Path(bundle).resolve())},
            signature=signature(kind),
            input_example=pd.DataFrame({"question": list(example_questions)[:2]}),
            pip_requirements=requirements(onnx),
            model_config={"rag_class": rag_class, CHECKED_TOP_K: True},
        )
    return Path(out)
