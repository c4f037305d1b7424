"""The model registry: register a pipeline run's RAG model, promote it, roll back.

Orchestration over ``tracking.model_registry`` (no mlflow import here). Three registered models
per ``registry.model_name`` (say ``ragtrain-rag``):

- ``ragtrain-rag``: the composite RAG model, an MLflow pyfunc around the self-contained bundle
  (questions in, answers with cited passages and scores out);
- ``ragtrain-rag-retriever``: encoder + index (+ BM25), bound by the encoder fingerprint;
- ``ragtrain-rag-generator``: the generator.

Data without reference answers (BEIR) makes a *retriever model* (tag ``ragtrain.model_kind``:
``retriever``): ``ragtrain-rag`` then serves ranked passages and scores, there is no generator
component, and promotion judges it on ``registry.retrieval_metric`` (floor
``registry.retrieval_floor``). A RAG model and a retriever model are never compared. With a
reranker, the retriever component holds it too and the versions record its fingerprint twice
(the one the manifest binds, the one its weights carry): a mismatch refuses promotion.

Aliases: ``challenger`` (the latest registered model) and ``champion`` (the promoted one). A RAG
version carries tags: ``metric.<key>`` (its evaluation metrics), the evaluation set's sha256, the
encoder's and the index's encoder fingerprints, its component versions. A promotion decision
(both metrics, the winner, the reason) is written as ``ragtrain.promotion.*`` tags on both
versions; the champion a promotion replaced is kept in ``ragtrain.previous_champion``, which
``rollback`` returns to.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtrain import tracking
from ragtrain.config import RegistryConfig, TrackingConfig
from ragtrain.errors import RegistryError
from ragtrain.tracking.promotion import Decision

CHALLENGER = "challenger"
CHAMPION = "champion"
METRIC_TAG = "metric."  # + a metrics-file key: "metric.test/f1"
EVAL_SET_TAG = "ragtrain.eval_set_sha256"
ENCODER_FP_TAG = "ragtrain.encoder_fingerprint"
INDEX_FP_TAG = "ragtrain.index_encoder_fingerprint"
CORPUS_TAG = "ragtrain.corpus_sha256"
KIND_TAG = "ragtrain.model_kind"  # "rag" (retriever + generator) or "retriever" (no generator)
RERANKER_FP_TAG = "ragtrain.reranker_fingerprint"  # the reranker the bundle's manifest binds
RERANKER_WEIGHTS_TAG = "ragtrain.reranker_weights_fingerprint"  # the one its weights are
PREVIOUS_TAG = "ragtrain.previous_champion"
ROLLED_BACK_TAG = "ragtrain.rolled_back"
ROLLBACK_TAG = "ragtrain.rollback_from"  # on a version a rollback restores, until it ends
DECISION_TAG = "ragtrain.promotion."
RAG_ARTIFACT = "rag"
COMPONENTS = ("retriever", "generator")


def component_name(name: str, component: str) -> str:
    return f"{name}-{component}"


def _version_tag(component: str) -> str:
    return f"ragtrain.{component}_version"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def metrics_of(tags: Mapping[str, str]) -> dict[str, float]:
    """The metrics recorded on a version (``metric.<key>`` tags)."""
    out = {}
    for k, v in tags.items():
        if k.startswith(METRIC_TAG):
            with contextlib.suppress(ValueError):
                out[k[len(METRIC_TAG):]] = float(v)
    return out


# --------------------------------------------------------------------------- register


@dataclass(frozen=True)
class Registered:
    """A registered RAG model version, its run and its component versions."""

    name: str
    version: str
    run_id: str
    components: dict[str, str] = field(default_factory=dict)


def binding_tags(manifest: Mapping[str, Any], bundle: Path | None = None) -> dict[str, str]:
    """The tags that bind a model to its data: eval set, corpus and both fingerprints, its
    kind; with a reranker, the fingerprint the manifest binds and the one its weights (in
    ``bundle``/reranker) record."""
    import json

    tags = {EVAL_SET_TAG: str(manifest.get("eval_set_sha256", "")),
            ENCODER_FP_TAG: str(manifest.get("encoder_fingerprint", "")),
            INDEX_FP_TAG: str(manifest.get("index_encoder_fingerprint", "")),
            CORPUS_TAG: str(manifest.get("corpus_sha256", "")),
            KIND_TAG: str(manifest.get("kind", "rag"))}
    rr = manifest.get("reranker")
    if rr:
        spec = None if bundle is None else Path(bundle) / "reranker" / "reranker.json"
        weights = (json.loads(spec.read_text()).get("fingerprint", "")
                   if spec is not None and spec.is_file() else "")
        tags.update({RERANKER_FP_TAG: str(rr.get("fingerprint", "")),
                     RERANKER_WEIGHTS_TAG: str(weights)})
    return tags


def judged_on(rcfg: RegistryConfig, kind: str) -> tuple[str, float]:
    """(the metric, the floor) a model of ``kind`` is promoted on."""
    if kind == "retriever":
        return rcfg.retrieval_metric, rcfg.retrieval_floor
    return rcfg.primary_metric, rcfg.floor


def register(run: tracking.RunHandle, rcfg: RegistryConfig, tcfg: TrackingConfig, *,
             bundle: Path, manifest: Mapping[str, Any], metrics: Mapping[str, float],
             components: Mapping[str, Sequence[Path]], example_questions: Sequence[str],
             root: Path = Path("."), rag_class: str | None = None) -> Registered:
    """Log the RAG model and its components to ``run``, then register them as ``challenger``.

    Everything is logged before anything is registered; if a registration step fails, the
    versions already created are deleted and the previous challenger aliases restored, so the
    registry never holds a half-registered model.

    Args:
        components: per component ("retriever", "generator"), the folders to log for it.
    """
    name = rcfg.model_name
    binding = binding_tags(manifest, bundle)
    metric, _ = judged_on(rcfg, binding[KIND_TAG])
    if metric not in metrics:
        key = "retrieval_metric" if binding[KIND_TAG] == "retriever" else "primary_metric"
        raise RegistryError(
            f"registry.{key}: {metric!r} is not among the metrics to "
            f"record ({', '.join(sorted(metrics)) or 'none'}); fix the key or run the "
            "evaluation first")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise RegistryError(f"unknown component {unknown[0]!r} (known: {', '.join(COMPONENTS)})")
    # 1. log everything
    for component, folders in components.items():
        for folder in folders:
            run.log_artifact(Path(folder), f"{component}/{Path(folder).name}")
    if "retriever" in components:
        run.log_dict({k.split(".", 1)[1]: v for k, v in binding.items()},
                     "retriever/binding.json")
    tracking.log_rag_model(run, bundle, example_questions, RAG_ARTIFACT, rag_class=rag_class)
    run.log_dict(dict(manifest), f"{RAG_ARTIFACT}_manifest.json")
    run.log_metrics(dict(metrics))
    run.set_tags(binding)

    # 2. register, all or nothing, under the registry lock; first clear what a registration
    # that died with the store left (its rollback could not reach the store)
    names = {c: component_name(name, c) for c in components} | {"rag": name}
    with tracking.registry_lock(tcfg, name, root=root):
        tracking.sweep_orphans(tcfg, name, {c: component_name(name, c) for c in COMPONENTS},
                               root=root)
        created = _register_all(run, tcfg, name, names, components, binding, metrics, root)
    run.set_tags({"ragtrain.registered": f"{name}/{created['rag']}"})
    return Registered(name, created.pop("rag"), run.run_id, created)


def _register_all(run: tracking.RunHandle, tcfg: TrackingConfig, name: str,
                  names: Mapping[str, str], components: Mapping[str, Sequence[Path]],
                  binding: Mapping[str, str], metrics: Mapping[str, float],
                  root: Path) -> dict[str, str]:
    """The component versions, then the RAG version, then the aliases; on any failure the
    versions created are deleted and the previous challengers restored."""
    before = {n: tracking.get_alias(tcfg, n, CHALLENGER, root=root) for n in names.values()}
    created: dict[str, str] = {}
    try:
        for component in components:
            created[component] = tracking.register_model(
                tcfg, run.run_id, component, names[component], binding, root=root)
        tags = {**binding, **{f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()},
                **{_version_tag(c): v for c, v in created.items()}}
        created["rag"] = tracking.register_model(tcfg, run.run_id, RAG_ARTIFACT, name, tags,
                                                 root=root)
        for key, version in created.items():
            tracking.set_alias(tcfg, names[key], CHALLENGER, version, root=root)
    except BaseException:
        for key, version in reversed(created.items()):
            with contextlib.suppress(Exception):
                tracking.delete_version(tcfg, names[key], version, root=root)
            with contextlib.suppress(Exception):
                if before[names[key]] is not None:
                    tracking.set_alias(tcfg, names[key], CHALLENGER, before[names[key]],
                                       root=root)
        raise
    return created


# --------------------------------------------------------------------------- promote


@dataclass(frozen=True)
class Promotion:
    """A promotion decision: who was compared, on what, who won and why."""

    name: str
    metric: str
    challenger: str
    champion: str | None  # the champion before the decision
    challenger_value: float | None
    champion_value: float | None
    decision: Decision

    @property
    def promoted(self) -> bool:
        return self.decision.promote

    @property
    def winner(self) -> str | None:
        return self.challenger if self.promoted else self.champion

    def tags(self) -> dict[str, str]:
        def fmt(v: float | None) -> str:
            return "none" if v is None else repr(v)

        return {f"{DECISION_TAG}{k}": v for k, v in {
            "decision": "promoted" if self.promoted else "refused",
            "reason": self.decision.reason,
            "metric": self.metric,
            "challenger": self.challenger,
            "challenger_value": fmt(self.challenger_value),
            "champion": self.champion or "none",
            "champion_value": fmt(self.champion_value),
            "winner": self.winner or "none",
            "time": _now(),
        }.items()}


def check_compatible(challenger: str, ch_tags: Mapping[str, str], champion: str | None,
                     champ_tags: Mapping[str, str] | None) -> Decision | None:
    """A refusal when the challenger cannot be judged: its index was built by another encoder
    than its retriever's, or it was evaluated on another set than the champion; else None."""
    enc, idx = ch_tags.get(ENCODER_FP_TAG, ""), ch_tags.get(INDEX_FP_TAG, "")
    if not enc or not idx:
        return Decision(False, f"refused: version {challenger} does not record its encoder and "
                               "index fingerprints; register it again (ragtrain register)")
    if enc != idx:
        return Decision(False, f"refused: version {challenger}'s index was built by encoder "
                               f"{idx[:16]}, but its retriever is encoder {enc[:16]}; rebuild "
                               "the index (ragtrain build-index) and register again")
    bound, weights = ch_tags.get(RERANKER_FP_TAG), ch_tags.get(RERANKER_WEIGHTS_TAG)
    if (bound is not None or weights is not None) and (not bound or bound != weights):
        return Decision(False, f"refused: version {challenger} binds reranker "
                               f"{(bound or 'none')[:16]}, but the reranker it holds is "
                               f"{(weights or 'none')[:16]}; package the model again "
                               "(ragtrain package) and register it")
    if champion is None or champ_tags is None:
        return None
    kind, theirs_kind = ch_tags.get(KIND_TAG, "rag"), champ_tags.get(KIND_TAG, "rag")
    if kind != theirs_kind:
        return Decision(False, f"refused: challenger {challenger} is a {kind} model, champion "
                               f"{champion} a {theirs_kind} model; they are judged on "
                               "different metrics and cannot be compared")
    mine, theirs = ch_tags.get(EVAL_SET_TAG, ""), champ_tags.get(EVAL_SET_TAG, "")
    if not mine or not theirs:
        who = challenger if not mine else champion
        return Decision(False, f"refused: version {who} does not record its evaluation set "
                               "(sha256); cannot compare")
    if mine != theirs:
        return Decision(False, f"refused: different evaluation sets: challenger {challenger} "
                               f"was evaluated on {mine[:12]}, champion {champion} on "
                               f"{theirs[:12]}; re-score the champion on the challenger's set "
                               "(evaluate-champion) or evaluate both on the same data")
    return None


def _set_champion(rcfg: RegistryConfig, tcfg: TrackingConfig, version: str,
                  tags: Mapping[str, str], root: Path) -> None:
    """Point the RAG model's champion alias, then its components', at ``version``'s."""
    tracking.set_alias(tcfg, rcfg.model_name, CHAMPION, version, root=root)
    for c in COMPONENTS:
        if tags.get(_version_tag(c)):
            tracking.set_alias(tcfg, component_name(rcfg.model_name, c), CHAMPION,
                               tags[_version_tag(c)], root=root)


def _crown(rcfg: RegistryConfig, tcfg: TrackingConfig, version: str, tags: Mapping[str, str],
           root: Path) -> None:
    """A promotion's alias moves: every ``champion`` to ``version``'s, then its ``challenger``
    aliases (if they still name it) removed. Idempotent, so a rerun finishes a killed one."""
    name = rcfg.model_name
    _set_champion(rcfg, tcfg, version, tags, root)
    if tags.get(ROLLBACK_TAG):  # a rollback to it died before moving an alias: moot now
        tracking.tag_version(tcfg, name, version, {ROLLBACK_TAG: ""}, root=root)
    if tracking.get_alias(tcfg, name, CHALLENGER, root=root) == version:
        for c in COMPONENTS:
            part = component_name(name, c)
            if tags.get(_version_tag(c)) and tracking.get_alias(
                    tcfg, part, CHALLENGER, root=root) == tags[_version_tag(c)]:
                tracking.delete_alias(tcfg, part, CHALLENGER, root=root)
        tracking.delete_alias(tcfg, name, CHALLENGER, root=root)  # last: marks it finished


def _interrupted(rcfg: RegistryConfig, tcfg: TrackingConfig, version: str, tags: Mapping[str, str],
                 root: Path) -> bool:
    """``version`` (the champion) was promoted, but the promotion died before its component
    aliases or its ``challenger`` removal: the RAG model's alias moves first and ``challenger``
    goes last, so either one left behind says so."""
    if tags.get(f"{DECISION_TAG}decision") != "promoted" or \
            tags.get(f"{DECISION_TAG}challenger") != version:
        return False
    name = rcfg.model_name
    if tracking.get_alias(tcfg, name, CHALLENGER, root=root) == version:
        return True
    return any(tags.get(_version_tag(c)) and tracking.get_alias(
        tcfg, component_name(name, c), CHAMPION, root=root) != tags[_version_tag(c)]
        for c in COMPONENTS)


def promote(rcfg: RegistryConfig, tcfg: TrackingConfig, *, root: Path = Path("."),
            version: str | None = None) -> Promotion:
    """Judge the challenger (or ``version``) against the champion and move ``champion`` if it
    wins; the decision is recorded as tags on both versions either way.

    Refused (``Promotion.promoted`` false): a metric not better by more than
    ``registry.min_gain``, a first model below ``registry.floor``, evaluation sets that differ,
    an index built by another encoder than the retriever's. Under the model's registry lock:
    two promotions (or a rollback) at once run one after the other, each judging the champion
    the other left, so the aliases of the RAG model and its parts always agree.
    """
    tracking.check_store(tcfg.uri, root=root)  # an unreachable server: fail now, not after retries
    if version is not None:  # refusals that need no lock write nothing (not even the lock)
        tracking.version_tags(tcfg, rcfg.model_name, version, root=root)
    elif tracking.get_alias(tcfg, rcfg.model_name, CHALLENGER, root=root) is None:
        return _promote(rcfg, tcfg, root=root, version=version)  # raises: nothing to promote
    with tracking.registry_lock(tcfg, rcfg.model_name, root=root):
        return _promote(rcfg, tcfg, root=root, version=version)


def _promote(rcfg: RegistryConfig, tcfg: TrackingConfig, *, root: Path,
             version: str | None) -> Promotion:
    name = rcfg.model_name
    challenger = version or tracking.get_alias(tcfg, name, CHALLENGER, root=root)
    if challenger is None:
        raise RegistryError(f"no {name}@{CHALLENGER} to promote in {tracking.redact(tcfg.uri)}: "
                            "register a model first (ragtrain register, or run the pipeline)")
    champion = tracking.get_alias(tcfg, name, CHAMPION, root=root)
    ch_tags = tracking.version_tags(tcfg, name, challenger, root=root)
    if champion == challenger:
        if not _interrupted(rcfg, tcfg, challenger, ch_tags, root):
            raise RegistryError(f"{name} version {challenger} is already the champion")
        _crown(rcfg, tcfg, challenger, ch_tags, root)  # finish what a killed promote began
        before = ch_tags.get(PREVIOUS_TAG) or None
        return Promotion(name, ch_tags.get(f"{DECISION_TAG}metric", ""), challenger, before,
                         None, None, Decision(True, "finished the interrupted promotion of "
                                              f"version {challenger}: " + ch_tags.get(
                                                  f"{DECISION_TAG}reason", "")))
    champ_tags = (tracking.version_tags(tcfg, name, champion, root=root)
                  if champion is not None else None)
    m, floor = judged_on(rcfg, ch_tags.get(KIND_TAG, "rag"))
    ch_metrics = metrics_of(ch_tags)
    champ_metrics = metrics_of(champ_tags) if champ_tags is not None else None
    decision = check_compatible(challenger, ch_tags, champion, champ_tags) or \
        tracking.should_promote(ch_metrics, champ_metrics, metric=m, min_gain=rcfg.min_gain,
                                greater_is_better=rcfg.greater_is_better, floor=floor)

    def value(ms: Mapping[str, float] | None) -> float | None:
        v = None if ms is None else ms.get(m)
        return None if v is None or math.isnan(v) else v

    result = Promotion(name, m, challenger, champion, value(ch_metrics), value(champ_metrics),
                       decision)
    tags = result.tags()
    tracking.tag_version(tcfg, name, challenger, tags, root=root)
    if champion is not None:
        tracking.tag_version(tcfg, name, champion, tags, root=root)
    if result.promoted:
        tracking.tag_version(tcfg, name, challenger, {PREVIOUS_TAG: champion or ""}, root=root)
        _crown(rcfg, tcfg, challenger, ch_tags, root)
    return result


# --------------------------------------------------------------------------- rollback


@dataclass(frozen=True)
class Rollback:
    name: str
    replaced: str  # the champion before
    champion: str  # the champion now (the one it had replaced)
    finished: bool = False  # True: this call finished an interrupted rollback


def rollback(rcfg: RegistryConfig, tcfg: TrackingConfig, *,
             root: Path = Path(".")) -> Rollback:
    """Return ``champion`` to the version the current champion replaced (under the lock)."""
    tracking.check_store(tcfg.uri, root=root)
    if tracking.get_alias(tcfg, rcfg.model_name, CHAMPION, root=root) is None:
        return _rollback(rcfg, tcfg, root=root)  # raises: nothing to roll back (no lock taken)
    with tracking.registry_lock(tcfg, rcfg.model_name, root=root):
        return _rollback(rcfg, tcfg, root=root)


def _rollback(rcfg: RegistryConfig, tcfg: TrackingConfig, *, root: Path) -> Rollback:
    name = rcfg.model_name
    current = tracking.get_alias(tcfg, name, CHAMPION, root=root)
    if current is None:
        raise RegistryError(f"no {name}@{CHAMPION} in {tracking.redact(tcfg.uri)}: nothing to "
                            "roll back")
    tags = tracking.version_tags(tcfg, name, current, root=root)
    if tags.get(ROLLBACK_TAG):  # a rollback to `current` died before its end: finish that one
        return _restore(rcfg, tcfg, current, tags, tags[ROLLBACK_TAG], root, finished=True)
    previous = tags.get(PREVIOUS_TAG, "")
    if not previous:
        raise RegistryError(f"{name} version {current} was the first champion: there is no "
                            "previous champion to roll back to")
    prev_tags = tracking.version_tags(tcfg, name, previous, root=root)  # raises if deleted
    tracking.tag_version(tcfg, name, previous, {ROLLBACK_TAG: current}, root=root)  # first
    return _restore(rcfg, tcfg, previous, prev_tags, current, root)


def _restore(rcfg: RegistryConfig, tcfg: TrackingConfig, version: str, tags: Mapping[str, str],
             replaced: str, root: Path, finished: bool = False) -> Rollback:
    """A rollback's moves: every ``champion`` to ``version``'s, ``replaced`` marked rolled back,
    then ``version``'s rollback tag cleared (last: it marks the end). Idempotent."""
    _set_champion(rcfg, tcfg, version, tags, root)
    tracking.tag_version(tcfg, rcfg.model_name, replaced,
                         {ROLLED_BACK_TAG: f"replaced by version {version} at {_now()}"},
                         root=root)
    tracking.tag_version(tcfg, rcfg.model_name, version, {ROLLBACK_TAG: ""}, root=root)
    return Rollback(rcfg.model_name, replaced, version, finished)


# --------------------------------------------------------------------------- report


def describe(p: Promotion) -> str:
    """One paragraph for the CLI and the flows."""
    if p.promoted:
        head = f"{p.name} version {p.challenger} is now the champion"
        if p.champion:
            head += f" (was version {p.champion}; `ragtrain rollback` returns to it)"
    else:
        head = (f"{p.name} version {p.challenger} was not promoted; the champion stays "
                + (f"version {p.champion}" if p.champion else "unset"))
    return f"{head}\n  {p.decision.reason}"
