"""The run report: a self-contained page, escaped, with deltas against the champion and a
failure breakdown that a hand count confirms; the `report` stage on a tiny project; the page
rendered by headless Chromium."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from ragtrain import cli
from ragtrain.report import Champion, ReportData, join_questions, render_report
from ragtrain.report import analysis as an
from tests.conftest import REPO

HOSTILE = "<script>alert(1)</script>"


def gen_row(i: str, question: str, ref: str, em: int, rank: int | None,
            cited: str | None = "P1") -> dict:
    return {"id": i, "question": question, "references": [ref], "prediction": "x",
            "em": em, "f1": float(em), "gold_passage_rank": rank, "answer_passage": cited}


# question, first reference, EM, rank of the gold passage in what the generator read (top 1)
TINY = [
    ("a", "What is the capital of France?", "Paris", 1, 1),          # what, 1 word: correct
    ("b", "In what year did it open?", "1889", 0, 1),                # what, 1: reading miss
    ("c", "Who built the tower?", "Gustave Eiffel", 0, None),        # who, 2: retrieval miss
    ("d", "Whom did he marry?", "Marguerite", 0, 3),                 # who, 1: retrieval miss
    ("e", "How many steps are there?", "1,665 steps", 1, 4),         # how, 2: correct
    ("f", "Name the river.", "the river Seine in Paris", 0, 1),      # other, 4-5: reading miss
]


def tiny_rows(top_k: int = 1) -> list[dict]:
    gen = [gen_row(i, q, a, em, rank) for i, q, a, em, rank in TINY]
    ret = [{"id": i, "gold_passage_ids": ["P1"], "top_ids": ["P1"], "bm25_gold_rank": rank,
            "hybrid_gold_rank": rank} for i, _, _, _, rank in TINY]
    return join_questions(gen, ret, top_k)


def script_data(html: str, element_id: str) -> object:
    """The JSON data block ``element_id`` of a page."""
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', html,
                  re.S)
    assert m is not None, element_id
    return json.loads(m.group(1))


def report(**kw: object) -> str:
    base = dict(split="test", top_k=1, retriever_kind="hybrid", rows=tiny_rows(),
                metrics={"test/em": 40.0, "test/f1": 50.0, "test/recall_at_1": 0.5,
                         "test/recall_at_5": 0.9, "test/hybrid/recall_at_1": 0.5,
                         "test/hybrid/recall_at_5": 0.9, "test/bm25/recall_at_1": 0.4,
                         "test/bm25/recall_at_5": 0.8, "test/untrained/em": 1.0,
                         "test/n_questions": 6.0},
                passages={"P1": {"title": "Paris", "text": "</script><b>bold</b>"}},
                curves={"generator": [{"step": s, "loss": 3.0 / s, "lr": 1e-4,
                                       **({"dev/f1": 10.0 * s} if s % 2 == 0 else {})}
                                      for s in range(1, 9)]})
    base.update(kw)
    return render_report(ReportData(**base))  # type: ignore[arg-type]


def test_question_types_and_answer_lengths() -> None:
    assert [an.question_type(q) for _, q, *_ in TINY] == [
        "what", "what", "who", "who", "how", "other"]
    assert an.question_type("Why?") == "why" and an.question_type("WHEN was it") == "when"
    assert [an.length_bucket(a) for a in ("x", "a b", "a b c", "a b c d e", "a " * 7,
                                         "a " * 11, "")] == [
        "1", "2", "3", "4-5", "6-10", "11+", "1"]


def test_failure_breakdown_matches_a_hand_count() -> None:
    rows = tiny_rows()
    assert [r["outcome"] for r in rows] == [
        "correct", "reading miss", "retrieval miss", "retrieval miss", "correct",
        "reading miss"]
    by_type = dict(an.breakdown(rows, "type", an.QUESTION_TYPES))
    assert list(by_type) == ["what", "who", "how", "other", "all"]
    assert by_type["what"] == {"n": 2, "correct": 1, "reading miss": 1, "retrieval miss": 0,
                               "no gold passage": 0}
    assert by_type["who"]["retrieval miss"] == 2 and by_type["how"]["correct"] == 1
    assert by_type["all"] == {"n": 6, "correct": 2, "retrieval miss": 2, "reading miss": 2,
                              "no gold passage": 0}
    by_len = dict(an.breakdown(rows, "length", an.LENGTH_BUCKETS))
    assert {k: v["n"] for k, v in by_len.items()} == {"1": 3, "2": 2, "4-5": 1, "all": 6}
    assert by_len["1"]["reading miss"] == 1 and by_len["2"]["retrieval miss"] == 1
    # reading three passages, "d" (its gold passage at rank 3) becomes a reading miss
    assert [r["outcome"] for r in tiny_rows(top_k=3)][3] == "reading miss"
    # the page shows the same counts
    html = report()
    table = re.search(r'<table id="by-type".*?</table>', html, re.S).group(0)
    assert re.search(r'<th scope="row">who</th><td class="num">2</td>', table)
    assert re.search(r'data-outcome="retrieval miss">2 <small>\(100%\)', table)


def test_recall_curve_from_ranks_equals_the_metric_definition() -> None:
    curves = an.recall_curves(tiny_rows(), ["bm25"], 5)
    # ranks 1, 1, None, 3, 4, 1 over 6 labelled questions
    assert curves["bm25"] == [(1, 3 / 6), (2, 3 / 6), (3, 4 / 6), (4, 5 / 6), (5, 5 / 6)]


def test_the_page_is_self_contained() -> None:
    html = report()
    assert html.startswith("<!DOCTYPE html>")
    # no script, style, image or link loaded from anywhere: nothing but the file itself
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"<link\b|@import|url\(", html, re.I)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert html.count("<svg") >= 3  # recall@k, loss, dev curves


def test_hostile_text_is_escaped() -> None:
    gen = [gen_row("x", HOSTILE, "<img src=x onerror=alert(2)>", 0, None, cited="P1")]
    rows = join_questions(gen, [], 1)
    html = report(rows=rows, notes=[HOSTILE],
                  champion=Champion("1", params={"retriever.lr": HOSTILE}),
                  params={"retriever.lr": "5e-5"})
    assert HOSTILE not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # the page's own three scripts (question rows and passages as JSON, the table script)
    assert html.count("<script") == 3 and html.count("</script>") == 3
    assert script_data(html, "passages")["P1"]["text"] == "</script><b>bold</b>"
    assert script_data(html, "question-rows")[0][:2] == [HOSTILE, "<img src=x onerror=alert(2)>"]


def test_deltas_against_the_champion_have_the_right_sign_and_colour() -> None:
    html = report(champion=Champion("7", metrics={"test/em": 45.0, "test/f1": 48.0,
                                                  "test/n_questions": 5.0}),
                  this_version="8")
    table = re.search(r'<table id="metrics".*?</table>', html, re.S).group(0)

    def row(key: str) -> str:
        return re.search(rf"<code>{re.escape(key)}</code>.*?</tr>", table, re.S).group(0)

    assert '<td class="num delta worse">-5</td>' in row("test/em")  # 40 vs 45
    assert '<td class="num delta better">+2</td>' in row("test/f1")  # 50 vs 48
    assert '<td class="num delta ">—</td>' in row("test/recall_at_1")  # champion lacks it
    assert re.search(r"<td class=\"num\">1</td>", row("test/em"))  # the untrained baseline
    assert "Against the champion, version 7" in html and '<span class="better">+2</span>' in html
    assert an.delta("train/loss", 1.0, 2.0) == (-1.0, "better")
    assert an.delta("test/n_questions", 6.0, 5.0) == (1.0, "same")
    assert an.delta("test/f1", 1.0, None) == (None, "")


def test_without_a_champion_the_report_says_so() -> None:
    html = report(champion_note="tracking is off")
    assert "No champion to compare with: tracking is off" in html
    assert '<table id="metrics"' in html


def test_params_and_lineage_diff_against_the_champion() -> None:
    html = report(champion=Champion("1", params={"seed": "0", "retriever.lr": "5e-05"},
                                    lineage={"git.commit": "aaa", "dvc.prepare.x": "1"}),
                  params={"seed": 0, "retriever.lr": 1e-4},
                  lineage={"git.commit": "bbb", "dvc.prepare.x": "1"})
    diff = re.search(r'<table id="params-diff".*?</table>', html, re.S).group(0)
    assert "retriever.lr" in diff and "0.0001" in diff and "5e-05" in diff
    assert "seed" not in diff  # the same as a string, as MLflow stores it
    lin = re.search(r'<table id="lineage-diff".*?</table>', html, re.S).group(0)
    assert "git.commit" in lin and "dvc.prepare.x" not in lin


def _run_report(tiny: Path) -> str:
    for stage in ("eval-retriever", "register", "report"):
        assert cli.main([stage]) == 0, stage
    return (tiny / "reports/report.html").read_text()


def test_report_stage_on_the_tiny_project(tiny_rag_project: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    html = _run_report(tiny_rag_project)
    assert "reports/report.html" in capsys.readouterr().out
    gen = [json.loads(x) for x in (tiny_rag_project / "artifacts/eval/generator_test.jsonl")
           .open()]
    assert all("answer_passage" in g for g in gen)  # the evaluate stage records the citation
    questions = script_data(html, "question-rows")
    assert [q[0] for q in questions] == [g["question"] for g in gen]
    assert [q[-1] for q in questions] == [g["answer_passage"] for g in gen]  # cited
    counts = dict(an.breakdown(join_questions(gen, [], 2), "type", an.QUESTION_TYPES))["all"]
    assert counts["n"] == len(gen) and counts["correct"] == sum(g["em"] for g in gen)
    assert "No champion to compare with: tracking is off" in html
    assert html.count("<svg") >= 3  # recall@k, retriever and generator loss
    plot = json.loads((tiny_rag_project / "plots/train_generator.json").read_text())
    assert "dev/f1" in plot[-1] and "dev/f1" not in plot[0]  # evaluated at the last step only
    assert "generator dev metrics" in html
    assert cli.main(["report", "-o", "elsewhere/r.html"]) == 0
    assert (tiny_rag_project / "elsewhere/r.html").stat().st_size > 5000


@pytest.mark.tracked
def test_report_against_the_champion_is_logged_to_mlflow(tiny_rag_project: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    _run_report(tiny_rag_project)
    assert cli.main(["promote"]) == 0
    assert "run report: " in capsys.readouterr().out  # promote points at the report
    assert cli.main(["report"]) == 0
    html = (tiny_rag_project / "reports/report.html").read_text()
    assert "Against the champion, version 1 (this run's model is the champion)" in html
    m = json.loads((tiny_rag_project / "metrics/generator.json").read_text())
    f1 = re.search(r"<code>test/f1</code></th>(.*?)</tr>", html, re.S).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", f1)  # this run, the champion: the same model
    assert cells[:3] == [f"{m['test/f1']:.4g}", f"{m['test/f1']:.4g}", "+0"]
    assert '<td class="num delta same">+0</td>' in f1
    mc = MlflowClient(f"sqlite:///{tiny_rag_project}/mlruns/mlflow.db")
    runs = [r for r in mc.search_runs([mc.get_experiment_by_name("ragtrain").experiment_id])
            if r.info.run_name == "report"]
    assert len(runs) == 2 and runs[0].data.tags["ragtrain.report_champion"] == "1"
    assert [a.path for a in mc.list_artifacts(runs[0].info.run_id, "report")] == [
        "report/report.html"]


def chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_chromium(page: Path, tmp: Path, shot: Path | None = None) -> tuple[str, float]:
    """(the DOM after the page's scripts ran, seconds the dump took) in headless Chromium."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chrome'}", "--window-size=1400,2200"]
    t0 = time.perf_counter()
    dom = subprocess.run([chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    took = time.perf_counter() - t0
    if shot is not None:
        subprocess.run([chromium(), *flags, f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=120)
    return dom, took


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_chromium_renders_the_report_of_a_tiny_run(tiny_rag_project: Path,
                                                   tmp_path: Path) -> None:
    """The page the tiny run wrote, opened offline: the metrics table, the SVG charts, the
    question table after the script ran; the screenshot is kept in test-output/."""
    _run_report(tiny_rag_project)
    shot = REPO / "test-output" / "report.png"
    shot.parent.mkdir(exist_ok=True)
    dom, _ = render_in_chromium(tiny_rag_project / "reports/report.html", tmp_path, shot)
    n = sum(1 for _ in (tiny_rag_project / "artifacts/eval/generator_test.jsonl").open())
    assert re.search(r'<table id="metrics".*?<code>test/f1</code>', dom, re.S)
    assert "recall@k on test" in dom and "generator training loss" in dom
    assert len(re.findall(r"<svg[^>]*>.*?<polyline", dom, re.S)) >= 3
    assert f"{n} of {n} questions" in dom  # written by the page's script: it ran
    assert dom.count('<tr data-o="') == n  # the rows it drew
    assert re.search(r'data-load-ms="\d+"', dom)
    assert shot.exists() and shot.stat().st_size > 20_000
