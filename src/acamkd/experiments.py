"""Run sets of configs (cached, resumable) into one results table: ``demo``, ``compare``, ``ablate``.

A :class:`Run` names one training or distillation job: its row in the table, its validated
config, its seed and the runs it needs first (a distillation needs the teacher whose
``last.pt`` it reads). :func:`run_all` runs a list of them in dependency order, each in its
own ``cfg.train.output_dir``, and returns one :class:`RunResult` per run.

The cache is keyed by the resolved config. Before the engine starts, the runner writes
``experiment.json`` into the run folder (kind, ``to_dict(cfg)``, the keys of the runs it needs,
``sha256`` of all that as canonical JSON, ``status: "started"``) and sets ``status: "finished"``
once the engine returns. On the next call, a folder whose marker has the same ``sha256``:

* finished, with its ``final_metrics.json``: skipped, its metrics read back (a run the runner
  finished keeps ``last.pt`` only: its ``prev.pt``, the fallback against a kill mid-save, is
  removed once the run has finished, halving a sweep's disk);
* not finished but holding ``last.pt`` or ``prev.pt`` (killed mid-way, or between a checkpoint's
  two renames): resumed with ``resume=True`` (the engine resumes exactly, from ``last.pt`` else
  ``prev.pt``);
* a MasKD distillation with ``token_file: auto``, not finished, no checkpoint, but holding its
  stage-1 tokens or stage-1 checkpoint (killed in stage 1 or before stage 2's first checkpoint):
  started again in place, stage 2's files (:data:`acamkd.engine.run_folder.RUN_FILES`) removed
  first, so stage 1 reuses its tokens or resumes from its checkpoint;

any other non-empty folder (another config, a changed dependency, a run killed before its first
checkpoint, files the runner did not write) is never reused nor mixed with the new run: it is
moved aside to ``<dir>.stale-<n>`` (first free ``n``, nothing is deleted) and the run starts
over. While it looks at, moves or runs a run, the runner holds an exclusive lock beside the run
folder (``<parent>/.<folder name>.runner.lock``, dropped by the kernel if the process dies): a
second runner on the same run (two ``acamkd compare`` or ``demo`` calls on one ``--out``) stops
with :class:`~acamkd.engine.run_folder.RunFolderBusy` naming the run and the holder's pid, instead
of taking a run in progress for a killed one and moving it aside. Runners on disjoint rows of one
``--out`` may run side by side (a finished dependency, e.g. the shared teacher, is only read). A dependency's key is part of its dependents' keys, so retraining a teacher with another
config retrains the students distilled from it. Folders written by the demo before this module
(``demo_config.json`` equal to the config, ``final_metrics.json``) count as finished.

Results: :func:`aggregate` groups runs by name (one entry per seed) into mean and sample
standard deviation per metric; :func:`markdown_table` prints chosen metric columns x100 (COCO's
-1 for an empty size range shows as ``-``), ``train s/step`` and optionally the peak memory;
:func:`write_results` writes ``<stem>.md`` and ``<stem>.json`` (the per-seed raw values and the
aggregates).

The runner is for one process (the demo, a sweep on one machine); launch multi-GPU runs with
``torchrun ... acamkd train``. A run that raises stops :func:`run_all` (its marker stays
``started``: the next call resumes it from its last checkpoint), except a run that diverges
(NaN/inf loss or features): its marker says ``diverged`` with the message, the table names the
seed as diverged, the runs that need it are not run, and the run set goes on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from acamkd.config import Config, to_dict

__all__ = ["Run", "RunResult", "run_all", "read_finished", "run_key", "aggregate", "by_name", "markdown_table", "format_table",
           "results_json", "write_results", "MARKER", "PEAK_MEMORY", "STATUS_CACHED", "STATUS_DIVERGED", "STATUS_RAN",
           "STATUS_RESUMED"]

logger = logging.getLogger("acamkd")

MARKER = "experiment.json"  # the runner's record of what a run folder holds
_LEGACY_MARKER = "demo_config.json"  # written by the demo before this module: to_dict(cfg) of a finished run
_LAST = "last.pt"  # acamkd.engine.checkpoint.LAST_NAME (not imported: that imports torch)
# MasKD's stage 1 in the run folder (acamkd.engine.maskd_tokens: TOKEN_FILE_NAME, its PARTIAL_SUFFIX)
_STAGE1_FILES = ("maskd_tokens.safetensors", "maskd_tokens.safetensors.partial.pt")
_PREV = "prev.pt"  # acamkd.engine.checkpoint.PREV_NAME: the whole checkpoint a kill between two renames leaves
STATUS_CACHED, STATUS_RAN, STATUS_RESUMED = "cached", "ran", "resumed"
STATUS_DIVERGED = "diverged"  # the engine raised TrainingDiverged: recorded, not fatal to the run set
DIVERGED = "diverged"  # a diverged run's only metric: the engine's message


@dataclass
class Run:
    """One job of an experiment.

    ``name`` is its row in the table (runs sharing a name are seeds of one row); ``kind`` is
    ``"train"`` (:func:`acamkd.engine.run.train`) or ``"distill"`` (:func:`acamkd.engine.run.distill`);
    ``cfg`` a validated config, whose ``train.output_dir`` is the run's folder; ``seed`` groups the
    row's runs (None: ``cfg.train.seed``); ``needs`` the names of runs that must finish first. A
    need resolves to the run of that name with the same seed, else to the only run of that name
    (a lone string is one name).

    Raises ValueError for an unknown ``kind``.
    """

    name: str
    kind: Literal["train", "distill"]
    cfg: Config
    seed: int | None = None
    needs: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("train", "distill"):
            raise ValueError(f"run {self.name!r}: kind={self.kind!r}, choose 'train' or 'distill'")
        if self.seed is None:
            self.seed = self.cfg.train.seed
        self.needs = (self.needs,) if isinstance(self.needs, str) else tuple(self.needs)

    @property
    def id(self) -> str:
        """Unique within an experiment: name and seed."""
        return f"{self.name} (seed {self.seed})"

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


@dataclass
class RunResult:
    """A finished run: ``metrics`` is ``final_metrics.json`` merged with ``timing.json``
    (``sec_per_step``, ``steps_timed``, and whatever else the engine times, e.g. peak memory);
    ``status`` says whether it was ``cached``, ``ran`` from scratch or ``resumed``; ``key`` is
    the sha256 the cache compares."""

    run: Run
    metrics: dict[str, Any]
    status: str
    key: str = ""


# ============================================================================ running


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _plain(obj: Any) -> Any:
    """As it reads back from JSON (tuples become lists), so stored and current configs compare."""
    return json.loads(_canonical(obj))


def run_key(run: Run, need_keys: Mapping[str, str] | None = None) -> str:
    """sha256 of the canonical JSON of the run's kind, resolved config and its needs' keys."""
    payload = {"kind": run.kind, "config": to_dict(run.cfg), "needs": dict(need_keys or {})}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    """Atomically (a killed runner leaves the old file or the new one, never half of one)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _differences(old: Any, new: Any, limit: int = 6) -> str:
    """Dotted keys whose values differ between two stored configs, for the log."""
    a, b = _flat(_plain(old)), _flat(_plain(new))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "") if keys else "none in the config"


def _state(run: Run, key: str) -> tuple[str, str]:
    """What the run folder holds: ("new"|"done"|"legacy"|"diverged"|"resume"|"stage1"|"stale", why)."""
    out = run.output_dir
    if not out.is_dir() or not any(out.iterdir()):
        return "new", ""
    marker = _read_json(out / MARKER)
    finished = (out / "final_metrics.json").is_file()
    if not isinstance(marker, dict):
        legacy = _read_json(out / _LEGACY_MARKER)
        if legacy is not None and legacy == _plain(to_dict(run.cfg)) and finished:
            return "legacy", ""
        return "stale", f"it has no {MARKER} (not written by this runner)"
    if marker.get("sha256") != key:
        changed = _differences({"kind": marker.get("kind"), **(marker.get("config") or {})},
                               {"kind": run.kind, **to_dict(run.cfg)})
        why = f"it holds another config ({changed})"
        if changed == "none in the config":
            why = "a run it needs changed since"
        return "stale", why
    if marker.get("status") == "finished" and finished:
        return "done", ""
    if marker.get("status") == STATUS_DIVERGED:
        return "diverged", str(marker.get("error", "diverged"))
    if (out / _LAST).is_file() or (out / _PREV).is_file():
        return "resume", ""  # the engine resumes from last.pt, else prev.pt
    if _learns_stage1(run) and any((out / name).is_file() for name in _STAGE1_FILES):
        return "stage1", ""  # killed in or after MasKD's stage 1, before the first checkpoint
    return "stale", "a run of this config stopped before its first checkpoint"


def _diverged(run: Run, message: str, key: str = "") -> RunResult:
    """The result of a run that diverged (or could not run because a run it needs did)."""
    return RunResult(run, {DIVERGED: message}, STATUS_DIVERGED, key)


def _learns_stage1(run: Run) -> bool:
    """A MasKD distillation whose stage 1 runs in its own folder (``token_file: auto``)."""
    method = run.cfg.method
    return (run.kind == "distill" and method.name == "maskd"
            and str((method.options or {}).get("token_file", "auto")) == "auto")


def _move_aside(out: Path) -> Path:
    n = 1
    while (dest := out.with_name(f"{out.name}.stale-{n}")).exists():
        n += 1
    os.replace(out, dest)
    return dest


def _collect(out: Path) -> dict[str, Any]:
    """``final_metrics.json`` merged with ``timing.json`` (absent: no timings)."""
    metrics = _read_json(out / "final_metrics.json")
    if not isinstance(metrics, dict):
        raise FileNotFoundError(f"{out / 'final_metrics.json'}: missing or unreadable after the run finished")
    timing = _read_json(out / "timing.json")
    return {**metrics, **(timing if isinstance(timing, dict) else {})}


def _order(runs: Sequence[Run]) -> tuple[list[Run], dict[str, list[Run]]]:
    """Runs in dependency order (input order where free) and each run's resolved needs."""
    by_id: dict[str, Run] = {}
    dirs: dict[str, str] = {}
    for r in runs:
        if r.id in by_id:
            raise ValueError(f"two runs are named {r.name!r} with seed {r.seed}: give each run of a row its own seed")
        folder = os.path.abspath(r.output_dir)
        if folder in dirs:
            raise ValueError(f"runs {dirs[folder]!r} and {r.id!r} share train.output_dir={r.cfg.train.output_dir}: "
                             f"give each run its own folder")
        by_id[r.id], dirs[folder] = r, r.id
    needs: dict[str, list[Run]] = {}
    for r in runs:
        needs[r.id] = []
        for name in r.needs:
            same_seed = [o for o in runs if o.name == name and o.seed == r.seed]
            named = [o for o in runs if o.name == name]
            if not named:
                raise ValueError(f"run {r.id!r} needs {name!r}, which is not among the runs: "
                                 f"{sorted({o.name for o in runs})}")
            if not same_seed and len(named) > 1:
                raise ValueError(f"run {r.id!r} needs {name!r}, which has seeds {[o.seed for o in named]} "
                                 f"but not {r.seed}: add it or give {name!r} a single run")
            needs[r.id].append((same_seed or named)[0])
    ordered: list[Run] = []
    state: dict[str, str] = {}  # "visiting" | "done"

    def visit(r: Run, path: tuple[str, ...]) -> None:
        if state.get(r.id) == "done":
            return
        if state.get(r.id) == "visiting":
            raise ValueError(f"runs need each other in a cycle: {' -> '.join((*path, r.id))}")
        state[r.id] = "visiting"
        for dep in needs[r.id]:
            visit(dep, (*path, r.id))
        state[r.id] = "done"
        ordered.append(r)

    for r in runs:
        visit(r, ())
    return ordered, needs


def run_all(runs: Sequence[Run]) -> list[RunResult]:
    """Run (or read back from their folders) ``runs`` in dependency order; results in input order.

    Each run is skipped, resumed or started over as the module docstring says. Raises
    ValueError for two runs with the same name and seed or the same output folder, an unknown
    or ambiguous need, or a dependency cycle (all checked before anything runs); whatever the
    engine raises propagates (later runs do not start), except a run that diverges
    (:class:`~acamkd.engine.trainer.TrainingDiverged`): its marker records it (``status:
    "diverged"`` and the message), its result has status ``diverged`` and the message as its only
    metric, the runs that need it are not run (also ``diverged``), and the others go on. A later call
    reads a diverged run back as diverged (it would diverge again: same config, same seed); remove
    its folder to try again.
    """
    from acamkd.engine import run as engine  # lazily: the engine imports torch and the models

    ordered, needs = _order(runs)
    done: dict[str, RunResult] = {}
    for r in ordered:
        diverged = [dep.id for dep in needs[r.id] if done[dep.id].status == STATUS_DIVERGED]
        if diverged:  # nothing to distil from: recorded as diverged too, not run
            logger.warning("run %s: not run, it needs %s, which diverged", r.id, diverged[0])
            done[r.id] = _diverged(r, f"not run: it needs {diverged[0]}, which diverged")
            continue
        need_keys = {dep.id: done[dep.id].key for dep in needs[r.id]}
        with _runner_lock(r):
            done[r.id] = _run_one(engine, r, run_key(r, need_keys), need_keys)
    return [done[r.id] for r in runs]


def _runner_lock(run: Run):
    """The runner's exclusive lock on one run (module docstring), beside its folder."""
    from acamkd.engine.run_folder import RunFolderLock

    out = run.output_dir
    return RunFolderLock(out.parent, lock_name=f".{out.name}.runner.lock",
                         busy=f"run {run.id} in {out} is being run by another acamkd process (pid {{pid}}), e.g. a "
                              f"second acamkd compare or demo on the same --out: wait for it, stop it, or use "
                              f"another --out")


def read_finished(runs: Sequence[Run]) -> tuple[list[RunResult], list[Run]]:
    """``(finished, missing)``: the runs :func:`run_all` would read back as finished with their
    current config (status ``cached``), and the others (never started, unfinished, holding another
    config, or needing a run that is not finished), each in input order. Trains, resumes, moves and
    writes nothing: a report of where a run set stands (``acamkd compare --report-only``).
    Raises ValueError as :func:`run_all` for a malformed run set."""
    ordered, needs = _order(runs)
    done: dict[str, RunResult] = {}
    for r in ordered:
        if any(dep.id not in done for dep in needs[r.id]):
            continue
        key = run_key(r, {dep.id: done[dep.id].key for dep in needs[r.id]})
        state, why = _state(r, key)
        if state in ("done", "legacy"):
            done[r.id] = RunResult(r, _collect(r.output_dir), STATUS_CACHED, key)
        elif state == "diverged":
            done[r.id] = _diverged(r, why, key)
    return [done[r.id] for r in runs if r.id in done], [r for r in runs if r.id not in done]


def _run_one(engine, r: Run, key: str, need_keys: Mapping[str, str]) -> RunResult:
    """Read back, resume or (re)start one run (module docstring); the caller holds its lock."""
    out = r.output_dir
    state, why = _state(r, key)
    if state in ("done", "legacy"):
        logger.info("run %s: finished before with this config, reading %s", r.id, out)
        if state == "legacy":  # adopt the old demo's folder
            _write_json(out / MARKER, _marker(r, key, need_keys, "finished"))
        return RunResult(r, _collect(out), STATUS_CACHED, key)
    if state == "diverged":
        logger.info("run %s: diverged before with this config (%s); not run again (remove %s to retry)", r.id, why, out)
        return _diverged(r, why, key)
    if state == "stale":
        moved = _move_aside(out)
        logger.warning("run %s: %s is not reused because %s; moved it to %s and starting over",
                       r.id, out, why, moved)
    resume = state == "resume"
    action = {"resume": f"resuming from {_LAST if (out / _LAST).is_file() else _PREV}",
              "stage1": "starting again from MasKD's stage 1 (its tokens or checkpoint kept)"}.get(state, f"{r.kind}ing")
    logger.info("run %s: %s in %s", r.id, action, out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / MARKER, _marker(r, key, need_keys, "started"))
    if state == "stage1":  # clear what stage 2 may have logged; the stage-1 files are not run files
        from acamkd.engine.run_folder import clear_run_files

        clear_run_files(out)
    from acamkd.engine.trainer import TrainingDiverged

    try:
        if r.kind == "distill":
            engine.distill(r.cfg, resume=resume, eval_teacher=False)
        else:
            engine.train(r.cfg, resume=resume)
    except TrainingDiverged as err:
        _write_json(out / MARKER, {**_marker(r, key, need_keys, STATUS_DIVERGED), "error": str(err)})
        logger.warning("run %s diverged: %s. Recorded (the table says so); going on with the other runs", r.id, err)
        return _diverged(r, str(err), key)
    _write_json(out / MARKER, _marker(r, key, need_keys, "finished"))
    _drop_fallback_checkpoint(out)
    return RunResult(r, _collect(out), STATUS_RESUMED if resume else STATUS_RAN, key)


def _drop_fallback_checkpoint(out: Path) -> None:
    """Remove a finished run's ``prev.pt``: it guards against a kill between a checkpoint's two
    renames, and the run has finished with a whole ``last.pt`` (the engine wrote its final
    metrics after it). Each is a checkpoint with optimizer state: keeping both doubles a sweep's disk."""
    if (out / _LAST).is_file() and (out / _PREV).is_file():
        (out / _PREV).unlink()
        logger.info("%s: finished; removed %s (%s is the run's checkpoint)", out, _PREV, _LAST)


def _marker(run: Run, key: str, need_keys: Mapping[str, str], status: str) -> dict[str, Any]:
    return {"name": run.name, "seed": run.seed, "kind": run.kind, "status": status, "sha256": key,
            "needs": dict(need_keys), "config": to_dict(run.cfg)}


# ============================================================================ results


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(per_seed: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{name: {seed: metrics}}`` -> ``{name: {"seeds": [...], "n": k, "mean": {...}, "std": {...}}}``.

    Per metric present as a finite number in every seed of a row: the mean and the sample
    standard deviation (n - 1; None for one seed). Seeds are listed in ascending order. A seed
    whose metrics hold :data:`DIVERGED` is left out of ``seeds``, ``n`` and the statistics and
    listed in ``"diverged"``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, seeds in per_seed.items():
        diverged = sorted(s for s in seeds if DIVERGED in seeds[s])
        order = sorted(s for s in seeds if DIVERGED not in seeds[s])
        keys = [k for k in seeds[order[0]] if all(_number(seeds[s].get(k)) for s in order)] if order else []
        values = {k: [float(seeds[s][k]) for s in order] for k in keys}
        out[name] = {"seeds": order, "n": len(order), "diverged": diverged,
                     "mean": {k: statistics.fmean(v) for k, v in values.items()},
                     "std": {k: statistics.stdev(v) if len(v) > 1 else None for k, v in values.items()}}
    return out


def by_name(results: Iterable[RunResult]) -> dict[str, dict[int, dict[str, Any]]]:
    """Results grouped for :func:`aggregate`: ``{name: {seed: metrics}}`` (names in first-seen order)."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for res in results:
        rows.setdefault(res.run.name, {})[res.run.seed] = res.metrics
    return rows


def _cell(row: dict[str, Any], key: str, scale: float, digits: int, absent_below_zero: bool) -> str:
    mean, std = row["mean"].get(key), row["std"].get(key)
    if mean is None or (absent_below_zero and mean < 0):
        return "-"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


PEAK_MEMORY = "peak_mem_mib"  # the key of timing.json's peak memory (MiB), when the engine records it


def markdown_table(stats: Mapping[str, Mapping[str, Any]], columns: Sequence[str], *,
                   peak_memory: bool = False) -> str:
    """A markdown table of :func:`aggregate` output: one row per name, ``columns`` x100 to one
    decimal (``-`` where missing or negative: COCO's -1 for an empty size range) and
    ``train s/step``; ``mean ± std`` when a row has several seeds (its name then ends in
    ``(n=k)``), the plain value for one seed; a row with diverged seeds ends in ``(n=k; diverged:
    seeds ...)`` and its numbers leave them out. ``peak_memory`` adds a last column ``peak MiB``
    (``timing.json``'s ``peak_mem_mib``, whole MiB; ``-`` for a row whose runs lack it)."""
    extra = " peak MiB |" if peak_memory else ""
    lines = ["| model | " + " | ".join(columns) + " | train s/step |" + extra,
             "|---" * (len(columns) + 2 + bool(peak_memory)) + "|"]
    for name, row in stats.items():
        cells = [_cell(row, c, 100.0, 1, True) for c in columns]
        if row.get("diverged"):  # always say how many seeds the numbers are, then which diverged
            seeds = ", ".join(map(str, row["diverged"]))
            label = f"{name} (n={row['n']}; diverged: seed{'s' if len(row['diverged']) > 1 else ''} {seeds})"
        else:
            label = name if row["n"] <= 1 else f"{name} (n={row['n']})"
        memory = f" {_cell(row, PEAK_MEMORY, 1.0, 0, False)} |" if peak_memory else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_cell(row, 'sec_per_step', 1.0, 2, False)} |"
                     + memory)
    return "\n".join(lines)


def format_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = ("AP", "AP50", "APs", "APm", "APl"),
                 ) -> str:
    """The demo's table of one run per row: ``{name: metrics}`` -> :func:`markdown_table`."""
    return markdown_table(aggregate({name: {0: metrics} for name, metrics in rows.items()}), columns)


def results_json(results: Iterable[RunResult]) -> dict[str, Any]:
    """Per row: each seed's raw metrics, its run folder and status, and the aggregates."""
    results = list(results)
    stats = aggregate(by_name(results))
    rows: dict[str, Any] = {}
    for res in results:
        row = rows.setdefault(res.run.name, {"runs": {}, **stats[res.run.name]})
        row["runs"][str(res.run.seed)] = {"output_dir": str(res.run.output_dir), "kind": res.run.kind,
                                          "status": res.status, "metrics": res.metrics}
    return rows


def write_results(stem: str | os.PathLike, results: Sequence[RunResult], columns: Sequence[str],
                  header: str = "", *, peak_memory: bool = False) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (``header``, a blank line, the table) and ``<stem>.json``
    (:func:`results_json` with ``columns``); return both paths. The folder is created.
    ``peak_memory``: the table's optional peak memory column (:func:`markdown_table`)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(aggregate(by_name(results)), columns, peak_memory=peak_memory)
    md, js = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    md.write_text(f"{header}\n\n{table}\n" if header else f"{table}\n")
    js.write_text(json.dumps({"columns": list(columns), "rows": results_json(results)}, indent=1, default=str))
    return md, js
