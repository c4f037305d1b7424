"""LoRA (peft) for the causal and seq2seq generators, on tiny models built from configs: only the
adapters train, the loss falls, the saved model is merged (loads without peft) and answers as
the trained one did."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ragtrain.config import GeneratorConfig
from ragtrain.generation.generator import Example, Generator, GeneratorError
from tests.test_generator import PASSAGES, seq2seq_dir

pytest.importorskip("peft")

EXS = [Example("who won?", PASSAGES, "Denver Broncos"),
       Example("where?", PASSAGES[:1], "Levi's Stadium")]


def causal_dir(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    """A tiny random GPT-2. Its LM head is the (frozen) input embedding: with the default init
    (0.02) the logits cannot move far whatever the adapters do, hence the wider init."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                               n_positions=256, eos_token_id=tok.eos_token_id,
                               bos_token_id=tok.cls_token_id, initializer_range=0.2)
                    ).save_pretrained(tmp_path / "c")
    tok.save_pretrained(tmp_path / "c")
    return tmp_path / "c"


def lora_gen(model_dir: Path, kind: str, **kw: object) -> Generator:
    torch.manual_seed(0)
    return Generator.from_pretrained(GeneratorConfig(
        kind=kind, model_name=str(model_dir), max_source_tokens=64,  # type: ignore[arg-type]
        max_answer_tokens=8, lora_r=8, lora_alpha=16.0, lora_dropout=0.0, **kw))  # type: ignore[arg-type]


def train_steps(g: Generator, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps on ``EXS`` as one batch (the adapters only); the losses seen."""
    from ragtrain.trainer import build_optimizer

    b = g.collate([g.encode(e) for e in EXS])
    opt = build_optimizer(g.model, lr, 0.0)
    g.model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = g.loss(b)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_lora_trains_only_the_adapters_saves_merged_and_reloads(
        kind: str, tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = (causal_dir if kind == "causal" else seq2seq_dir)(tmp_path, tiny_bert_dir)
    g = lora_gen(model_dir, kind)
    trainable = {n for n, p in g.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the base is frozen
    base_before = {n: p.detach().clone() for n, p in g.model.named_parameters()
                   if not p.requires_grad}
    losses = train_steps(g, 30, 1e-2)
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(p, base_before[n]) for n, p in g.model.named_parameters()
               if not p.requires_grad)  # base weights untouched
    preds = g.answer(EXS, batch_size=2)

    # merged == unmerged: the same logits within float rounding
    from ragtrain.generation.lora import merged

    b = g.collate([g.encode(e) for e in EXS])
    g.model.eval()
    with torch.no_grad():
        ref = g.model(**b).logits
        got = merged(g.model)(**b).logits
    assert torch.allclose(ref, got, atol=1e-4)

    g.save(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "model/model.safetensors").exists()
    assert (saved / "adapter/adapter_model.safetensors").exists()
    assert not list(saved.rglob("*.bin"))
    spec = json.loads((saved / "generator.json").read_text())
    assert spec["extra"]["lora"]["r"] == 8 and spec["extra"]["lora"]["merged"]
    monkeypatch.setitem(sys.modules, "peft", None)  # loading must not need peft
    again = Generator.load(saved)
    monkeypatch.undo()
    assert not any("lora_" in n for n, _ in again.model.named_parameters())  # plain model
    back = again.answer(EXS, batch_size=2)
    assert [p.answer for p in back] == [p.answer for p in preds]
    for a, b2 in zip(back, preds, strict=True):
        assert abs(a.score - b2.score) < 1e-4


def test_lora_adapter_loads_on_the_base_with_peft(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """The saved adapter alone, put back on the base model, gives the merged model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = causal_dir(tmp_path, tiny_bert_dir)
    g = lora_gen(model_dir, "causal", lora_target_modules=["c_attn", "c_proj"])
    train_steps(g, 3, 1e-2)
    g.save(tmp_path / "saved")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "saved/adapter").eval()
    again = Generator.load(tmp_path / "saved")
    b = g.collate([g.encode(e) for e in EXS], for_training=False)
    with torch.no_grad():
        assert torch.allclose(peft_model(**b).logits, again.model(**b).logits, atol=1e-4)


def test_lora_off_by_default_and_refused_for_the_copy_kind(tiny_bert_dir: Path) -> None:
    assert GeneratorConfig().lora_r == 0
    with pytest.raises(GeneratorError, match="LoRA is for the seq2seq and causal kinds"):
        Generator.from_pretrained(GeneratorConfig(model_name=str(tiny_bert_dir),
                                                  max_source_tokens=96, lora_r=4))


def test_lora_in_the_generator_stage_loop_checkpoints_and_resumes(
        tmp_path: Path, tiny_bert_dir: Path) -> None:
    """train_generator with LoRA: the checkpoint (a peft model's weights) resumes onto a fresh
    LoRA generator, which then holds the trained weights."""
    from ragtrain.generation.training import train_generator
    from tests.test_hf_rag import pipeline_rows

    rows, retrieved, corpus = pipeline_rows()
    cfg = GeneratorConfig(kind="causal", model_name=str(causal_dir(tmp_path, tiny_bert_dir)),
                          max_source_tokens=64, max_answer_tokens=8, batch_size=2, lr=1e-2,
                          max_steps=4, eval_every=0, checkpoint_every=2, lora_r=4)

    (tmp_path / "ckpt").mkdir()

    def run(init_seed: int) -> Generator:
        torch.manual_seed(init_seed)  # the adapters' random init
        g = Generator.from_pretrained(cfg)
        train_generator(g, rows, rows, retrieved, corpus, cfg, top_k=2, seed=0,
                        ckpt_dir=tmp_path / "ckpt", resume=True, signature="s", progress=False)
        return g

    first = run(0)
    again = run(1)  # other adapters at first; it finds the finished checkpoint and resumes it
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_B" in k and bool(a[k].abs().sum() > 0) for k in a)  # the adapters trained
