"""``alignforge pipeline``: ChatGLM-RLHF's whole loop in one run dir, one folder per stage.

Stages, in order (:data:`STAGES`)::

    sft -> pairs -> label -> rm -> align -> rain -> eval -> report

* ``sft``: SFT of ``model`` on ``sft.data`` (:func:`alignforge.trainers.sft.train_sft`).
* ``pairs``: the SFT policy samples two different responses to each prompt of ``pairs.prompts``
  (:func:`alignforge.inference.pairs.generate_pairs`) -> ``pairs/pairs.jsonl``, unlabeled, in the import
  format of the annotation app.
* ``label``: preference labels, from ``label.source``:

  - ``file``: an existing preference file (any format :mod:`alignforge.data.readers` reads);
  - ``human``: the annotation app's export of the sampled pairs. Stop after sampling, annotate, and go on::

        alignforge pipeline CFG.yaml --until pairs
        alignforge annotate import RUN_DIR/pairs/pairs.jsonl      # then annotate in the web app
        alignforge annotate export --out labels.jsonl
        alignforge pipeline CFG.yaml label.source=human label.path=labels.jsonl --from label

  - ``ai``: a judge compares the two responses of each sampled pair twice, positions swapped (the
    pairwise judging of :func:`alignforge.eval.grading.judge_pairs`); a pair is labelled when both
    verdicts agree, ties and unparsable or failed verdicts are left out and counted.
    ``label.judge: local`` runs :class:`~alignforge.eval.judge.LocalJudge` on ``label.judge_model``
    (default: the SFT model); a URL uses :class:`~alignforge.eval.judge.JudgeClient` on that
    OpenAI-compatible endpoint (``label.judge_model`` names the model there).

  Every labelled pair is written with a ``source`` field: ``"human"`` (human export), ``"ai:<judge
  model>"`` (AI labels), or the file's own ``source`` (``file``). ``label/stats.json`` counts them.
* ``rm``: the reward model on the labels, from the SFT model (:func:`alignforge.trainers.rm.train_rm`);
  with ``rm.heldout_fraction > 0`` a seeded share of the labels is held out and the RM's accuracy on it
  written (:func:`alignforge.eval.rm_accuracy.rm_accuracy`, ``rm/heldout_accuracy.json``).
* ``align``: ``align.method``: ``dpo`` / ``ulma`` train on RM-labelled samples of the SFT policy
  (ChatGLM-RLHF: K samples per prompt of ``align.prompts``, best and worst by the RM,
  :func:`alignforge.inference.dpo_data.build_dpo_pairs`); ``ppo`` runs PPO on those prompts with the RM.
* ``rain``: RAIN answers of the SFT model on the eval prompt sets named in ``rain.sets``
  (:func:`alignforge.inference.rain.rain_file`); ``rain.enabled: false`` turns it off.
* ``eval``: greedy answers of the SFT and aligned policies on the eval prompt sets
  (:func:`alignforge.eval.responses.generate_responses`); refusal rate on ``eval.harmful`` and answered
  rate (1 - refusal rate) on ``eval.benign`` (:func:`alignforge.eval.harm.harm_report`, for RAIN too);
  the RM's mean score and the win rate of aligned (and RAIN) vs SFT by the stage's RM on
  ``eval.heldout`` (:mod:`alignforge.eval.winrate`). ``eval/summary.json`` holds the tables.
* ``report``: :func:`alignforge.eval.report.write_report` over the trainers' run dirs, the eval JSONs
  and the response files -> ``report/report.html``.

Bookkeeping. A stage runs in ``RUN_DIR/<stage>/``. At its start it writes ``stage.pending.json``
(its resolved config and inputs); when it finishes, ``stage.json`` (written atomically) =
``{stage, config, inputs, outputs, started_at, finished_at, seconds}``, where ``inputs`` maps each
input file to the sha256 of its content and each upstream stage to the sha256 of its ``stage.json``.
On a rerun a stage is

* skipped when its ``stage.json`` holds the same config and inputs;
* resumed when it has no ``stage.json`` but a ``stage.pending.json`` with the same config and inputs
  (it was interrupted): trainers run with ``train.resume=true`` and continue from their newest
  checkpoint, response files and RAIN outputs continue after their last complete line;
* otherwise run from scratch in an emptied folder (so that no old checkpoint is resumed). A rerun
  stage writes a new ``stage.json``, whose digest is an input of every stage after it: they rerun too.

``--from STAGE`` runs from that stage on (the stages before it must have finished: their
``stage.json`` gives their outputs); ``--until STAGE`` stops after it. Trainer checkpoints are deleted
when a stage finishes unless ``keep_checkpoints: true`` (PPO's hold the critic: ~2 GB on SmolLM2).

Each stage section carries the trainer's own config as a typed nested section
(``sft.trainer`` is an :class:`~alignforge.trainers.sft.SFTConfig`, ``rm.trainer`` an ``RMConfig``,
``align.dpo`` / ``align.ulma`` / ``align.ppo`` a ``DPOConfig`` / ``ULMAConfig`` / ``PPOConfig``, ``rain.search``
a ``RainConfig``), so ``key=value`` overrides reach every field (``sft.trainer.train.lr=1e-5``). The
pipeline sets in them what it wires: ``model.name_or_path``, ``data.train_files``, ``train.output_dir``,
``train.resume`` (and ``ppo.reward_model``); values given there for these keys are replaced.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from alignforge.config import load_config, valid_keys
from alignforge.errors import ConfigError, DataError, TrainingError
from alignforge.inference.rain import RainConfig
from alignforge.trainers.dpo import DPOConfig
from alignforge.trainers.ppo import PPOConfig
from alignforge.trainers.rm import RewardConfig, RMConfig
from alignforge.trainers.sft import SFTConfig
from alignforge.trainers.ulma import ULMAConfig

STAGES: tuple[str, ...] = ("sft", "pairs", "label", "rm", "align", "rain", "eval", "report")
STAGE_FILE = "stage.json"
PENDING_FILE = "stage.pending.json"
DEMO_PREFIX = "demo:"  # "demo:NAME" = the shipped file src/alignforge/resources/demo/NAME


# --------------------------------------------------------------------------- config


@dataclass
class PromptSet:
    """An eval prompt set (:func:`alignforge.eval.prompts.load_prompt_set`); ``path: null`` = not used."""

    path: Optional[str] = None
    kind: str = "jsonl"  # jsonl | advbench | hh | mtbench | alignbench
    categories: list[str] = field(default_factory=list)  # only these categories (empty: all)
    n: Optional[int] = None  # the first n prompts (after the category filter)


@dataclass
class SFTStage:
    data: str = "demo:sft_demos.jsonl"
    trainer: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class PairsStage:
    enabled: bool = True  # false: no sampling (e.g. label.source=file, whose pairs exist already)
    prompts: str = "demo:preferences.jsonl"  # any file data/readers reads as prompts
    limit: Optional[int] = None
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 128
    seed: int = 0
    max_tries: int = 4
    batch_size: int = 8


@dataclass
class LabelStage:
    source: Literal["human", "file", "ai"] = "file"
    path: Optional[str] = None  # human: the annotation app's export; file: a preference file
    judge: str = "local"  # ai: "local" (LocalJudge) or an OpenAI-compatible base URL
    judge_model: Optional[str] = None  # local: a model dir (default: the SFT model); URL: the model name
    judge_prompts: Optional[str] = None  # a judge_prompts.jsonl with pair-v2 (default: the built-in one)
    api_key_env: Optional[str] = None
    concurrency: int = 4
    max_tokens: int = 256


@dataclass
class RMStage:
    heldout_fraction: float = 0.0  # share of the labels held out for the RM accuracy (0: none)
    heldout_seed: int = 0
    trainer: RMConfig = field(
        default_factory=lambda: RMConfig(reward=RewardConfig(length_balance=False))  # small label sets
    )


@dataclass
class AlignStage:
    method: Literal["dpo", "ulma", "ppo"] = "dpo"
    # dpo / ulma: "sampled" = RM-labelled samples of the SFT policy (ChatGLM-RLHF); "labels" = the label
    # stage's pairs as they are (offline DPO on the preference data)
    pairs: Literal["sampled", "labels"] = "sampled"
    prompts: Optional[str] = None  # default: pairs.prompts
    limit: Optional[int] = None
    # dpo / ulma: K samples of the SFT policy per prompt, best and worst by the RM
    k: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 128
    min_gap: float = 0.0
    seed: int = 0
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ulma: ULMAConfig = field(default_factory=ULMAConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


@dataclass
class RainStage:
    enabled: bool = True
    sets: list[str] = field(default_factory=lambda: ["harmful", "benign"])  # of eval's prompt sets
    # search: the SFT model's self-evaluation (search.evaluator); rm: the rm stage's reward model
    evaluator: Literal["search", "rm"] = "search"
    search: RainConfig = field(default_factory=RainConfig)


@dataclass
class EvalStage:
    harmful: PromptSet = field(default_factory=PromptSet)
    benign: PromptSet = field(default_factory=PromptSet)
    heldout: PromptSet = field(default_factory=PromptSet)
    winrate_sets: list[str] = field(default_factory=lambda: ["heldout"])  # the RM's win rate vs SFT on these
    max_new_tokens: int = 128
    batch_size: int = 8
    tie_eps: float = 1e-6
    n_resamples: int = 1000


@dataclass
class ReportStage:
    title: str = "alignforge pipeline"
    n_examples: int = 8


@dataclass
class PipelineConfig:
    run_dir: str = "outputs/pipeline"
    model: str = "embedded"  # the base model: "embedded", an HF dir, a .gguf file or a hub id
    device: Optional[str] = None  # inference stages (pairs, labels, RAIN, eval); default CUDA if available
    keep_checkpoints: bool = False
    sft: SFTStage = field(default_factory=SFTStage)
    pairs: PairsStage = field(default_factory=PairsStage)
    label: LabelStage = field(default_factory=LabelStage)
    rm: RMStage = field(default_factory=RMStage)
    align: AlignStage = field(default_factory=AlignStage)
    rain: RainStage = field(default_factory=RainStage)
    eval: EvalStage = field(default_factory=EvalStage)
    report: ReportStage = field(default_factory=ReportStage)


_OTHER_KEYS = ("run_dir", "model", "device", "keep_checkpoints")


def _stage_list() -> str:
    return ", ".join(STAGES)


def check_stage(name: str, what: str) -> str:
    if name not in STAGES:
        raise ConfigError(f"{what}: unknown stage {name!r}; the stages are: {_stage_list()}")
    return name


def _check_top_keys(keys: list[str], where: str) -> None:
    for k in keys:
        if k not in STAGES and k not in _OTHER_KEYS:
            raise ConfigError(
                f"{where}: unknown stage or key {k!r}; the stages are: {_stage_list()} "
                f"(other top-level keys: {', '.join(_OTHER_KEYS)})"
            )


def load_pipeline_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """:class:`PipelineConfig` from YAML + ``key=value`` overrides; an unknown top-level key is an error
    that lists the stages, an unknown key inside a section one that lists that section's keys."""
    import yaml

    if path is not None:
        path = resolve_path(str(path))  # "demo:pipeline.yaml" = the demo's config
    if path is not None and Path(path).is_file():
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError:
            tree = None  # load_config reports it
        if isinstance(tree, dict):
            _check_top_keys([str(k) for k in tree], str(path))
    keys = set(valid_keys(PipelineConfig))
    for item in overrides:
        k = item.partition("=")[0].strip()
        if "=" not in item or k in keys:
            continue
        parts = k.split(".")
        _check_top_keys(parts[:1], f"override {item!r}")
        prefix = ""
        for i in range(len(parts) - 1, 0, -1):
            cand = ".".join(parts[:i]) + "."
            if any(v.startswith(cand) for v in keys):
                prefix = cand
                break
        listed = sorted(v for v in keys if v.startswith(prefix))
        raise ConfigError(f"unknown config key {k!r} in override {item!r}. Valid keys: {', '.join(listed)}")
    return load_config(PipelineConfig, path, list(overrides))


# --------------------------------------------------------------------------- digests and stage files


def resolve_path(p: str) -> str:
    """``demo:NAME`` -> the shipped demo file; anything else as given."""
    if p.startswith(DEMO_PREFIX):
        from importlib import resources

        return str(resources.files("alignforge").joinpath(f"resources/demo/{p[len(DEMO_PREFIX) :]}"))
    return p


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content, or of a directory's files (relative names and contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return "sha256:" + h.hexdigest()
    if not p.is_file():
        raise DataError("file not found", file=str(p))
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def model_digest(name: str) -> str:
    """A model's digest: its files' for a local path, else its name (``embedded``, a hub id)."""
    return file_digest(name) if Path(name).exists() else f"name:{name}"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the runner


@dataclass
class StageContext:
    """What a stage function gets: its folder, the pipeline config, upstream outputs, whether it resumes."""

    name: str
    dir: Path
    cfg: PipelineConfig
    upstream: dict[str, dict]  # stage -> its stage.json
    resume: bool

    def out(self, stage: str) -> dict:
        return self.upstream[stage]["outputs"]


@dataclass
class StagePlan:
    config: dict
    inputs: dict[str, str]
    detail: str = ""


def _train_cfg(cfg: Any, model: str, train_files: list[str], output_dir: Path) -> Any:
    """A copy of a trainer config with what the pipeline wires set (model, data, output dir, resume)."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name_or_path=model),
        data=dataclasses.replace(cfg.data, train_files=list(train_files)),
        train=dataclasses.replace(cfg.train, output_dir=str(output_dir), resume=True),
    )


def _upstream_digest(stage_dirs: dict[str, Path], name: str) -> str:
    return file_digest(stage_dirs[name] / STAGE_FILE)


def _eval_sets(cfg: PipelineConfig) -> dict[str, PromptSet]:
    sets = {k: getattr(cfg.eval, k) for k in ("harmful", "benign", "heldout")}
    return {k: dataclasses.replace(v, path=resolve_path(v.path)) for k, v in sets.items() if v.path}


def plan_stage(name: str, cfg: PipelineConfig, dirs: dict[str, Path]) -> StagePlan:
    """The stage's resolved config and input digests (upstream stages must have their stage.json)."""
    up = lambda *names: {f"stage:{n}": _upstream_digest(dirs, n) for n in names}  # noqa: E731
    run = Path(cfg.run_dir)
    if name == "sft":
        data = resolve_path(cfg.sft.data)
        tc = _train_cfg(cfg.sft.trainer, cfg.model, [data], run / "sft")
        return StagePlan(dataclasses.asdict(tc), {"data": file_digest(data), "model": model_digest(cfg.model)})
    if name == "pairs":
        if not cfg.pairs.enabled:
            if cfg.label.source != "file":
                raise ConfigError(f"pairs.enabled=false: label.source={cfg.label.source} labels the sampled pairs")
            return StagePlan({"enabled": False}, {}, "disabled")
        p = dataclasses.asdict(cfg.pairs)
        p["prompts"] = resolve_path(cfg.pairs.prompts)
        return StagePlan(p, {"prompts": file_digest(p["prompts"]), **up("sft")})
    if name == "label":
        lc = cfg.label
        conf = dataclasses.asdict(lc)
        if lc.source in ("human", "file"):
            if not lc.path:
                raise ConfigError(f"label.source={lc.source} needs label.path (a preference file)")
            conf = {"source": lc.source, "path": resolve_path(lc.path)}
            return StagePlan(conf, {"labels": file_digest(conf["path"])}, f"source={lc.source}")
        inputs = {**up("pairs")}
        if lc.judge == "local":
            inputs.update(up("sft") if lc.judge_model is None else {"judge_model": model_digest(lc.judge_model)})
        else:
            conf.pop("concurrency")
        if lc.judge_prompts:
            inputs["judge_prompts"] = file_digest(lc.judge_prompts)
        conf.pop("path")
        return StagePlan(conf, inputs, f"source=ai, judge={lc.judge}")
    if name == "rm":
        conf = {
            "heldout_fraction": cfg.rm.heldout_fraction,
            "heldout_seed": cfg.rm.heldout_seed,
            "trainer": dataclasses.asdict(_train_cfg(cfg.rm.trainer, "<sft model>", ["<labels>"], run / "rm")),
        }
        return StagePlan(conf, up("sft", "label"))
    if name == "align":
        a = cfg.align
        prompts = resolve_path(a.prompts or cfg.pairs.prompts)
        trainer = getattr(a, a.method)
        conf = {
            "method": a.method,
            "prompts": prompts,
            "limit": a.limit,
            "trainer": dataclasses.asdict(_train_cfg(trainer, "<sft model>", ["<data>"], run / "align")),
        }
        if a.method != "ppo" and a.pairs == "labels":
            conf.update(pairs="labels")
            return StagePlan(conf, up("sft", "rm", "label"), f"method={a.method}, pairs=labels")
        if a.method != "ppo":
            conf.update(
                k=a.k, temperature=a.temperature, max_new_tokens=a.max_new_tokens, min_gap=a.min_gap, seed=a.seed
            )
        return StagePlan(conf, {"prompts": file_digest(prompts), **up("sft", "rm")}, f"method={a.method}")
    if name == "rain":
        sets = _eval_sets(cfg)
        if cfg.rain.enabled:
            unknown = [s for s in cfg.rain.sets if s not in ("harmful", "benign", "heldout")]
            if unknown:
                raise ConfigError(f"rain.sets: unknown set {unknown[0]!r}; the eval sets are harmful, benign, heldout")
        used = {s: sets[s] for s in cfg.rain.sets if s in sets} if cfg.rain.enabled else {}
        conf = {
            "enabled": cfg.rain.enabled,
            "evaluator": cfg.rain.evaluator,
            "sets": {k: dataclasses.asdict(v) for k, v in used.items()},
            "search": dataclasses.asdict(cfg.rain.search),
        }
        inputs = {f"set:{k}": file_digest(v.path) for k, v in used.items()}
        if cfg.rain.enabled:
            inputs.update(up("sft"))
            if cfg.rain.evaluator == "rm":
                inputs.update(up("rm"))
        return StagePlan(conf, inputs, "" if cfg.rain.enabled else "disabled")
    if name == "eval":
        sets = _eval_sets(cfg)
        conf = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in ("harmful", "benign", "heldout")}
        conf["sets"] = {k: dataclasses.asdict(v) for k, v in sets.items()}
        inputs = {f"set:{k}": file_digest(v.path) for k, v in sets.items()}
        return StagePlan(conf, {**inputs, **up("sft", "rm", "align", "rain")})
    if name == "report":
        return StagePlan(dataclasses.asdict(cfg.report), up("sft", "rm", "align", "rain", "eval"))
    raise ConfigError(f"unknown stage {name!r}; the stages are: {_stage_list()}")


def run_pipeline(
    cfg: PipelineConfig,
    from_stage: str | None = None,
    until_stage: str | None = None,
    echo: Callable[[str], None] = print,
    print_report: bool = True,
) -> dict:
    """Run the stages from ``from_stage`` to ``until_stage`` (see the module docstring).

    Returns ``{stage: "done" | "skipped" | "resumed" | "kept"}`` plus ``report`` (the page's path) when the
    report stage ran."""
    first = STAGES.index(check_stage(from_stage, "--from")) if from_stage else 0
    last = STAGES.index(check_stage(until_stage, "--until")) if until_stage else len(STAGES) - 1
    if first > last:
        raise ConfigError(f"--from {from_stage} comes after --until {until_stage}; the stages are: {_stage_list()}")
    run = Path(cfg.run_dir)
    dirs = {s: run / s for s in STAGES}
    done: dict[str, dict] = {}
    status: dict[str, Any] = {}
    n = len(STAGES)
    for i, name in enumerate(STAGES):
        if i > last:
            break
        tag = f"[{i + 1}/{n}] {name}"
        if i < first:
            rec = _read_json(dirs[name] / STAGE_FILE)
            if rec is None:
                raise ConfigError(
                    f"--from {from_stage}: stage {name!r} has not finished ({dirs[name] / STAGE_FILE} is missing); "
                    f"run it first (e.g. without --from, or --from {name})"
                )
            done[name] = rec
            status[name] = "kept"
            echo(f"{tag} ... kept (before --from)")
            continue
        plan = plan_stage(name, cfg, dirs)
        conf, inputs = _jsonable(plan.config), plan.inputs
        label = f"{tag} ({plan.detail})" if plan.detail else tag
        rec = _read_json(dirs[name] / STAGE_FILE)
        if rec is not None and rec.get("config") == conf and rec.get("inputs") == inputs:
            done[name] = rec
            status[name] = "skipped"
            echo(f"{label} ... skipped (unchanged)")
            continue
        pending = _read_json(dirs[name] / PENDING_FILE)
        resume = (
            rec is None and pending is not None and pending.get("config") == conf and pending.get("inputs") == inputs
        )
        if not resume and dirs[name].exists():
            shutil.rmtree(dirs[name])  # changed inputs or config: no old checkpoint may be resumed
        dirs[name].mkdir(parents=True, exist_ok=True)
        write_json_atomic({"stage": name, "config": conf, "inputs": inputs}, dirs[name] / PENDING_FILE)
        started, t0 = _now(), time.perf_counter()
        ctx = StageContext(name, dirs[name], cfg, done, resume)
        outputs = _jsonable(STAGE_FUNCS[name](ctx))
        seconds = time.perf_counter() - t0
        rec = {
            "stage": name,
            "config": conf,
            "inputs": inputs,
            "outputs": outputs,
            "started_at": started,
            "finished_at": _now(),
            "seconds": round(seconds, 3),
        }
        if resume:
            rec["resumed"] = True
        write_json_atomic(rec, dirs[name] / STAGE_FILE)
        (dirs[name] / PENDING_FILE).unlink(missing_ok=True)
        done[name] = rec
        status[name] = "resumed" if resume else "done"
        echo(f"{label} ... {'resumed, ' if resume else ''}done in {seconds:.1f}s")
    if "report" in status and status["report"] != "kept":
        status["report_path"] = done["report"]["outputs"]["report"]
        if print_report:
            echo(f"report: {status['report_path']}")
    return status


# --------------------------------------------------------------------------- stages


def _drop_checkpoints(ctx: StageContext, output_dir: str | Path) -> None:
    if not ctx.cfg.keep_checkpoints:
        from alignforge.trainers.common import checkpoint_root

        shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)


def _summary_out(summary: dict) -> dict:
    hist = [h for h in summary.get("history", []) if "loss" in h]
    return {
        "model": summary["final_dir"],
        "steps": summary["step"],
        "first_loss": hist[0]["loss"] if hist else None,
        "final_loss": hist[-1]["loss"] if hist else None,
        "resumed_from": summary.get("resumed_from"),
    }


def stage_sft(ctx: StageContext) -> dict:
    from alignforge.trainers.sft import train_sft

    cfg = ctx.cfg
    tc = _train_cfg(cfg.sft.trainer, cfg.model, [resolve_path(cfg.sft.data)], ctx.dir)
    summary = train_sft(tc)
    _drop_checkpoints(ctx, ctx.dir)
    return _summary_out(summary)


def stage_pairs(ctx: StageContext) -> dict:
    from alignforge.inference.pairs import generate_pairs

    p = ctx.cfg.pairs
    if not p.enabled:
        return {"enabled": False}
    rep = generate_pairs(
        resolve_path(p.prompts),
        ctx.dir / "pairs.jsonl",
        model=ctx.out("sft")["model"],
        temperature=p.temperature,
        top_p=p.top_p,
        max_new_tokens=p.max_new_tokens,
        seed=p.seed,
        max_tries=p.max_tries,
        limit=p.limit,
        batch_size=p.batch_size,
        device=ctx.cfg.device,
    )
    if rep.written == 0:
        raise TrainingError(f"pairs: no prompt got two different responses ({rep.summary()})")
    return {"pairs": rep.out_path, "prompts": rep.prompts, "written": rep.written, "left_out": len(rep.failed)}


# The pair-v2 judge prompt of FastChat's MT-Bench (judge_prompts.jsonl), used when label.judge_prompts is unset.
PAIR_V2 = {
    "name": "pair-v2",
    "type": "pairwise",
    "system_prompt": (
        "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
        "to the user question displayed below. You should choose the assistant that follows the user's instructions "
        "and answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
        "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
        "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
        "order in which the responses were presented does not influence your decision. Do not allow the length of "
        "the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective "
        "as possible. After providing your explanation, output your final verdict by strictly following this "
        'format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
    ),
    "prompt_template": (
        "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's "
        "Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
    ),
    "output_format": "[[A]]",
}


def _question_text(prompt: list[dict]) -> str:
    """The judge's question: the user turn, or the whole conversation as ``Role: text`` lines."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def _make_label_judge(ctx: StageContext) -> Any:
    from alignforge.eval.grading import make_judge

    lc = ctx.cfg.label
    if lc.judge == "local":
        return make_judge(None, None, local_judge=lc.judge_model or ctx.out("sft")["model"], device=ctx.cfg.device)
    if not (lc.judge.startswith("http://") or lc.judge.startswith("https://")):
        raise ConfigError(f"label.judge must be 'local' or an http(s) URL, got {lc.judge!r}")
    return make_judge(lc.judge, lc.judge_model, lc.api_key_env, concurrency=lc.concurrency, cache=ctx.dir / "cache")


def _ai_labels(ctx: StageContext, out: Path) -> dict:
    from alignforge.annotate.service import read_pairs
    from alignforge.data.convert import write_jsonl
    from alignforge.eval.grading import JudgeRow, judge_pairs

    pairs_path = ctx.out("pairs")["pairs"]
    recs = read_pairs(pairs_path)
    prompts_file = ctx.cfg.label.judge_prompts
    if prompts_file is None:
        prompts_file = ctx.dir / "judge_prompts.jsonl"
        write_jsonl([PAIR_V2], prompts_file)
    judge = _make_label_judge(ctx)
    rows = []
    for r in recs:
        q = _question_text(r.prompt)
        rows.append(
            (
                JudgeRow(r.uid, r.category, [q], [r.response_a], line=r.line, file=str(pairs_path)),
                JudgeRow(r.uid, r.category, [q], [r.response_b], line=r.line, file=str(pairs_path)),
            )
        )
    outcomes, calls = judge_pairs(rows, judge, prompts_file, max_tokens=ctx.cfg.label.max_tokens)
    name = f"ai:{judge.model}"
    labelled, counts = [], {"ties": 0, "unparsable": 0, "failed": 0}
    for r, o in zip(recs, outcomes, strict=True):
        if o.status != "ok":
            counts[o.status] += 1
            continue
        if o.outcome == "tie":
            counts["ties"] += 1
            continue
        ch, rj = (r.response_a, r.response_b) if o.outcome == "win" else (r.response_b, r.response_a)
        row = {
            "id": r.uid,
            "prompt": r.prompt,
            "chosen": [{"role": "assistant", "content": ch}],
            "rejected": [{"role": "assistant", "content": rj}],
            "source": name,
        }
        if r.category is not None:
            row["category"] = r.category
        labelled.append(row)
    write_jsonl(labelled, out)
    (ctx.dir / "judgments.json").write_text(
        json.dumps([dataclasses.asdict(o) for o in outcomes], indent=1, ensure_ascii=False), encoding="utf-8"
    )
    if not labelled:
        raise TrainingError(
            f"label: the judge ({name}) labelled none of the {len(recs)} pairs of {pairs_path}: "
            f"{counts['ties']} ties, {counts['unparsable']} unparsable, {counts['failed']} failed verdicts "
            f"(see {ctx.dir / 'judgments.json'})"
        )
    return {"pairs": len(recs), "labelled": len(labelled), **counts, "judge": name, "judge_calls": calls["n"]}


def stage_label(ctx: StageContext) -> dict:
    from alignforge.data.convert import record_to_trl, write_jsonl
    from alignforge.data.readers import read_preference
    from alignforge.data.stats import compute_stats

    lc = ctx.cfg.label
    out = ctx.dir / "labels.jsonl"
    extra: dict = {}
    if lc.source == "ai":
        extra = _ai_labels(ctx, out)
    else:
        res = read_preference(resolve_path(lc.path))  # a bad record raises, naming file, line and field
        if not res.records:
            raise DataError("no preference pairs", file=resolve_path(lc.path))
        rows = []
        for r in res.records:
            if lc.source == "human":
                r = dataclasses.replace(r, label_source=r.label_source or "human")
            rows.append(record_to_trl(r))
        write_jsonl(rows, out)
    stats = compute_stats(out, None, kind="preference")
    write_json_atomic(stats, ctx.dir / "stats.json")
    return {"labels": str(out), "n": stats["pairs"], "by_source": stats["label_sources"], **extra}


def stage_rm(ctx: StageContext) -> dict:
    from alignforge.trainers.rm import train_rm

    labels = ctx.out("label")["labels"]
    rc = ctx.cfg.rm
    train_file, heldout_file = labels, None
    if rc.heldout_fraction > 0:
        from alignforge.data.convert import record_to_trl, write_jsonl
        from alignforge.data.readers import read_preference
        from alignforge.data.split import holdout_split

        if not rc.heldout_fraction < 1:
            raise ConfigError(f"rm.heldout_fraction must be in [0, 1), got {rc.heldout_fraction}")
        recs = read_preference(labels).records
        k = max(1, round(rc.heldout_fraction * len(recs)))
        if k >= len(recs):
            raise ConfigError(f"rm.heldout_fraction={rc.heldout_fraction} leaves no training pair of {len(recs)}")
        train_i, held_i = holdout_split(len(recs), k, rc.heldout_seed)
        train_file, heldout_file = ctx.dir / "train_pairs.jsonl", ctx.dir / "heldout_pairs.jsonl"
        write_jsonl((record_to_trl(recs[i]) for i in train_i), train_file)
        write_jsonl((record_to_trl(recs[i]) for i in held_i), heldout_file)
    tc = _train_cfg(rc.trainer, ctx.out("sft")["model"], [str(train_file)], ctx.dir)
    summary = train_rm(tc)
    _drop_checkpoints(ctx, ctx.dir)
    out = _summary_out(summary)
    if heldout_file is not None:
        from alignforge.eval.rm_accuracy import rm_accuracy

        res = rm_accuracy(
            summary["final_dir"],
            heldout_file,
            max_length=tc.data.max_length,
            device=ctx.cfg.device,
            progress=False,
            on_error="raise",
            out_path=ctx.dir / "heldout_accuracy.json",
        )
        out["heldout_accuracy"] = res["accuracy"]
        out["heldout_accuracy_file"] = str(ctx.dir / "heldout_accuracy.json")
        out["heldout_pairs"] = len(held_i)
    return out


def train_offline(method: str, tc: Any) -> dict:
    """DPO or ULMA on a preference file (ULMA reads each pair as a positive and a negative sample)."""
    if method == "dpo":
        from alignforge.trainers.dpo import train_dpo

        return train_dpo(tc)
    from alignforge.trainers.ulma import train_ulma

    return train_ulma(tc)


def stage_align(ctx: StageContext) -> dict:
    a = ctx.cfg.align
    sft_dir, rm_dir = ctx.out("sft")["model"], ctx.out("rm")["model"]
    prompts = resolve_path(a.prompts or ctx.cfg.pairs.prompts)
    out: dict = {"method": a.method}
    if a.method == "ppo":
        from alignforge.data.convert import write_jsonl
        from alignforge.data.readers import read_prompts
        from alignforge.trainers.ppo import train_ppo

        recs = read_prompts(prompts).records[: a.limit]
        data = ctx.dir / "ppo_prompts.jsonl"
        write_jsonl([{"prompt": r.prompt} for r in recs], data)
        tc = _train_cfg(a.ppo, sft_dir, [str(data)], ctx.dir)
        tc = dataclasses.replace(tc, ppo=dataclasses.replace(tc.ppo, reward_model=rm_dir))
        summary = train_ppo(tc)
        hist = summary["history"]
        out.update(_summary_out(summary))
        out.update(reward_raw_start=hist[0].get("reward_raw"), reward_raw_end=hist[-1].get("reward_raw"))
    elif a.pairs == "labels":
        data = Path(ctx.out("label")["labels"])
        summary = train_offline(a.method, _train_cfg(getattr(a, a.method), sft_dir, [str(data)], ctx.dir))
        out.update(_summary_out(summary))
        out.update(pairs=str(data))
    else:
        from alignforge.inference.dpo_data import build_dpo_pairs

        data = ctx.dir / "rm_labelled_pairs.jsonl"
        rep = build_dpo_pairs(
            prompts,
            data,
            rm_dir,
            policy=sft_dir,
            k=a.k,
            temperature=a.temperature,
            max_new_tokens=a.max_new_tokens,
            seed=a.seed,
            min_gap=a.min_gap,
            limit=a.limit,
            progress=False,
            device=ctx.cfg.device,
        )
        if rep.written == 0:
            raise TrainingError(f"align: no RM-labelled pairs ({rep.summary()})")
        summary = train_offline(a.method, _train_cfg(getattr(a, a.method), sft_dir, [str(data)], ctx.dir))
        out.update(_summary_out(summary))
        out.update(pairs=str(data), pairs_written=rep.written, prompts=rep.prompts)
    _drop_checkpoints(ctx, ctx.dir)
    return out


def _set_prompts_file(ps: PromptSet, out: Path) -> list:
    """The set's prompts (:func:`load_prompt_set`), also written as a prompt file with ids."""
    from alignforge.data.convert import write_jsonl
    from alignforge.eval.prompts import load_prompt_set

    prompts = load_prompt_set(ps.kind, ps.path, categories=ps.categories or None, n=ps.n)
    write_jsonl([{"id": p.id, "prompt": p.prompt} for p in prompts], out)
    return prompts


def stage_rain(ctx: StageContext) -> dict:
    from alignforge.data.convert import write_jsonl
    from alignforge.inference.rain import rain_file

    if not ctx.cfg.rain.enabled:
        return {"enabled": False, "responses": {}}
    search = ctx.cfg.rain.search
    if ctx.cfg.rain.evaluator == "rm":
        search = dataclasses.replace(search, evaluator="rm", reward_model=ctx.out("rm")["model"])
    sets = _eval_sets(ctx.cfg)
    responses, stats = {}, {}
    for name in ctx.cfg.rain.sets:
        if name not in sets:
            continue
        prompts = _set_prompts_file(sets[name], ctx.dir / f"{name}_prompts.jsonl")
        raw = ctx.dir / f"{name}_rain_raw.jsonl"
        rep = rain_file(
            str(ctx.dir / f"{name}_prompts.jsonl"),
            str(raw),
            model=ctx.out("sft")["model"],
            cfg=search,
            device=ctx.cfg.device,
            progress=False,
        )
        rows = [json.loads(x) for x in raw.read_text(encoding="utf-8").splitlines() if x.strip()]
        out = ctx.dir / f"{name}.jsonl"
        write_jsonl(
            [
                {
                    "id": prompts[r["index"]].id,
                    "set": name,
                    "category": prompts[r["index"]].category,
                    "prompt": r["prompt"],
                    "responses": [r["response"]],
                    "response": r["response"],
                    "iterations": r["iterations"],
                    "wall_s": r["wall_s"],
                }
                for r in rows
            ],
            out,
        )
        responses[name] = str(out)
        stats[name] = {"prompts": rep["prompts"], "mean_wall_s": rep["mean_wall_s"]}
    return {"enabled": True, "responses": responses, "stats": stats}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def stage_eval(ctx: StageContext) -> dict:
    from alignforge.eval.grading import match_rows, read_judge_rows
    from alignforge.eval.harm import harm_report
    from alignforge.eval.responses import generate_responses
    from alignforge.eval.winrate import rm_outcomes, winrate_report

    e = ctx.cfg.eval
    sets = _eval_sets(ctx.cfg)
    if not sets:
        raise ConfigError("eval: no prompt set configured (eval.harmful.path, eval.benign.path, eval.heldout.path)")
    policies = {"sft": ctx.out("sft")["model"], "aligned": ctx.out("align")["model"]}
    files: dict[str, dict[str, str]] = {p: {} for p in policies}
    for pol, model in policies.items():
        for s, ps in sets.items():
            out = ctx.dir / "responses" / f"{pol}_{s}.jsonl"
            generate_responses(
                ps.kind,
                ps.path,
                model,
                out,
                categories=ps.categories or None,
                n=ps.n,
                max_new_tokens=e.max_new_tokens,
                temperature=0.0,
                batch_size=e.batch_size,
                device=ctx.cfg.device,
                progress=False,
            )
            files[pol][s] = str(out)
    rain = ctx.out("rain").get("responses") or {}
    if rain:
        files["rain"] = dict(rain)
    tables, eval_files = [], []
    refusal_rows = []
    for pol, f in files.items():
        if "harmful" not in f and "benign" not in f:
            continue
        row: dict[str, Any] = {"policy": pol}
        harmful, benign = f.get("harmful"), f.get("benign")
        if harmful is not None:
            rep = harm_report(harmful, benign, n_resamples=e.n_resamples)
            path = ctx.dir / f"harm_{pol}.json"
            write_json_atomic(rep, path)
            eval_files.append(str(path))
            h = rep["harmful"]
            row.update(harmful_n=h["n"], refusal_rate=h["n_refused"] / h["n"])
            if "benign" in rep:
                b = rep["benign"]
                row.update(benign_n=b["n"], answered_rate=1 - b["n_refused"] / b["n"])
        else:
            rep = harm_report(benign, n_resamples=e.n_resamples)  # only the refusal count of the benign answers
            b = rep["harmful"]
            row.update(benign_n=b["n"], answered_rate=1 - b["n_refused"] / b["n"])
        refusal_rows.append(row)
    if refusal_rows:
        cols = ["policy", "harmful_n", "refusal_rate", "benign_n", "answered_rate"]
        tables.append({"title": "refusal (harmful set) and answered rate (benign set)", "columns": cols,
                       "rows": [{c: r.get(c) for c in cols} for r in refusal_rows]})  # fmt: skip
    rm_rows, win_rows = [], []
    wsets = [w for w in e.winrate_sets if w in sets]
    if wsets:
        rm_dir = ctx.out("rm")["model"]

        def rows(f: dict) -> list:  # ids are per file: prefix the set's name
            return [dataclasses.replace(r, id=f"{w}:{r.id}") for w in wsets for r in read_judge_rows(f[w])]

        base = rows(files["sft"])
        for pol, f in files.items():
            if pol == "sft" or any(w not in f for w in wsets):
                continue
            pairs = match_rows(rows(f), base)
            outcomes = rm_outcomes(pairs, rm_dir, eps=e.tie_eps, device=ctx.cfg.device)
            rep = winrate_report(outcomes, pairs, n_resamples=e.n_resamples)
            rep.update(rm=rm_dir, sets=wsets)
            write_json_atomic(rep, ctx.dir / f"winrate_{pol}_vs_sft.json")
            if not rm_rows:
                rm_rows.append({"policy": "sft", "n": len(outcomes), "rm_mean": _mean([o.score_b for o in outcomes])})
            rm_rows.append({"policy": pol, "n": len(outcomes), "rm_mean": _mean([o.score_a for o in outcomes])})
            ov = rep["overall"]
            win_rows.append(
                {
                    "policy": f"{pol} vs sft",
                    "n": ov["n"],
                    "win": ov["win"],
                    "tie": ov["tie"],
                    "loss": ov["loss"],
                    "win_rate": ov["win_rate_adjusted"]["value"],
                    "length_controlled": rep["length_controlled"]["lc_win_rate"],
                }
            )
    if rm_rows:
        on = " + ".join(wsets)
        tables.append({"title": f"reward-model score on the {on} prompts (mean)", "rows": rm_rows})
        tables.append({"title": f"win rate against SFT by the reward model on the {on} prompts", "rows": win_rows})
    summary_path = ctx.dir / "summary.json"
    write_json_atomic({"tables": tables}, summary_path)
    return {
        "summary": str(summary_path),
        "eval_files": [str(summary_path), *eval_files],
        "responses": files,
        "refusal": refusal_rows,
        "rm": rm_rows,
        "winrate": win_rows,
    }


def stage_report(ctx: StageContext) -> dict:
    from alignforge.eval.report import write_report

    runs = [Path(ctx.out(s)["model"]).parent for s in ("sft", "rm", "align")]
    runs = [r for r in runs if (r / "metrics.jsonl").is_file()]
    ev = ctx.out("eval")
    evals = list(ev["eval_files"])
    heldout = ctx.out("rm").get("heldout_accuracy_file")
    if heldout:
        evals.append(heldout)
    responses = [f for per in ev["responses"].values() for f in per.values()]
    out = ctx.dir / "report.html"
    write_report(runs, out, evals, responses, n_examples=ctx.cfg.report.n_examples, title=ctx.cfg.report.title)
    return {"report": str(out)}


STAGE_FUNCS: dict[str, Callable[[StageContext], dict]] = {
    "sft": stage_sft,
    "pairs": stage_pairs,
    "label": stage_label,
    "rm": stage_rm,
    "align": stage_align,
    "rain": stage_rain,
    "eval": stage_eval,
    "report": stage_report,
}
