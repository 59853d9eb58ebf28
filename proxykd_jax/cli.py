"""One entry point, one subcommand per pipeline stage.

    proxykd <stage> --config=configs/demo.py [--config.model.num_layers=4 ...]
    proxykd <stage> --help          the config fields the stage reads, with defaults and comments
    python -m proxykd_jax <stage> --config=configs/llama.py:7b

The entry point parses flags, validates the config, starts jax.distributed when the config asks
for it, logs the devices, builds the run context (mesh, paths, overwrite rule, run-directory lock)
and runs the stage (`proxykd_jax.stages`). Every expected failure (`errors.ProxyKDError` and its
family; a full disk or a device out of memory, `exhaustion.py`) prints one line, `error: proxykd <stage>:
<sentence>`, and exits 2; a diverged run, or a process of a multi-process run whose peer died, exits 1; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import logging
import os
import pathlib
import signal
import sys
import threading

from proxykd_jax.errors import ConfigError, ProxyKDError, ResourceExhausted, one_line
from proxykd_jax.stages import STAGES

# commands beside the stages: (name, one-line description)
COMMANDS = {
    "plan": "Will this config fit this mesh? Memory and FLOPs of every stage's step, ahead of time.",
    "status": "Where does this run stand? Each stage's artifact, its progress, and what the next run would do.",
}
USAGE = (
    "usage: proxykd <stage> --config=CONFIG_FILE[:ARG] [--config.FIELD=VALUE ...]\n\nstages:\n"
    + "\n".join(f"  {name:<10} {stage.doc}" for name, stage in STAGES.items())
    + "\n\nother commands:\n"
    + "\n".join(f"  {name:<10} {doc}" for name, doc in COMMANDS.items())
    + "\n\n`proxykd <stage> --help` lists the config fields a stage reads; `proxykd plan --help` the plan's flags;"
    + " `proxykd status --help` what status shows."
)


class UserError(ConfigError):
    """Bad command-line input: printed as one sentence, no traceback."""


def _mark_failed(code: int) -> None:
    """Tells the other processes of a multi-process run that this one stops with an error and exit status `code`
    (`parallel.distributed.failed`: they stop too, rather than hang in a collective it left; it exits with `code`
    where one of them ends the run first); nothing to do where jax.distributed never started (the module is
    imported only to start it)."""
    started = sys.modules.get("proxykd_jax.parallel.distributed")
    if started is not None:
        started.failed(code)


class PeerLost(RuntimeError):
    """Another process of a multi-process run is gone mid-step: printed as one sentence, exit 1 at once. `why`
    is what the run's other processes are told (`parallel.distributed.lost`)."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def stage_help(stage: str) -> str:
    """The config groups `stage` reads, each field with its default and one-line comment."""
    from proxykd_jax import config as config_lib
    from proxykd_jax.context.artifacts import flatten

    cfg, docs = config_lib.base_config(), config_lib.field_docs()
    groups = STAGES[stage].groups or tuple(cfg.keys())
    lines = [
        f"proxykd {stage}: {STAGES[stage].doc}",
        "",
        f"usage: proxykd {stage} --config=CONFIG_FILE[:ARG] [--config.FIELD=VALUE ...]",
        "",
        "config fields it reads (defaults before a config file changes them):",
    ]
    for group in groups:
        lines.append(f"  {group}:")
        for key, value in flatten({group: cfg[group].to_dict()}).items():
            lines.append(f"    --config.{key}={value!r}")
            lines.append(f"        {docs.get(key, '')}")
    return "\n".join(lines)


def _config_argument(argv: list[str]) -> str | None:
    """The value of the last `--config=X` (or `--config X`) in `argv`, as absl will read it."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _get_config_arity(path: pathlib.Path) -> tuple[int, int] | None:
    """(most, fewest) positional arguments `get_config` of the config file at `path` takes (read, not
    run; most is 99 with *args); None when the file defines no get_config."""
    import ast

    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and node.name == "get_config":
            params = node.args.posonlyargs + node.args.args
            return (99 if node.args.vararg else len(params)), len(params) - len(node.args.defaults)
    return None


def check_config_file(stage: str, value: str) -> None:
    """Refuses, with one sentence, a --config value that names no readable config file."""
    path_text, has_arg, arg = value.partition(":")
    path = pathlib.Path(path_text)  # as ml_collections opens it: relative to the working directory
    example = "for example --config=configs/demo.py or --config=configs/llama.py:7b,70b"
    if not path_text:
        raise UserError(f"`proxykd {stage}` got an empty --config; give a config file ({example}).")
    if not path.is_file():
        what = "is a folder, not a config file" if path.is_dir() else "does not exist"
        raise UserError(f"config file {path_text} {what}; give --config=PATH of a config file ({example}).")
    try:
        arity = _get_config_arity(path)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path_text} cannot be read ({e}); give a readable Python config file.") from None
    except SyntaxError as e:
        raise UserError(
            f"config file {path_text} line {e.lineno}: {e.msg}; fix the Python syntax of the config file."
        ) from None
    if arity is None:
        raise UserError(f"config file {path_text} defines no get_config() function; a config file must define one.")
    most, fewest = arity
    if has_arg and most == 0:
        raise UserError(f"config file {path_text} takes no argument after ':' (got {arg!r}); use --config={path_text}.")
    if not has_arg and fewest > 0:
        raise UserError(
            f"config file {path_text} needs an argument after ':' (--config={path_text}:ARG); its docstring says which."
        )


def _config_file_error(value: str, message: str) -> str:
    """One sentence from ml_collections' 'Error whilst parsing config file: <traceback>' message:
    the exception that get_config() raised, without the traceback."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    last = lines[-1] if lines else message
    name, _, detail = last.partition(": ")
    path_text, has_arg, arg = value.partition(":")
    detail = (detail or last).removeprefix(f"{path_text}: ").rstrip(".")
    where = f"config file {path_text} with the argument {arg!r}" if has_arg else f"config file {path_text}"
    return f"{where} failed ({name}: {detail}); fix the argument after ':' (see the file's docstring)."


def _config_load_error(value: str | None, err: OSError) -> str:
    """One sentence for the OSError ml_collections defers from loading the config file."""
    cause = err.__cause__ or err
    return (
        f"config file {value} cannot be loaded ({type(cause).__name__}: {one_line(cause)}); check the path and "
        "the files its get_config() reads."
    )


def _overrides(argv: list[str]) -> list[tuple[str, str | None]]:
    """(dotted field, value or None when not given with '=') of each `--config.FIELD[=VALUE]` in `argv`."""
    out = []
    for arg in argv:
        name, eq, raw = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name.startswith(("config.", "noconfig.")):
            out.append((name.split(".", 1)[1], raw if eq else None))
    return out


def _plain_config(value: str):
    """The config file `value` (`path[:arg]`) loaded without overrides (a failed override leaves none;
    ml_collections would apply the overrides in sys.argv again), or None where it does not load."""
    import runpy

    path_text, has_arg, arg = value.partition(":")
    try:
        get_config = runpy.run_path(path_text)["get_config"]
        return get_config(arg) if has_arg else get_config()
    except Exception:  # pylint: disable=broad-except  # it did not load: the override's message stands
        return None


def _unknown_field(cfg, argv: list[str]) -> str | None:
    """The sentence for the first override in `argv` that names no field of `cfg` (None: all exist, or no cfg)."""
    import difflib

    for field, _ in _overrides(argv) if cfg is not None else ():
        node, done = cfg, []
        for part in field.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                near = difflib.get_close_matches(part, keys, n=1)
                hint = f" (did you mean --config.{'.'.join(done + near)}?)" if near else ""
                return f"--config.{field} names no config field{hint}"
            node, done = node[part], done + [part]
    return None


def _check_tuple_overrides(cfg, argv: list[str]) -> None:
    """Refuses a tuple field's override that looks like several elements but is not a Python tuple
    (ml_collections would silently keep it as one string, `(a,b)` -> `('(a,b)',)`)."""
    import ast

    from proxykd_jax.config import get_field

    for field, raw in _overrides(argv):
        if (
            not isinstance(get_field(cfg, field), tuple)
            or raw is None
            or not (raw.startswith(("(", "[")) or "," in raw)
        ):
            continue
        try:
            ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise UserError(
                f"--config.{field}={raw} is not a tuple: quote each string element, e.g. "
                f"--config.{field}=\"('a', 'b')\" (or give the flag once per element)."
            ) from None


def _none_overrides(cfg, argv: list[str]) -> None:
    """`--config.FIELD=None` on a tuple field (`model.rope_scaling`): ml_collections parses it as `(None,)`, which
    no such field takes; it means None, as in a config file."""
    from proxykd_jax.config import get_field

    for field, raw in _overrides(argv):
        if raw is not None and raw.strip() == "None" and get_field(cfg, field) == (None,):
            *groups, leaf = field.split(".")
            node = cfg
            for group in groups:
                node = node[group]
            node[leaf] = None


def _deferred_load_error(flag_values) -> OSError | None:
    """The OSError of a config file that failed to load (ml_collections keeps it in the flag's value)."""
    try:
        loaded = flag_values["config"].value
        if loaded is not None:
            loaded.keys()
    except OSError as e:
        return e
    except Exception:  # pylint: disable=broad-except  # any other state: not a deferred load failure
        return None
    return None


def load_config(stage: str, argv: list[str]):
    """The config of `--config=FILE[:ARG]` and its `--config.FIELD=VALUE` overrides in `argv` (locked);
    one sentence (`UserError`) for a missing or broken file, an unknown or ill-typed field, a stray argument."""
    from absl import flags
    from ml_collections import config_flags

    value = _config_argument(argv)
    if value is not None:  # a missing file or a bad ':ARG' gets its sentence before absl parses
        check_config_file(stage, value)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Config file (`path.py` or `path.py:arg`).", flag_values=flag_values, lock_config=True
    )
    try:
        rest = flag_values(["proxykd"] + argv)[1:]
    except OSError as e:  # raised where an override first touches a config that failed to load
        raise UserError(_config_load_error(value, e)) from None
    except (flags.Error, AttributeError, KeyError, TypeError) as e:  # TypeError: a field under a str field
        deferred = _deferred_load_error(flag_values)
        if deferred is not None:  # an override named a field of a config that failed to load
            raise UserError(_config_load_error(value, deferred)) from None
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # str(KeyError) is a repr
        if value is not None and "Error whilst parsing config file" in msg:
            raise UserError(_config_file_error(value, msg)) from None
        msg = (_unknown_field(_plain_config(value), argv) if value is not None else None) or one_line(msg)
        raise UserError(
            f"bad config override ({msg}); `proxykd {stage if stage in STAGES else '<stage>'} --help` lists the "
            "fields and their meaning."
        ) from None
    if rest:  # absl leaves what is no flag: `--config.run.overwrite False` would silently mean True
        raise UserError(
            f"`proxykd {stage}` got the stray argument {rest[0]!r}; give every value with '=' "
            "(--config.FIELD=VALUE, e.g. --config.run.overwrite=False)."
        )
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags; ours live in flag_values
    cfg = flag_values.config
    if cfg is None:
        raise UserError(f"`proxykd {stage}` needs --config=PATH (for example --config=configs/demo.py).")
    try:  # ml_collections defers an OSError of loading the file (or of get_config) to the first access
        cfg.keys()
    except OSError as e:
        raise UserError(_config_load_error(value, e)) from None
    _check_tuple_overrides(cfg, argv)
    _none_overrides(cfg, argv)
    return cfg


def _run_stage(stage: str, argv: list[str]) -> int:
    cfg = load_config(stage, argv)
    from proxykd_jax import exhaustion

    exhaustion.quiet_background_reports()
    try:
        return _run_loaded(stage, cfg)
    except Exception as e:  # a full disk or device memory, a lost peer process: one line; anything else is re-raised
        line = exhaustion.explain(stage, e, cfg=cfg, argv=argv)
        if line is None and "jax" in sys.modules:
            from proxykd_jax.parallel import distributed

            if said := distributed.lost_peer(e):
                import jax

                raise PeerLost(
                    f"process {jax.process_index()} of {jax.process_count()} lost the others mid-step ({said}): "
                    "another process of this run stopped, and its own log says why; once that is fixed, run the "
                    "same command on every process to resume from the last checkpoint.",
                    why=f"process {jax.process_index()}'s collective broke mid-step: {said}",
                ) from e
        if line is None:
            raise
        gc.collect()  # the writes a failed save left unfinished report now, filtered, not while Python shuts down
        raise ResourceExhausted(line) from e


def _run_loaded(stage: str, cfg) -> int:
    from proxykd_jax import config as config_lib
    from proxykd_jax import context, stages

    config_lib.validate(cfg, stage)  # fields and input paths first: no jax start-up for a typo
    context.preflight(cfg, stage)  # the upstream artifacts the stage reads
    from proxykd_jax.parallel import distributed

    why = stages.STAGES[stage].one_process
    # A TPU VM's metadata says what the machine is, not how this command was started: a one-process stage
    # run on one host of a pod slice is right, so only a launcher's environment counts for it.
    workers = distributed.no_tpu_workers if why else distributed.tpu_vm_workers
    try:
        plan = distributed.resolve_distributed(cfg.mesh.distributed, tpu_workers=workers)
    except ValueError as e:
        raise UserError(str(e)) from None
    if why and plan.several:  # every process stops alike, before any of them connects to the others
        raise UserError(
            f"`proxykd {stage}` runs as one process ({why}), and this run starts {plan.num_processes or 'several'} "
            f"processes ({plan.mode} start-up); run it once on one host, without NUM_PROCESSES or a multi-host "
            "launcher (prior and the model stages align, posterior, distill, eval and export run on all of them)."
        )
    distributed.maybe_initialize_distributed(cfg.mesh.distributed, plan=plan, label=f"proxykd {stage}")
    import jax

    # the mesh against the devices, batch sizes against the mesh: all before the run directory exists
    config_lib.validate(cfg, stage, num_devices=jax.device_count(), process_count=jax.process_count())
    groups = stages.STAGES[stage].groups
    with context.create(cfg, stage, on_mesh=not groups or "mesh" in groups) as ctx:
        stages.run_stage(stage, ctx)
    return 0


def _run_plan(argv: list[str]) -> int:
    """`proxykd plan`: its own flags (`plan.arguments`), then the config as a stage reads it."""
    from proxykd_jax import plan

    known, rest = plan.arguments().parse_known_args(argv)
    saved_argv, sys.argv = sys.argv, ["proxykd", "plan", *rest]  # ml_collections reads overrides from sys.argv
    try:
        cfg = load_config("plan", rest)
        _print(plan.run(cfg, known))
    except (ProxyKDError, ValueError) as e:
        print(f"error: proxykd plan: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return 0


def _print(text: str) -> None:
    """`print` that tolerates a closed pipe (`proxykd distill --help | head`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:  # the reader is gone: drop the rest quietly (Python's own exit flush included)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _in_gc_callback(frame) -> bool:
    """Whether `frame` runs inside a garbage-collector callback (jax registers one)."""
    codes = {getattr(callback, "__code__", None) for callback in gc.callbacks} - {None}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _raise_interrupt(signum, frame) -> None:
    """Ctrl-C and SIGTERM (kill, scancel, a batch system's time limit) as KeyboardInterrupt: the stage's
    context managers then release the run-directory lock. Python prints and drops an exception raised in a
    garbage-collector callback (jax's runs often while a stage starts), and the stage would run on: there
    the signal is sent again, to arrive once the callback has returned."""
    if _in_gc_callback(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "httpx2", "httpcore", "absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print(USAGE)
        sys.exit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage == "plan":  # ahead-of-time memory/FLOPs plan of every stage's step (proxykd_jax/plan.py)
        sys.exit(_run_plan(rest))
    if stage == "status":  # each stage's artifact and what the next run would do; read-only (proxykd_jax/status.py)
        from proxykd_jax import status

        sys.exit(status.main(rest, load_config))
    if stage not in STAGES:
        choices = ", ".join([*STAGES, *COMMANDS])
        print(f"error: proxykd: unknown stage {stage!r}; choose one of: {choices}.", file=sys.stderr)
        sys.exit(2)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in rest):
        _print(stage_help(stage))
        sys.exit(0)
    # (a SIGINT the shell ignores, as for a background job, stays ignored)
    caught = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, _raise_interrupt) for s in caught}
    try:
        sys.exit(_run_stage(stage, rest))
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, and the shell's status for that signal
        name = str(e) if str(e) in ("SIGINT", "SIGTERM") else "SIGINT"
        _mark_failed(128 + signal.Signals[name].value)
        then = "the server stopped" if stage == "serve" else "run the same command again to resume"
        print(f"error: proxykd {stage}: interrupted ({name}); {then}.", file=sys.stderr)
        sys.exit(128 + signal.Signals[name].value)
    except (ProxyKDError, FileNotFoundError, FileExistsError) as e:
        # expected failures: one line, no traceback (anything else is a bug and keeps its traceback)
        _mark_failed(2)
        print(f"error: proxykd {stage}: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # train.loop.TrainingDiverged: the message names the step
        _mark_failed(1)
        print(f"error: proxykd {stage}: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except PeerLost as e:
        # jax's exit would wait at a shutdown barrier for the lost process until its heartbeat times out, then
        # abort with a C++ stack trace; the run-directory lock is released already (a save cut short is a
        # checkpoint's temporary folder, which the next run removes). The run's watch says "lost" (the others stop
        # at once, naming the cause; process 0, which holds jax's coordination service, waits for them first),
        # prints the line and exits 1; without a watch (one process) it returns. Ctrl-C and SIGTERM are ignored from
        # here on: raised out of that wait (two beats at most) they left a traceback instead of the line, and jax's
        # exit hook then waited for the lost process
        from proxykd_jax.parallel import distributed

        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        line = f"error: proxykd {stage}: {one_line(e)}"
        distributed.lost(e.why, line)
        print(line, file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except SystemExit as e:
        if e.code not in (0, None):
            _mark_failed(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException:  # a bug: its traceback, and the run's other processes told
        _mark_failed(1)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":  # python -m proxykd_jax.cli, as python -m proxykd_jax
    main()
