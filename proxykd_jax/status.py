"""`proxykd status --config=CFG [--config.FIELD=VALUE ...]`: where does this run stand?

One table, a row per stage in pipeline order (demo, choose and report where their folders exist; one distill row per
student folder the config names: its own, `distill.output` or student / student_sft by alpha, and the
alpha = 0 SFT baseline where its folder exists), each with:
  * state: `finished`, `unfinished` (", other settings" where its record was made from other settings or
    inputs), `not started`, or `not made by proxykd` (a folder without a record);
  * next run: what `proxykd <stage>` with this config would do: reuses, resumes, starts, refuses (the first
    changes are named as the refusal names them; a missing input, or collect's bad field, prompts file or API key,
    in the stage's own sentence), replaces (run.overwrite), or `running now`;
  * size on disk, and a detail: the record's summary of a finished artifact, the progress of an unfinished
    one where cheap to read (collect's samples, align's phases and distill's last checkpoint step from the
    checkpoint folders' names, posterior's pass-1 chunks and pass-2 shards, eval's scored models, choose's
    finished trials, the report's variant results), what changed, and an upstream artifact that is unfinished or
    has other settings.

The decisions are the stages' own (`context.artifacts.outlook`, which `open_artifact` acts on). Read-only: it
takes no lock (the header names a lock's holder: pid, host, stage, the artifact it writes, since, and whether it
is alive), writes nothing, loads no model and reads no weights (model folders are identified by `model_id`:
their small files and their weights' sizes and mtimes). Input files whose size or mtime changed since a record
was written are read again to hash them (`content_id`), quietly, by every status until a stage writes that
record again (status writes nothing): on a big corpus each can take a while.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import socket
import sys
import types

from proxykd_jax.context import check_run_dir, preflight
from proxykd_jax.context.artifacts import Outlook, outlook, run_relative
from proxykd_jax.context.lock import process_alive
from proxykd_jax.context.paths import STUDENT_SFT, RunPaths, student_name
from proxykd_jax.context.records import read_record, record_path
from proxykd_jax.context.specs import ARTIFACTS
from proxykd_jax.errors import ProxyKDError, one_line

ORDER = ("demo", "collect", "prepare", "prior", "align", "posterior", "distill", "eval", "export", "choose", "report")
WHERE_PRESENT = ("demo", "choose", "report")  # rows shown only where the artifact exists (another command makes them)
SHOWN_CHANGES = 3
USAGE = "usage: proxykd status --config=CONFIG_FILE[:ARG] [--config.FIELD=VALUE ...]\n\n" + __doc__.split("\n\n")[1]


@dataclasses.dataclass
class Row:
    stage: str
    artifact: str
    state: str = ""
    next: str = ""
    size: str = ""
    detail: list[str] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------ reading the run


def lock_holder(paths: RunPaths) -> tuple[str, tuple[str, str] | None]:
    """(one line on the run-directory lock, (stage, the artifact path it writes; "" from a lock that names none)
    of a live holder on this host, or None); reads only."""
    try:
        holder = json.loads(paths.lock.read_text())
    except FileNotFoundError:
        return "free", None
    except (OSError, ValueError):
        return f"{paths.lock} is being written or is damaged", None
    if not isinstance(holder, dict):
        return f"{paths.lock} is damaged", None
    pid, host, stage = holder.get("pid", "?"), str(holder.get("host", "?")), holder.get("stage", "?")
    artifact = holder.get("artifact") if isinstance(holder.get("artifact"), str) else ""
    artifact = str(paths.root / artifact) if artifact else ""  # (relative to the run directory, or whole)
    is_file = isinstance(stage, str) and stage in ARTIFACTS and ARTIFACTS[stage].is_file
    writing = f" writing {_label(pathlib.Path(artifact), paths, is_file)}" if artifact else ""
    who = f"`{stage}`{writing}, pid {pid}"
    since = f"since {holder.get('since', '?')}"
    if host != socket.gethostname():
        return f"held by {who} on host {host} {since} (not checkable from this host)", None
    if isinstance(pid, int) and process_alive(pid, holder.get("start_time")):
        return f"held by {who} on this host {since}", (str(stage), artifact)
    return f"stale: {who} ({since}) is gone; the next stage takes the lock over", None


def _size(parts: list[pathlib.Path]) -> int | None:
    """Bytes on disk of `parts` (files, or folders walked without following links); None when none exists."""
    total, seen = 0, False
    for part in parts:
        try:
            st = part.lstat()
        except OSError:
            continue
        seen = True
        if not part.is_dir() or part.is_symlink():
            total += st.st_size
            continue
        for root, _, files in os.walk(part):  # (a running stage may remove files meanwhile)
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass
    return total if seen else None


def human(n: int | None) -> str:
    """Bytes as B, KiB, MiB, GiB or TiB ("-" for None)."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def last_step(checkpoints: pathlib.Path) -> int | None:
    """The newest finished orbax checkpoint's step (a step folder gets its number once complete)."""
    try:
        return max((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()), default=None)
    except OSError:
        return None


def final_loss(folder: pathlib.Path) -> float | None:
    """The last logged loss in `folder`/metrics.jsonl (its last 16 KiB read)."""
    try:
        with open(folder / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - (16 << 10)))
            lines = f.read().splitlines()
    except OSError:
        return None
    for raw in reversed(lines):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("loss"), (int, float)):
            return float(rec["loss"])
    return None


def _prepared_samples(paths: RunPaths, split: str) -> int | None:
    try:
        return int(json.loads((paths.prepared / "manifest.json").read_text())["splits"][split]["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keys(path: pathlib.Path, final_only: bool = False) -> set[str]:
    """The `key`s of the whole JSON lines of a corpus (or of its failures file's final rows)."""
    keys = set()
    try:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):  # a line being written, or torn by a crash
                    continue
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("key"), str) and (row.get("final") or not final_only):
                    keys.add(row["key"])
    except OSError:
        pass
    return keys


# ------------------------------------------------------------------------------------ progress and summaries


def collect_progress(cfg, path: pathlib.Path) -> str:
    """Samples in the corpus of those this config asks for (the prompts file read, the corpus's keys)."""
    from proxykd_jax.teacher.prompts import CollectError, read_prompts, request_key, sampling_params

    have, declined = _keys(path), _keys(path.with_name(path.name + ".failures.jsonl"), final_only=True)
    ccfg = cfg.collect
    try:
        prompts = read_prompts(ccfg.prompts, ccfg.api)
    except CollectError:
        return f"{len(have)} samples in the corpus"
    params = sampling_params(ccfg)  # each sample's content key, as `teacher/client.py` asks for it
    wanted = {request_key(ccfg.model, p, params, s) for p in prompts for s in range(ccfg.samples_per_prompt)}
    out = f"{len(have & wanted)} of {len(wanted)} samples"
    return out + (f", {len(declined & wanted)} declined" if declined & wanted else "")


def align_progress(cfg, folder: pathlib.Path) -> str:
    """Phases done (their DONE markers) and the running phase's last checkpoint step."""
    from proxykd_jax.align.phases import is_done, phase_names

    names = phase_names(int(cfg.align.rounds))
    done = [n for n in names if is_done(folder / n)]
    out = f"{len(done)} of {len(names)} phases done"
    current = next((n for n in names if n not in done), None)
    if current is None:
        return out + "; exporting final/"
    step = last_step(folder / current / "checkpoints")
    total = int(cfg.align.sft_steps) if current == "sft" else (int(cfg.align.dpo_steps_per_round) or "?")
    return out + (f"; {current} at step {step} of {total}" if step else f"; {current} has no checkpoint yet")


def posterior_progress(cfg, paths: RunPaths, folder: pathlib.Path) -> str:
    """Pass 1's chunks kept (`bayes/pass1_log.py`), else pass 2's store shards and their samples."""
    from proxykd_jax.bayes import pass1_log

    samples = _prepared_samples(paths, "distill")
    if not (folder / "estimate.json").exists():
        chunks = 0
        while pass1_log.chunk_path(folder, 0, chunks).exists():  # process 0's chunks
            chunks += 1
        if samples is None:
            return f"pass 1: {chunks} chunks"
        batches = math.ceil(samples / max(1, int(cfg.posterior.batch_size)))
        return f"pass 1: {chunks} of ~{math.ceil(batches / pass1_log.chunk_batches(batches))} chunks"
    shards, written = sorted(folder.glob("shard-*.json")), 0
    for shard in shards:
        try:
            written += int(json.loads(shard.read_text())["num_samples"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    of = samples if samples is not None else "?"
    return f"pass 1 done; pass 2: {len(shards)} shard{'s' * (len(shards) != 1)}, {written} of {of} samples"


def report_progress(cfg, folder: pathlib.Path) -> str:
    """Variant results written of those the report's plan runs (`report.runner.Runner.planned`)."""
    from proxykd_jax.report.runner import Runner

    planned = Runner(types.SimpleNamespace(cfg=cfg), folder, None).planned()
    variants = [p for p in planned if p.name != "estimates.json"]
    return f"{sum(p.exists() for p in variants)} of {len(variants)} variant results"


def choose_progress(cfg, folder: pathlib.Path) -> str:
    """Trials whose student is finished, of those `choose.candidates` names (`choose.trials`)."""
    from proxykd_jax import choose

    planned = choose.trials(cfg)
    done = sum(
        bool((read_record(folder / t.name / student_name(t.cfg.distill), False) or {}).get("finished")) for t in planned
    )
    return f"{done} of {len(planned)} trials' students finished"


def progress(name: str, cfg, paths: RunPaths, path: pathlib.Path) -> str:
    """How far the unfinished artifact at `path` got, where that is cheap to read ("" elsewhere)."""
    if name == "collect":
        return collect_progress(cfg, path)
    if name == "align":
        return align_progress(cfg, path)
    if name == "posterior":
        return posterior_progress(cfg, paths, path)
    if name == "distill":
        step = last_step(path / "checkpoints")
        return f"step {step} of {cfg.train.steps} (last checkpoint)" if step else "no checkpoint yet"
    if name == "eval":
        scored = sorted(p.stem for p in (path / "scored").glob("*.json"))
        return f"scored: {', '.join(scored)}" if scored else "nothing scored yet"
    if name == "report":
        return report_progress(cfg, path)
    if name == "choose":
        return choose_progress(cfg, path)
    return ""


def summary(name: str, rec: dict, cfg, path: pathlib.Path) -> str:
    """A few words from a finished artifact's record summary."""
    s = rec.get("summary") or {}
    if name == "collect":
        declined = s.get("declined", 0)
        declined = sum(declined.values()) if isinstance(declined, dict) else int(declined or 0)
        return f"{s['done'] + s['already_done']} samples" + (f", {declined} declined" if declined else "")
    if name == "prepare":
        return f"{s['samples']} samples"
    if name == "prior":
        return f"{s['tokens']} tokens, {s['ngram_order']}-gram"
    if name == "align":
        # in training order (the record's keys are sorted: "round_000" < "sft"); round numbers are zero-padded
        phases = sorted((k for k in s if k != "init"), key=lambda k: (k != "sft", k))
        nll = [s[k]["heldout_nll"] for k in ("init", phases[-1]) if "heldout_nll" in s.get(k, {})]
        return f"{len(phases)} phase{'s' * (len(phases) != 1)}" + (
            f", held-out NLL {' -> '.join(f'{x:.3f}' for x in nll)}" if nll else ""
        )
    if name == "posterior":
        return f"{s['num_samples']} samples, kappa {s['kappa']:.3g}, N_max {s['n_max']:.3g}"
    if name == "distill":
        loss = final_loss(path)
        return f"{s['steps']} steps" + (f", final loss {loss:.4g}" if loss is not None else "")
    if name == "eval":
        return f"{len(s['models'])} models scored"
    if name == "export":
        return f"step {s['step']}"
    if name == "report":
        return report_progress(cfg, path)
    if name == "choose":
        return f"{cfg.choose.field}={s['chosen']} chosen of {s['values']} values"
    return ""


# ------------------------------------------------------------------------------------ the table


def _label(path: pathlib.Path, paths: RunPaths, is_file: bool) -> str:
    text = run_relative(path, paths)
    return text if is_file else text + "/"


def _next(look: Outlook, overwrite: bool) -> str:
    """What the next run does with the artifact (before the checks of a stage that starts)."""
    if look.waiting:
        return "refuses"
    if look.record is None:
        return ("replaces" if overwrite else "refuses") if look.foreign else "starts"
    if not look.changes:
        return "reuses" if look.record.get("finished") else "resumes"
    if not overwrite:
        return "refuses"
    redo = look.redo
    if redo is not None and redo.get("hash") == look.artifact.hash:
        return "reuses its finished redo" if redo.get("finished") else "resumes its redo"
    return "replaces"


# what `_next` says where `proxykd collect` goes on to check its fields, prompts file and key (`collect_refusal`)
_COLLECT_CHECKS = ("starts", "resumes", "replaces", "resumes its redo")


def collect_refusal(cfg, path: pathlib.Path) -> str:
    """The sentence `proxykd collect` refuses with before writing anything (a bad field, prompts file or API key:
    `teacher.client.check`, as the stage runs it for its corpus at `path`); "" where it would go on."""
    from proxykd_jax.teacher import client

    ccfg = cfg.collect.copy_and_resolve_references()
    ccfg.out = str(path)
    try:
        client.check(ccfg)
    except ProxyKDError as e:
        return one_line(e)
    return ""


def _changed(changes: list[str]) -> str:
    more = len(changes) - SHOWN_CHANGES
    return "changed: " + "; ".join(changes[:SHOWN_CHANGES]) + (f" (and {more} more)" if more > 0 else "")


def _redo_note(name: str, cfg, paths: RunPaths, look: Outlook) -> str:
    """One phrase on the redo beside the artifact (`.<name>.new`, written under run.overwrite)."""
    path, redo = look.artifact.path, look.redo
    beside = path.with_name(f".{path.name}.new")
    matches = redo.get("hash") == look.artifact.hash
    what = ("finished" if redo.get("finished") else "unfinished") + ("" if matches else ", other settings")
    done = progress(name, cfg, paths, beside) if matches and not redo.get("finished") else ""
    return f"a redo is beside it ({_label(beside, paths, look.artifact.is_file)}, {what}" + (
        f": {done})" if done else ")"
    )


def stage_row(name: str, cfg, paths: RunPaths, running=None) -> tuple[Row, Outlook | None]:
    """The row of stage `name` for `cfg`, and the outlook it was read from (None where that failed); `running`:
    (stage, artifact path) of the lock's live holder (`lock_holder`)."""
    spec = ARTIFACTS[name]
    path = spec.path(cfg, paths)
    row = Row(name, _label(path, paths, spec.is_file))
    companions = [path.with_name(path.name + s) for s in spec.companions] + [record_path(path, True)]
    row.size = human(_size([path] + (companions if spec.is_file else [])))
    try:
        look = outlook(name, cfg, paths)
    except ProxyKDError as e:  # an input that cannot be read
        row.state, row.next, row.detail = "unknown", "refuses", [one_line(e)]
        return row, None
    row.state, row.next, rec = look.state, _next(look, bool(cfg.run.overwrite)), look.record
    corpora = [pathlib.Path(p).expanduser() for p in str(cfg.data.corpus).split(",") if p]
    if name == "collect" and rec is None and corpora and path not in corpora:
        row.state, row.next, row.detail = "not used", "-", [f"prepare reads data.corpus={cfg.data.corpus}"]
        return row, look
    row.detail += [f"waits on {_label(p, paths, not p.is_dir())} (unfinished)" for p, _ in look.waiting]
    if look.foreign:
        row.detail.append("it has no record; run.overwrite=True replaces it")
    if rec is not None:
        try:
            text = summary(name, rec, cfg, path) if rec.get("finished") else progress(name, cfg, paths, path)
        except (KeyError, TypeError, ValueError, IndexError, OSError, ProxyKDError):
            text = ""  # a record of another version, or a folder being written
        row.detail += [text] if text else []
    if look.changes:
        row.detail.append(_changed(look.changes))
    if look.redo is not None:
        row.detail.append(_redo_note(name, cfg, paths, look))
    if row.next == "starts":
        try:
            preflight(cfg, name)
        except ProxyKDError as e:  # an upstream input that is missing
            row.next = "refuses"
            row.detail.append(one_line(e).rstrip(".").replace(f"{paths.root}/", ""))
    refusal = collect_refusal(cfg, path) if name == "collect" and row.next in _COLLECT_CHECKS else ""
    if refusal:
        row.next = "refuses"
        row.detail.append(refusal)
    if running and running[0] == name and running[1] in ("", str(path)) and row.state == "unfinished":
        row.next = "running now"
    return row, look


def _students(cfg, paths: RunPaths) -> list:
    """The configs of the student folders the config names: its own and, where its folder exists, the
    alpha = 0 SFT baseline (`student_sft`, as the demo distils it beside the Proxy-KD student)."""
    out = [cfg]
    if student_name(cfg.distill) != STUDENT_SFT and paths.student(STUDENT_SFT).exists():
        sft = cfg.copy_and_resolve_references()
        sft.distill.loss.alpha, sft.distill.output = 0.0, ""
        out.append(sft)
    return out


def stage_rows(cfg, running=None) -> list[Row]:
    """A row per stage in pipeline order (see the module docstring)."""
    paths = RunPaths.from_config(cfg)
    out, states, looks = [], {}, []
    for name in ORDER:
        if name in WHERE_PRESENT and not ARTIFACTS[name].path(cfg, paths).exists():
            continue
        for stage_cfg in _students(cfg, paths) if name == "distill" else [cfg]:
            row, look = stage_row(name, stage_cfg, paths, running)
            out.append(row)
            looks.append((row, look, stage_cfg))
            if look is not None:
                states[look.artifact.path] = row.state
    for row, look, stage_cfg in looks:  # an upstream artifact made with other settings: a rebuild makes this stale
        waiting = {p for p, _ in look.waiting} if look is not None else set()
        stale = [
            _label(upstream, paths, not upstream.is_dir())
            for upstream in ARTIFACTS[row.stage].inputs(stage_cfg, paths)
            if upstream not in waiting and states.get(upstream, "").endswith("other settings")
        ]
        if stale:
            row.detail.append(f"upstream {', '.join(stale)} {'has' if len(stale) == 1 else 'have'} other settings")
    return out


def table(rows: list[Row]) -> str:
    head = Row("stage", "artifact", "state", "next run", "size", ["detail"])
    cells = [[r.stage, r.artifact, r.state, r.next, r.size, "; ".join(d for d in r.detail if d)] for r in [head, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(5)) + "  " + c[5] for c in cells]
    return "\n".join(line.rstrip() for line in lines)


def run(cfg) -> str:
    """The status table of the run directory `cfg.run.dir` for `cfg` (reads only; see the module docstring)."""
    paths = RunPaths.from_config(cfg)
    check_run_dir(paths)
    if "demo" in cfg and (read_record(paths.demo) or {}).get("finished"):  # a demo run: its stages' settings
        from proxykd_jax.eval.benchmark import demo_settings

        cfg = cfg.copy_and_resolve_references()
        demo_settings(cfg, paths.demo)
    lock, running = lock_holder(paths)
    where = f"run directory {paths.root}" + ("" if paths.root.is_dir() else " (does not exist yet)")
    note = "next run: what `proxykd <stage>` with this config would do with its artifact"
    return f"{where}; lock: {lock}\n\n{table(stage_rows(cfg, running))}\n\n{note}."


def main(argv: list[str], load_config) -> int:
    """`proxykd status`: `load_config(command, argv)` is the CLI's (the config and overrides a stage takes)."""
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
        print(USAGE)
        return 0
    saved_argv, sys.argv = sys.argv, ["proxykd", "status", *argv]  # ml_collections reads overrides from sys.argv
    try:
        text = run(load_config("status", argv))
    except ProxyKDError as e:
        print(f"error: proxykd status: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `proxykd status ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
