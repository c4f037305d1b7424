"""Generator pieces on tiny models built from configs: inputs, loss masking, decoding, saving."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ragtrain.config import GeneratorConfig, load_config
from ragtrain.data.corpus import Passage
from ragtrain.errors import ConfigError
from ragtrain.generation import copy_decoding
from ragtrain.generation.copy import CopyBackend
from ragtrain.generation.generator import Example, Generator, GeneratorError
from ragtrain.generation.hf import CausalBackend, Seq2SeqBackend
from ragtrain.generation.inputs import (
    build_copy_source,
    copy_target,
    fair_shares,
    render_prompt,
    word_ends,
)
from tests.conftest import REPO

PASSAGES = [Passage("p0", "Super_Bowl_50", "The Denver Broncos defeated the Carolina Panthers "
                                           "24–10 to win Super Bowl 50 at Levi's Stadium."),
            Passage("p1", "Other", "Something else entirely, with a few more words in it.")]


@pytest.fixture(scope="module")
def tok(tiny_bert_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def copy_gen(tiny_bert_dir: Path, **kw: object) -> Generator:
    torch.manual_seed(0)
    cfg = GeneratorConfig(model_name=str(tiny_bert_dir), max_source_tokens=96,
                          max_answer_tokens=8, **kw)  # type: ignore[arg-type]
    return Generator.from_pretrained(cfg)


def test_fair_shares_water_filling() -> None:
    assert fair_shares([10, 10], 10) == [5, 5]
    assert fair_shares([2, 50, 50], 30) == [2, 14, 14]  # a short passage leaves its share
    assert fair_shares([3, 4], 100) == [3, 4]
    assert fair_shares([5, 5, 5], 4) == [1, 1, 2]
    assert sum(fair_shares([7, 9, 100, 3], 40)) == 40
    assert fair_shares([], 10) == []


def test_copy_source_truncation_shares_the_budget(tok) -> None:  # type: ignore[no-untyped-def]
    long_p = [Passage("a", "A", "alpha " * 200), Passage("b", "B", "beta " * 200)]
    src = build_copy_source(tok, "what is alpha?", long_p, max_source=64, max_question=48)
    assert len(src.ids) == 64
    kept = [sum(1 for p, _, _ in src.spans if p == i) for i in (0, 1)]
    assert abs(kept[0] - kept[1]) <= 1 and sum(kept) == 64 - 2 - 4 - 2  # cls/sep, q, 2 seps
    assert src.ids[0] == tok.cls_token_id and src.ids[-1] == tok.sep_token_id
    assert [c for c in src.copyable].count(True) == sum(kept)
    cut = build_copy_source(tok, "word " * 100, long_p, max_source=96, max_question=10)
    assert cut.question_cut and cut.ids[1:11] == tok("word " * 10, add_special_tokens=False)[
        "input_ids"]
    with pytest.raises(GeneratorError, match="max_source_tokens"):
        build_copy_source(tok, "q " * 40, long_p, max_source=20, max_question=40)


def test_copy_target_is_the_passage_tokens(tok) -> None:  # type: ignore[no-untyped-def]
    src = build_copy_source(tok, "who won?", PASSAGES, 96, 48)
    t = copy_target(src, "Denver Broncos", tok)
    assert tok.convert_ids_to_tokens(t) == ["denver", "broncos"]
    pos = [i for i in range(len(src.ids) - 1) if src.ids[i: i + 2] == t]
    assert pos and all(src.copyable[p] for p in pos)
    # an answer that is not in the (kept) passages: tokenized alone
    assert tok.convert_ids_to_tokens(copy_target(src, "Lions", tok)) == ["lions"]


def test_prompt_template_and_truncation(tok) -> None:  # type: ignore[no-untyped-def]
    prompt, cut = render_prompt("question: {question}\ncontext: {context}\nanswer:", "who won?",
                                [Passage("a", "A_b", "one two three " * 50),
                                 Passage("c", "C", "short text")], tok,
                                max_source=64, max_question=48)
    assert prompt.startswith("question: who won?\ncontext: A b: one two")
    assert "C: short text" in prompt and prompt.endswith("\nanswer:") and not cut
    assert len(tok(prompt)["input_ids"]) <= 64


def test_copy_model_padding_and_kv_cache_match_training_forward(tiny_bert_dir: Path) -> None:
    g = copy_gen(tiny_bert_dir)
    g.model.eval()
    exs = [Example("who won?", PASSAGES, "Denver Broncos"),
           Example("who lost the game?", PASSAGES[:1], "Carolina Panthers")]
    enc = [g.encode(e) for e in exs]
    with torch.no_grad():
        both = g.model.token_log_probs(g.collate(enc))
        alone = g.model.token_log_probs(g.collate(enc[1:]))
        n = alone.shape[1]
        assert torch.allclose(both[1, :n], alone[0], atol=1e-5)  # padding changes nothing
        b = g.collate(enc)
        hs, h, cache = g.model.start(b["src"], b["src_mask"], g.tok.cls_token_id)
        cached = []
        for t in range(b["tgt_out"].shape[1]):
            lp = g.model.next_from_states(hs, h, b["src"], b["copyable"])
            cached.append(lp.gather(1, b["tgt_out"][:, t: t + 1]).squeeze(1))
            h, cache = g.model.step(b["tgt_out"][:, t], cache, b["src_mask"], t + 1)
    m = b["tgt_mask"].bool()
    assert torch.allclose(torch.stack(cached, 1)[m], both[m], atol=1e-4)


def test_copy_loss_is_the_mixture_likelihood_of_answer_tokens(tiny_bert_dir: Path) -> None:
    g = copy_gen(tiny_bert_dir)
    b = g.collate([g.encode(Example("who won?", PASSAGES, "Denver Broncos"))])
    lp = g.model.token_log_probs(b)
    assert lp.shape == (1, 3)  # denver, broncos, [SEP]
    assert math.isclose(float(g.loss(b)), float(-lp.mean()), rel_tol=1e-6)
    # p is a probability: the vocabulary part plus the copy part never exceeds 1
    assert bool((lp <= 1e-6).all())


def test_each_decoder_gives_the_empty_answers_log_probability(tiny_bert_dir: Path) -> None:
    g = copy_gen(tiny_bert_dir)
    g.model.eval()
    exs = [Example("who won?", PASSAGES, ""), Example("where?", PASSAGES[:1], "")]
    with torch.no_grad():
        # the likelihood of the empty answer: the end token first, as a target "" trains it
        want = g.model.token_log_probs(g.collate([g.encode(x) for x in exs]))[:, 0].tolist()
        chunk = [g.encode(x, with_target=False) for x in exs]
        for preds in (copy_decoding.beam(g, chunk, 2), copy_decoding.greedy(g, chunk, "greedy"),
                      copy_decoding.greedy(g, chunk, "constrained")):
            assert [p.null for p in preds] == pytest.approx(want, abs=1e-4)
            assert all(p.answer for p in preds if p.passage >= 0)


def overfit(g: Generator, exs: list[Example], *, steps: int, lr: float) -> None:
    """Train ``g`` for ``steps`` AdamW steps on ``exs`` as one batch."""
    b = g.collate([g.encode(e) for e in exs])
    opt = torch.optim.AdamW(g.model.parameters(), lr=lr)
    g.model.train()
    for _ in range(steps):
        opt.zero_grad()
        g.loss(b).backward()
        opt.step()


def test_copy_model_learns_to_copy_and_constrained_decoding_snaps(tiny_bert_dir: Path) -> None:
    g = copy_gen(tiny_bert_dir)
    exs = [Example("who won?", PASSAGES, "Denver Broncos"),
           Example("where was it?", PASSAGES, "Levi's Stadium")]
    overfit(g, exs, steps=60, lr=3e-3)
    preds = g.answer(exs, decoding="constrained")
    # the passage's own text ("Levi's", capitalised), not WordPiece decoding ("levi ' s")
    assert [p.answer for p in preds] == ["Denver Broncos", "Levi's Stadium"]
    assert all(p.passage == 0 for p in preds)
    greedy = g.answer(exs, decoding="greedy")
    assert [p.answer for p in greedy] == ["Denver Broncos", "Levi's Stadium"]


def test_constrained_decoding_only_emits_passage_spans(tiny_bert_dir: Path) -> None:
    g = copy_gen(tiny_bert_dir)  # untrained: anything it says must still be a passage span
    preds = g.answer([Example("who won?", PASSAGES), Example("what?", PASSAGES[1:])])
    texts = [p.text for p in PASSAGES]
    for p in preds:
        assert p.answer and any(p.answer in t for t in texts)


def test_word_ends_never_split_a_word(tok) -> None:  # type: ignore[no-untyped-def]
    text = "Homeschooling rose in the 1990s at Levi's Stadium."
    src = build_copy_source(tok, "when?", [Passage("p", "", text)], 64, 16)
    ends = word_ends(src)
    assert len(ends) == len(src.ids)
    for i, (p, _, t) in enumerate(src.spans):
        if p < 0:
            assert ends[i]  # [CLS], the question's [SEP], the passage's closing [SEP]
            continue
        q, s2, _ = src.spans[i + 1]
        joined = q == p and s2 == t and text[t - 1].isalnum() and text[t].isalnum()
        assert ends[i] == (not joined), (i, text[:t])
    last = max(i for i, (p, _, _) in enumerate(src.spans) if p == 0)
    assert ends[last]  # the passage's last token
    levi = [i for i, (p, s, t) in enumerate(src.spans) if p == 0 and text[s:t].lower() == "levi"]
    assert levi and ends[levi[0]]  # before the apostrophe: a span may end there


def test_beam_search_with_one_beam_is_the_greedy_decoder(tiny_bert_dir: Path) -> None:
    g = copy_gen(tiny_bert_dir, num_beams=1)
    assert isinstance(g, CopyBackend)
    exs = [Example("who won?", PASSAGES), Example("what?", PASSAGES[1:]),
           Example("where?", PASSAGES[::-1])]
    greedy = g.answer(exs)
    chunk = [g.encode(e, with_target=False) for e in exs]
    with torch.no_grad():
        beam = copy_decoding.beam(g, chunk, 1)
    assert [p.answer for p in beam] == [p.answer for p in greedy]
    assert [p.passage for p in beam] == [p.passage for p in greedy]
    for a, b in zip(beam, greedy, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-4)


def test_beam_search_answers_are_whole_word_passage_spans(tiny_bert_dir: Path) -> None:
    g = copy_gen(tiny_bert_dir, num_beams=3)  # untrained: any answer must still be a span
    assert g.spec.num_beams == 3
    exs = [Example("who won?", PASSAGES), Example("what?", PASSAGES[1:])]
    preds = g.answer(exs)
    for p, ex in zip(preds, exs, strict=True):
        text = ex.passages[p.passage].text
        at = text.find(p.answer)
        assert p.answer and at >= 0 and math.isfinite(p.score)
        end = at + len(p.answer)
        assert end == len(text) or not (text[end - 1].isalnum() and text[end].isalnum())
    with pytest.raises(ConfigError, match="generator.num_beams"):
        load_config(REPO / "params.yaml", {"generator.num_beams": 0})


def causal_dir(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                               n_positions=256, eos_token_id=tok.eos_token_id,
                               bos_token_id=tok.cls_token_id)).save_pretrained(tmp_path / "c")
    tok.save_pretrained(tmp_path / "c")
    return tmp_path / "c"


def seq2seq_dir(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "s")
    tok.save_pretrained(tmp_path / "s")
    return tmp_path / "s"


def test_causal_loss_is_masked_to_the_answer(tmp_path: Path, tiny_bert_dir: Path) -> None:
    g = Generator.from_pretrained(GeneratorConfig(kind="causal", model_name=str(
        causal_dir(tmp_path, tiny_bert_dir)), max_source_tokens=64, max_answer_tokens=8))
    exs = [Example("who won?", PASSAGES, "Denver Broncos"),
           Example("where?", PASSAGES[:1], "Levi's Stadium")]
    enc = [g.encode(e) for e in exs]
    b = g.collate(enc)
    for i, e in enumerate(enc):
        labelled = b["labels"][i][b["labels"][i] != -100].tolist()
        assert labelled == [*e["tgt"], g.tok.eos_token_id]  # the answer and eos, nothing else
    # the loss equals the hand-computed cross-entropy over exactly those tokens
    logits = g.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     position_ids=b["position_ids"]).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    y = b["labels"][:, 1:]
    m = y != -100
    manual = -lp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)[m].mean()
    assert math.isclose(float(g.loss(b)), float(manual), rel_tol=1e-4)


def trained_causal(tmp_path: Path, tiny_bert_dir: Path, exs: list[Example]) -> Generator:
    """A tiny causal generator after 40 steps on ``exs`` (one batch)."""
    torch.manual_seed(0)
    g = Generator.from_pretrained(GeneratorConfig(kind="causal", model_name=str(
        causal_dir(tmp_path, tiny_bert_dir)), max_source_tokens=64, max_answer_tokens=8))
    overfit(g, exs, steps=40, lr=1e-2)
    return g


def test_causal_model_trained_on_an_example_answers_it(tmp_path: Path,
                                                       tiny_bert_dir: Path) -> None:
    """End to end for the causal kind: prompt, answer-only labels, generate, the prompt cut
    from the output, decoding (the tokenizer is uncased: the lower-cased reference)."""
    ex = Example("who won?", PASSAGES, "Denver Broncos")
    g = trained_causal(tmp_path, tiny_bert_dir, [ex])
    assert [p.answer for p in g.answer([ex])] == ["denver broncos"]


def test_causal_model_answers_the_left_padded_rows_it_was_trained_on(
        tmp_path: Path, tiny_bert_dir: Path) -> None:
    exs = [Example("who won?", PASSAGES, "Denver Broncos"),
           Example("where?", PASSAGES[:1], "Levi's Stadium")]  # shorter: left-padded
    g = trained_causal(tmp_path, tiny_bert_dir, exs)
    assert [p.answer for p in g.answer(exs, batch_size=2)] == ["denver broncos",
                                                              "levi ' s stadium"]


def test_seq2seq_loss_is_masked_to_the_answer(tmp_path: Path, tiny_bert_dir: Path) -> None:
    g = Generator.from_pretrained(GeneratorConfig(kind="seq2seq", model_name=str(
        seq2seq_dir(tmp_path, tiny_bert_dir)), max_source_tokens=64, max_answer_tokens=8))
    exs = [Example("who won?", PASSAGES, "Denver Broncos"),
           Example("where?", PASSAGES[:1], "Levi's Stadium in Santa Clara")]
    enc = [g.encode(e) for e in exs]
    b = g.collate(enc)
    assert b["labels"][0].tolist() == [*enc[0]["tgt"], g.tok.eos_token_id] + [-100] * (
        len(enc[1]["tgt"]) - len(enc[0]["tgt"]))  # padding is ignored by the loss
    out = g.model(**{k: v for k, v in b.items() if k != "labels"}, labels=b["labels"])
    logits = out.logits.float()
    m = b["labels"] != -100
    manual = torch.nn.functional.cross_entropy(logits[m], b["labels"][m])
    assert math.isclose(float(g.loss(b)), float(manual), rel_tol=1e-4)
    g.save(tmp_path / "saved")
    again = Generator.load(tmp_path / "saved")
    assert again.answer(exs) == g.answer(exs)  # answers and their scores
    assert isinstance(g, Seq2SeqBackend) and isinstance(again, Seq2SeqBackend)


def test_save_load_round_trip_and_tokenizer_mismatch(tmp_path: Path,
                                                      tiny_bert_dir: Path) -> None:
    g = copy_gen(tiny_bert_dir)
    exs = [Example("who won?", PASSAGES)]
    g.save(tmp_path / "gen")
    assert (tmp_path / "gen/model.safetensors").exists()
    assert not list((tmp_path / "gen").rglob("*.bin")) and not list((tmp_path / "gen").rglob(
        "*.pkl"))
    again = Generator.load(tmp_path / "gen")
    assert isinstance(again, CopyBackend)
    assert torch.equal(again.model.lm_bias, g.model.lm_bias)
    assert again.answer(exs)[0] == g.answer(exs)[0]
    # a tokenizer with another vocabulary does not fit this checkpoint
    import json

    f = tmp_path / "gen/tokenizer/tokenizer.json"
    t = json.loads(f.read_text())
    vocab = t["model"]["vocab"]
    a, b = sorted(vocab)[2000:2002]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    f.write_text(json.dumps(t))
    with pytest.raises(GeneratorError, match="does not match its tokenizer"):
        Generator.load(tmp_path / "gen")


def test_positions_beyond_the_model_are_refused(tiny_bert_dir: Path) -> None:
    with pytest.raises(GeneratorError, match="exceeds the model's 128 positions"):
        Generator.from_pretrained(GeneratorConfig(model_name=str(tiny_bert_dir),
                                                  max_source_tokens=120, max_answer_tokens=16))


def test_each_kind_has_its_backend() -> None:
    from ragtrain.generation.generator import backend

    assert backend("copy") is CopyBackend
    assert backend("seq2seq") is Seq2SeqBackend
    assert backend("causal") is CausalBackend
    with pytest.raises(GeneratorError, match="generator kind 'rag'"):
        backend("rag")


def test_a_training_input_without_gold_or_answer_is_taught_the_empty_answer() -> None:
    import random

    from ragtrain.generation.training import make_examples

    corpus = {pid: Passage(pid, "t", text) for pid, text in [
        ("gold", "Denver won Super Bowl 50."), ("other", "Denver Broncos history."),
        ("miss", "Carolina lost in 2016.")]}
    rows = [{"id": q, "question": "Who won?", "answers": ["Denver"],
             "gold_passage_ids": gold} for q, gold in
            [("q_gold", ["gold"]), ("q_other", ["gold"]), ("q_miss", ["gold"]),
             ("q_nogold", [])]]
    retrieved = {"q_gold": ["gold"], "q_other": ["other"], "q_miss": ["miss"],
                 "q_nogold": ["miss"]}
    empty = make_examples(rows, retrieved, corpus, 1, missed_target="empty")
    # only the input with neither the gold passage nor the answer's text ('denver' matches
    # 'Denver' case-insensitively); no gold label known: the answer stays
    assert [ex.answer for ex in empty] == ["Denver", "Denver", "", "Denver"]
    assert all(ex.answer == "Denver" for ex in make_examples(rows, retrieved, corpus, 1))
    # the gold passage forced in (gold_share 1) is not a miss
    forced = make_examples(rows, retrieved, corpus, 1, gold_share=1.0, rng=random.Random(0),
                           missed_target="empty")
    assert forced[2].passages[0].passage_id == "gold" and forced[2].answer == "Denver"


def test_length_grouped_batches_cover_every_example_once() -> None:
    import random

    from ragtrain.generation.training import length_grouped

    enc = [{"ids": [0] * n, "k": i} for i, n in enumerate(random.Random(1).choices(
        range(5, 300), k=103))]
    def length(e: dict) -> int:
        return len(e["ids"])

    out = length_grouped(enc, 8, random.Random(0), length=length, pool=4)
    assert sorted(e["k"] for e in out) == list(range(103))
    full = [out[i:i + 8] for i in range(0, 96, 8)]
    # within a batch the lengths are close: sorted pools of 32 examples cut into 4 batches
    spread = sum(max(len(e["ids"]) for e in b) - min(len(e["ids"]) for e in b) for b in full)
    assert spread < 0.5 * sum(max(len(e["ids"]) for e in enc[i:i + 8]) - min(
        len(e["ids"]) for e in enc[i:i + 8]) for i in range(0, 96, 8))
    assert out == length_grouped(enc, 8, random.Random(0), length=length, pool=4)  # same order


def test_decoding_steps_attend_eagerly_on_the_cpu_and_answer_the_same(
        tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source pass runs SDPA, each one-token decoding step the eager attention (faster on
    the CPU), SDPA again afterwards; the answers are those of SDPA throughout."""
    import contextlib

    import ragtrain.generation.copy as copy_module

    g = copy_gen(tiny_bert_dir, num_beams=2)
    backbone = g.model.backbone
    seen: list[tuple[str, int]] = []
    forward = backbone.forward

    def spy(*args: object, **kw: object) -> object:
        seen.append((backbone.config._attn_implementation, kw["input_ids"].shape[1]))
        return forward(*args, **kw)

    monkeypatch.setattr(backbone, "forward", spy)
    exs = [Example("who won?", PASSAGES), Example("what?", PASSAGES[1:])]
    preds = g.answer(exs)
    assert seen[0][0] == "sdpa" and seen[0][1] > 1
    assert len(seen) > 1 and all(s == ("eager", 1) for s in seen[1:])
    assert backbone.config._attn_implementation == "sdpa"
    monkeypatch.setattr(copy_module, "one_token_attention", lambda m: contextlib.nullcontext())
    seen.clear()
    again = g.answer(exs)
    assert all(s[0] == "sdpa" for s in seen)
    assert [p.answer for p in again] == [p.answer for p in preds]
    for a, b in zip(again, preds, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_span_scores_are_the_whole_distribution_at_the_source_tokens(tiny_bert_dir: Path
                                                                     ) -> None:
    g = copy_gen(tiny_bert_dir)
    assert isinstance(g, CopyBackend)
    g.model.eval()
    twice = Passage("r", "", "The Broncos beat the Panthers, and the Broncos won the game.")
    chunk = [g.encode(Example(q, ps), with_target=False)
             for q, ps in (("who won?", [twice]), ("what?", PASSAGES))]
    eos = g.tok.sep_token_id
    with torch.no_grad():
        _, b, _, (hs, h, cache) = g.start_decoding(chunk)
        src, copyable = b["src"], b["copyable"]
        spans = copy_decoding.SpanScores(g.model, hs, src, copyable, eos)
        for t in range(3):
            full = g.model.next_from_states(hs, h, src, copyable)
            lp, lp_end = spans(h)
            # the mixture (vocabulary + copy over every position holding the token) at each
            # position, and the end token's, with no (rows x vocabulary) distribution
            assert torch.allclose(lp, full.gather(1, src), atol=1e-5)
            assert torch.allclose(lp_end, full[:, eos], atol=1e-5)
            cand = spans.candidates(lp, lp_end, copyable, torch.tensor([True, False]))
            tokens = spans.tokens
            for i in range(len(chunk)):
                kept = tokens[i][cand[i].isfinite()].tolist()
                allowed = set(src[i][copyable[i]].tolist()) | ({eos} if i == 0 else set())
                assert sorted(kept) == sorted(allowed)  # each allowed token once
                for j in cand[i].isfinite().nonzero().flatten().tolist():
                    assert cand[i, j] == full[i, tokens[i, j]] or math.isclose(
                        float(cand[i, j]), float(full[i, tokens[i, j]]), abs_tol=1e-5)
            h, cache = g.model.step(src[:, 5 + t], cache, b["src_mask"], t + 1)
