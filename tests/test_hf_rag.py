"""The ``hf_rag`` generator on a tiny random RAG (DPR question encoder + BART generator) built
from configs: inputs, the marginal loss, training, saving and reloading. No hub."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ragtrain.config import GeneratorConfig
from ragtrain.data.corpus import Passage
from ragtrain.generation.generator import Example, Generator, GeneratorError
from ragtrain.generation.hf_rag import HFRagBackend
from tests.test_generator import PASSAGES

STADIUM = Passage("p2", "Levi's_Stadium", "Levi's Stadium is a football stadium in Santa Clara.")
EXS = [Example("who won?", PASSAGES, "Denver Broncos", passage_scores=[2.0, -1.0]),
       Example("where was it played?", [STADIUM], "Levi's Stadium")]  # one passage, no scores


def rag_dir(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    """A tiny random RagTokenForGeneration saved as RAG checkpoints are laid out on the hub:
    the model at the top, the generator's tokenizer in ``generator_tokenizer/``."""
    from transformers import AutoTokenizer, BartConfig, DPRConfig, RagConfig
    from transformers import RagTokenForGeneration as Rag

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tok.eos_token, tok.bos_token = "[SEP]", "[CLS]"
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id,
           "eos_token_id": tok.sep_token_id, "decoder_start_token_id": tok.sep_token_id}
    q = DPRConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    g = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                   decoder_ffn_dim=64, max_position_embeddings=128, forced_bos_token_id=None,
                   forced_eos_token_id=None, **ids)
    cfg = RagConfig.from_question_encoder_generator_configs(q, g, n_docs=2, **ids)
    torch.manual_seed(0)
    Rag(cfg).save_pretrained(tmp_path / "rag")
    tok.save_pretrained(tmp_path / "rag/generator_tokenizer")
    return tmp_path / "rag"


def rag_gen(tmp_path: Path, tiny_bert_dir: Path, variant: str = "token") -> Generator:
    return Generator.from_pretrained(GeneratorConfig(
        kind="hf_rag", model_name=str(rag_dir(tmp_path, tiny_bert_dir)), max_source_tokens=64,
        max_answer_tokens=8, rag_variant=variant))  # type: ignore[arg-type]


def test_rag_inputs_are_one_context_per_passage(tmp_path: Path, tiny_bert_dir: Path) -> None:
    g = rag_gen(tmp_path, tiny_bert_dir)
    enc = [g.encode(e) for e in EXS]
    assert len(enc[0]["ctx"]) == 2 and len(enc[1]["ctx"]) == 1
    text = g.tok.decode(enc[0]["ctx"][0], skip_special_tokens=True)
    assert text.startswith("super bowl 50 / the denver broncos") and text.endswith("/ / who won?")
    b = g.collate(enc)
    assert b["context_input_ids"].shape[0] == 4  # 2 examples x 2 passages (the 2nd padded)
    assert b["doc_scores"].tolist()[0] == [2.0, -1.0]
    assert b["doc_scores"][1, 0] == 0.0 and b["doc_scores"][1, 1] < -1e3  # absent passage
    assert b["labels"][0].tolist()[0] == g.tok.sep_token_id  # the decoder start token
    assert all(len(c) <= 64 for e in enc for c in e["ctx"])
    # a passage longer than the budget is cut, the separator and the question kept
    long = g.encode(Example("who won?", [Passage("x", "T", "word " * 200)]))["ctx"][0]
    assert len(long) == 64 and g.tok.decode(long, skip_special_tokens=True).endswith(
        "word / / who won?")


@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_rag_loss_is_the_marginal_likelihood(variant: str, tmp_path: Path,
                                             tiny_bert_dir: Path) -> None:
    """By hand from the generator's per-passage logits: RAG-Sequence mixes whole-answer
    likelihoods, RAG-Token mixes each token's distribution; both weighted by softmax(scores)."""
    g = rag_gen(tmp_path, tiny_bert_dir, variant)
    assert type(g.model).__name__ == f"Rag{variant.title()}ForGeneration"
    b = g.collate([g.encode(EXS[0])])
    y = b["labels"][0, 1:]  # (T,) the answer and eos, after the start token
    with torch.no_grad():
        logits = g.model.rag.generator(input_ids=b["context_input_ids"],
                                       attention_mask=b["context_attention_mask"],
                                       decoder_input_ids=b["labels"].repeat(2, 1)).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1)  # (2 passages, T, V)
        tok_lp = lp.gather(-1, y[None, :, None].repeat(2, 1, 1)).squeeze(-1)  # (2, T)
        prior = torch.log_softmax(torch.tensor([2.0, -1.0]), 0)  # (2,)
        if variant == "sequence":
            nll = -torch.logsumexp(prior + tok_lp.sum(1), 0)
        else:
            nll = -torch.logsumexp(prior[:, None] + tok_lp, 0).sum()
        got = g.loss(b)
    assert math.isclose(float(got), float(nll) / len(y), rel_tol=1e-4)


@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_rag_trains_saves_and_reloads(variant: str, tmp_path: Path, tiny_bert_dir: Path) -> None:
    from ragtrain.trainer import build_optimizer

    g = rag_gen(tmp_path, tiny_bert_dir, variant)
    assert not any(p.requires_grad for p in g.model.rag.question_encoder.parameters())
    b = g.collate([g.encode(e) for e in EXS])
    opt = build_optimizer(g.model, 1e-2, 0.0)
    g.model.train()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = g.loss(b)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    preds = g.answer(EXS, batch_size=2)
    assert [p.answer for p in preds] == ["denver broncos", "levi ' s stadium"]
    assert all(p.score < 0 for p in preds)
    g.save(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "model/model.safetensors").exists() and not list(saved.rglob("*.bin"))
    spec = json.loads((saved / "generator.json").read_text())
    assert spec["kind"] == "hf_rag" and spec["extra"]["rag_variant"] == variant
    again = Generator.load(saved)
    assert isinstance(again, HFRagBackend) and type(again.model) is type(g.model)
    assert again.answer(EXS, batch_size=2) == g.answer(EXS, batch_size=2)


def test_rag_without_passages_reads_the_question_alone(tmp_path: Path,
                                                       tiny_bert_dir: Path) -> None:
    g = rag_gen(tmp_path, tiny_bert_dir)
    preds = g.answer([Example("who won?", []), Example("who?", [Passage("x", "T", "text")])])
    assert len(preds) == 2


def test_rag_refuses_lora_and_too_long_inputs(tmp_path: Path, tiny_bert_dir: Path) -> None:
    d = rag_dir(tmp_path, tiny_bert_dir)
    with pytest.raises(GeneratorError, match="LoRA is for the seq2seq and causal kinds"):
        Generator.from_pretrained(GeneratorConfig(kind="hf_rag", model_name=str(d),
                                                  max_source_tokens=64, lora_r=4))
    with pytest.raises(GeneratorError, match="exceeds the model's 128 positions"):
        Generator.from_pretrained(GeneratorConfig(kind="hf_rag", model_name=str(d),
                                                  max_source_tokens=200))


def pipeline_rows() -> tuple[list[dict], dict[str, list[str]], dict[str, Passage]]:
    """Two questions with their retrieved passages, as the train_generator stage reads them."""
    corpus = {p.passage_id: p for p in [*PASSAGES, STADIUM]}
    rows = [{"id": "q0", "question": "who won?", "answers": ["Denver Broncos"],
             "gold_passage_ids": ["p0"]},
            {"id": "q1", "question": "where was it played?", "answers": ["Levi's Stadium"],
             "gold_passage_ids": ["p2"]}]
    return rows, {"q0": ["p0", "p1"], "q1": ["p2", "p1"]}, corpus


def test_rag_trains_in_the_generator_stage_loop(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """The same train_generator loop as every kind: batches, dev F1, checkpoints, best weights."""
    from ragtrain.generation.training import train_generator

    rows, retrieved, corpus = pipeline_rows()
    cfg = GeneratorConfig(kind="hf_rag", model_name=str(rag_dir(tmp_path, tiny_bert_dir)),
                          max_source_tokens=64, max_answer_tokens=8, batch_size=2, lr=1e-2,
                          warmup_ratio=0.0, max_steps=4, eval_every=2, checkpoint_every=2)
    g = Generator.from_pretrained(cfg)
    (tmp_path / "ckpt").mkdir()
    state = train_generator(g, rows, rows, retrieved, corpus, cfg, top_k=2, seed=0,
                            ckpt_dir=tmp_path / "ckpt", resume=False, signature="s",
                            progress=False)
    assert state.step == 4 and state.best_step is not None
    g.save(tmp_path / "saved")
    exs = [Example(r["question"], [corpus[p] for p in retrieved[r["id"]]]) for r in rows]
    assert Generator.load(tmp_path / "saved").answer(exs) == g.answer(exs)


def test_hf_rag_is_a_backend() -> None:
    from ragtrain.generation.generator import backend

    assert backend("hf_rag") is HFRagBackend


@pytest.mark.parametrize("kind", ["hf_rag", "causal_lora"])
def test_stages_train_evaluate_package_and_serve_it(
        kind: str, tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """train-generator, evaluate, package and ask run the hf_rag kind (and a LoRA causal
    generator) as they run the default one: through the CLI, on the tiny project."""
    from ragtrain import cli
    from tests.conftest import FIXTURES, TINY_RETRIEVER_PARAMS
    from tests.test_lora import causal_dir

    if kind == "hf_rag":
        gen = f"  kind: hf_rag\n  model_name: {rag_dir(tmp_path, tiny_bert_dir)}\n"
    else:
        gen = (f"  kind: causal\n  model_name: {causal_dir(tmp_path, tiny_bert_dir)}\n"
               "  lora_r: 4\n")
    (tmp_path / "params.yaml").write_text(TINY_RETRIEVER_PARAMS.format(
        source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir) + "generator:\n" + gen + (
        "  max_source_tokens: 64\n  max_answer_tokens: 8\n  answer_from: 1\n  batch_size: 2\n"
        "  max_steps: 2\n  eval_every: 0\n  dev_questions: 0\n  checkpoint_every: 1\n"
        "  precision: fp32\n  eval_batch_size: 4\ntracking:\n  enabled: false\n"))
    monkeypatch.chdir(tmp_path)
    for stage in ("fetch", "prepare", "build-bm25", "train-retriever", "build-index",
                  "retrieve", "train-generator", "evaluate", "package"):
        assert cli.main([stage]) == 0, stage
    assert (tmp_path / "artifacts/generator/model/model.safetensors").exists()
    m = json.loads((tmp_path / "metrics/generator.json").read_text())
    assert {"test/em", "test/f1", "test/untrained/f1"} <= set(m)
    capsys.readouterr()
    assert cli.main(["ask", "--bundle", "artifacts/rag", "--json", "What river is Paris on?"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out)
