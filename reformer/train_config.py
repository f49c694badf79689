"""``TrainConfig``: every option of a training run, validated; the command line fills it.

Python callers build it directly and pass it to :func:`reformer.train.run`::

    from reformer.train import run
    from reformer.train_config import TrainConfig
    trainer = run(TrainConfig(task="duplication", seq_len=64, vocab_size=16, depth=1, steps=200, out="runs/dup"))

``python -m reformer.train`` (the ``reformer-train`` script) parses its arguments with
:func:`build_parser` into the same dataclass (:meth:`TrainConfig.from_args`). Errors name the
field and its command-line option: a non-integer where an integer is expected is a
``TypeError``, a bad value a ``ValueError``. See docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .config import ATTENTIONS, CAUSAL_MODES, ReformerConfig, check_n_buckets
from .data import TASKS

# Options that define the model, the data and the batch: they must be the same when a run is
# resumed (a changed one is refused, naming it).
SETUP_FIELDS = ("task", "seq_len", "vocab_size", "text", "text_pattern", "max_bytes", "attention", "n_hashes",
                "bucket_size", "n_buckets", "causal_mode", "depth", "d_model", "n_heads", "d_ff", "ff_chunks", "axial_shape", "reversible",
                "dropout", "batch_size", "seed")
# Options that may change on resume: the new value is applied from the checkpoint's step on and logged.
SETTINGS_FIELDS = ("steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "grad_accum",
                   "log_every", "eval_every", "eval_batches", "save_every")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _label(name: str) -> str:
    """How an error names a field: ``stop_at (--stop-at)``."""
    return f"{name} ({_flag(name)})"


@dataclass(frozen=True)
class TrainConfig:
    """A training run: task, model (``ReformerConfig`` fields), optimisation, logging and checkpoints.

    Task: ``task`` (``"duplication"`` or ``"text"``), ``seq_len`` tokens per sequence,
    ``vocab_size`` (duplication: symbols incl. the separator 0), ``text`` (text: corpus file or
    folder; None = the Python standard library's sources), ``text_pattern`` (glob inside a
    ``text`` folder), ``max_bytes`` (text: corpus bytes read at most).

    Model: ``attention``, ``n_hashes``, ``bucket_size``, ``n_buckets`` (None = automatic from
    ``seq_len`` and ``bucket_size``; an even int = plain hashing; a tuple ``(n1, n2)`` or
    ``(n1, n2, n3)`` = factorised hashing), ``causal_mode`` (``"chunk"``, the default, or ``"bucket"``, see docs/lsh.md), ``depth``, ``d_model``, ``n_heads``,
    ``d_ff``, ``ff_chunks``, ``axial_shape`` (None = sinusoidal positions), ``reversible``,
    ``dropout``; see :class:`reformer.ReformerConfig` (the model is causal).

    Optimisation: ``steps`` optimizer steps on global batches of ``batch_size`` sequences (split
    over ranks, then into ``grad_accum`` micro-batches), AdamW with ``lr``, ``weight_decay`` (on
    matrices only), linear warm-up over ``warmup`` steps then cosine decay to
    ``min_lr_ratio * lr``, gradient clipping at ``grad_clip`` (0 = off); ``seed`` seeds the
    model initialisation, the data and the RNG stream; ``threads`` sets torch's intra-op
    threads (None = leave as is).

    Run folder: ``out`` (None = ``runs/<task>``) receives ``checkpoint.pt``, ``log.jsonl`` and,
    at the end, the exported model. ``log_every``/``eval_every`` (0 = never)/``save_every``
    steps; ``eval_batches`` validation batches per evaluation. ``resume``: False = new run
    (refused when ``out`` already holds one, unless ``overwrite``), True = continue from
    ``out/checkpoint.pt``, or a path of the checkpoint to continue from. ``stop_at``:
    checkpoint and return after this step (time slicing). ``export``: save the final model with
    ``ReformerLM.save_pretrained(out / "model")``.

    ``warmup > steps`` is allowed but warns (the learning rate never reaches ``lr``).
    """

    # task
    task: str = "duplication"
    seq_len: int = 1024
    vocab_size: int = 128
    text: Optional[Path] = None
    text_pattern: str = "*"
    max_bytes: int = 32 * 2**20
    # model
    attention: str = "lsh"
    n_hashes: int = 4
    bucket_size: int = 64
    n_buckets: Optional[Union[int, tuple[int, ...]]] = None
    causal_mode: str = "chunk"
    depth: int = 2
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 512
    ff_chunks: int = 1
    axial_shape: Optional[tuple[int, ...]] = None
    reversible: bool = True
    dropout: float = 0.0
    # optimisation
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: Optional[int] = None
    # run folder
    out: Optional[Path] = None
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 500
    resume: Union[bool, Path] = False
    overwrite: bool = False
    stop_at: Optional[int] = None
    export: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        for name in ("seq_len", "vocab_size", "max_bytes", "n_hashes", "bucket_size", "depth", "d_model",
                     "n_heads", "d_ff", "ff_chunks", "steps", "batch_size", "grad_accum", "log_every",
                     "eval_batches", "save_every"):
            _int(name, getattr(self, name), minimum=1)
        for name in ("warmup", "eval_every", "seed"):
            _int(name, getattr(self, name), minimum=0)
        for name in ("threads", "stop_at"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), minimum=1)
        _real("lr", self.lr, low=0.0)
        _real("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _real("weight_decay", self.weight_decay, low=0.0)
        _real("grad_clip", self.grad_clip, low=0.0)
        _real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        for name, choices in (("task", TASKS), ("attention", ATTENTIONS), ("causal_mode", CAUSAL_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{_label(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("reversible", "overwrite", "export"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{_label(name)} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.text_pattern, str):
            raise TypeError(f"{_label('text_pattern')} must be a str, got {self.text_pattern!r}")
        for name in ("text", "out"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, Path)):
                    raise TypeError(f"{_label(name)} must be a path or None, got {value!r}")
                set_(name, Path(value))
        if self.n_buckets is not None:
            try:
                set_("n_buckets", check_n_buckets(self.n_buckets))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{_label('n_buckets')}: {e} (command line: an even int like 16, or N1xN2 like "
                              f"4x4 for factorised hashing)") from None
        if self.axial_shape is not None:
            if not isinstance(self.axial_shape, (tuple, list)) or len(self.axial_shape) < 2:
                raise ValueError(f"{_label('axial_shape')} must be a tuple of at least 2 positive ints or None, "
                                 f"got {self.axial_shape!r}")
            for n in self.axial_shape:
                _int("axial_shape", n, minimum=1)
            set_("axial_shape", tuple(self.axial_shape))
        if not isinstance(self.resume, bool):
            if not isinstance(self.resume, (str, Path)):
                raise TypeError(f"{_label('resume')} must be a bool or a checkpoint path, got {self.resume!r}")
            set_("resume", Path(self.resume))
        if self.resume is not False and self.overwrite:
            raise ValueError("resume (--resume) and overwrite (--overwrite) exclude each other: resume continues "
                             "the run in the folder, overwrite deletes it")
        if self.warmup > self.steps:
            warnings.warn(f"warmup (--warmup) = {self.warmup} exceeds steps (--steps) = {self.steps}: the learning "
                          f"rate never reaches lr={self.lr}", UserWarning, stacklevel=3)

    @property
    def out_dir(self) -> Path:
        """The run folder: ``out``, or ``runs/<task>``."""
        return self.out if self.out is not None else Path("runs") / self.task

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint to resume from (``resume`` a path) or to write (``out_dir/checkpoint.pt``)."""
        return self.resume if isinstance(self.resume, Path) else self.out_dir / "checkpoint.pt"

    def model_config(self, vocab_size: int) -> ReformerConfig:
        """The ``ReformerConfig`` of this run (causal: both tasks are language modelling)."""
        return ReformerConfig(
            vocab_size=vocab_size, d_model=self.d_model, n_heads=self.n_heads, depth=self.depth, d_ff=self.d_ff,
            max_seq_len=self.seq_len, attention=self.attention, bucket_size=self.bucket_size,
            n_hashes=self.n_hashes, n_buckets=self.n_buckets, causal_mode=self.causal_mode, causal=True, reversible=self.reversible, ff_chunks=self.ff_chunks,
            axial_shape=self.axial_shape, dropout=self.dropout)

    def setup(self) -> dict[str, Any]:
        """The values of :data:`SETUP_FIELDS` as plain values (stored in checkpoints)."""
        return {name: _plain(getattr(self, name)) for name in SETUP_FIELDS}

    def settings(self) -> dict[str, Any]:
        """The values of :data:`SETTINGS_FIELDS` (stored in checkpoints)."""
        return {name: getattr(self, name) for name in SETTINGS_FIELDS}

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` (re-validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_args(cls, argv: Optional[Sequence[str]] = None) -> "TrainConfig":
        """Parse command-line strings (the options of ``python -m reformer.train --help``)."""
        parser = build_parser()
        return config_from_namespace(parser.parse_args(None if argv is None else [str(a) for a in argv]))


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{_label(name)} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{_label(name)} must be >= {minimum}, got {value}")
    return value


def _real(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
          high_open: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{_label(name)} must be a number, got {value!r}")
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        rng = f"> {low}" if high == math.inf and low_open else f">= {low}" if high == math.inf else f"in {lo}{low}, {high}{hi}"
        raise ValueError(f"{_label(name)} must be {rng} (and finite), got {value}")
    return float(value)


def _axial_shape(text: str) -> Optional[tuple[int, ...]]:
    if text.lower() == "none":
        return None
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints like 64,64 or 'none', got {text!r}")


def parse_n_buckets(text: str) -> Optional[Union[int, tuple[int, ...]]]:
    """``--n-buckets`` text: ``auto`` (None), an even int like ``16`` (plain hashing) or
    ``N1xN2`` / ``N1xN2xN3`` like ``4x4`` (factorised hashing); the values are checked by
    :class:`TrainConfig`."""
    if text.strip().lower() in ("auto", "none"):
        return None
    parts = text.lower().split("x")
    try:
        values = tuple(int(n) for n in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an even int like 16, N1xN2 like 4x4 or N1xN2xN3, or 'auto', "
                                         f"got {text!r}")
    if len(values) == 1:
        return values[0]
    if len(values) in (2, 3):
        return values
    raise argparse.ArgumentTypeError(f"must be an even int like 16, N1xN2 like 4x4 or N1xN2xN3, or 'auto', got {text!r}")


def format_n_buckets(n_buckets: Optional[Union[int, tuple[int, ...]]]) -> str:
    """The ``--n-buckets`` text of a value (inverse of :func:`parse_n_buckets`)."""
    if n_buckets is None:
        return "auto"
    return str(n_buckets) if isinstance(n_buckets, int) else "x".join(str(n) for n in n_buckets)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds ``(default: X)`` to an option's help unless the help already states its default or
    there is none to state (None, flags); examples in the epilog are kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or not action.option_strings:
            return text
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool):
            return text
        return f"{text} (default: %(default)s)".lstrip()


_DEFAULTS = TrainConfig.__dataclass_fields__


def _d(name: str) -> Any:
    return _DEFAULTS[name].default


EXAMPLES = """\
  python -m reformer.train --task duplication --seq-len 64 --vocab-size 64 --depth 1 --d-model 128 \\
      --d-ff 256 --attention lsh --bucket-size 8 --n-hashes 2 --steps 1000 --batch-size 16 --lr 2e-3
  python -m reformer.train --task text --seq-len 2048 --axial-shape 32,64 --ff-chunks 4 --d-model 128 \\
      --n-hashes 2 --batch-size 4 --steps 2000 --out runs/text
  python -m reformer.train ... --out runs/text --resume          # continue exactly where it stopped
  python -m reformer.train ... --out runs/text --resume --steps 4000 --lr 5e-4   # continue, longer, new lr
  torchrun --nproc_per_node=2 -m reformer.train ...              # data parallel (gloo on CPU)
"""


def build_parser() -> argparse.ArgumentParser:
    """The training command line; :func:`config_from_namespace` turns its result into a :class:`TrainConfig`."""
    p = argparse.ArgumentParser(prog="python -m reformer.train", formatter_class=_HelpFormatter,
                                description="Train a ReformerLM on long sequences (duplication or byte-level "
                                            "text). Options and run folders: docs/training.md.",
                                epilog="examples:\n" + EXAMPLES)
    t = p.add_argument_group("task")
    t.add_argument("--task", choices=TASKS, default=_d("task"), help="training task")
    t.add_argument("--seq-len", type=int, default=_d("seq_len"), help="tokens per sequence (up to 64K on CPU)")
    t.add_argument("--vocab-size", type=int, default=_d("vocab_size"),
                   help="duplication: symbols incl. the separator 0")
    t.add_argument("--text", type=Path, default=None,
                   help="text: corpus file or folder (default: the Python standard library's sources)")
    t.add_argument("--text-pattern", default=_d("text_pattern"), help="text: glob of files inside a --text folder")
    t.add_argument("--max-bytes", type=int, default=_d("max_bytes"), help="text: read at most this many corpus bytes")
    m = p.add_argument_group("model (ReformerConfig; fixed for the life of a run)")
    m.add_argument("--attention", choices=ATTENTIONS, default=_d("attention"), help="attention kind")
    m.add_argument("--n-hashes", type=int, default=_d("n_hashes"), help="LSH hash rounds")
    m.add_argument("--bucket-size", type=int, default=_d("bucket_size"), help="LSH chunk length")
    m.add_argument("--n-buckets", type=parse_n_buckets, default=None, metavar="N|N1xN2[xN3]",
                   help="LSH buckets per round: an even int (plain hashing), N1xN2 like 4x4 or N1xN2xN3 "
                        "(factorised hashing, N1*N2[*N3] buckets) or auto (default: automatic from --seq-len and --bucket-size)")
    m.add_argument("--causal-mode", choices=CAUSAL_MODES, default=_d("causal_mode"),
                   help="causal LSH: bucket (never looks ahead) or chunk (chunked look-back over the sorted "
                        "order); see docs/lsh.md")
    m.add_argument("--depth", type=int, default=_d("depth"), help="number of layers")
    m.add_argument("--d-model", type=int, default=_d("d_model"), help="model width")
    m.add_argument("--n-heads", type=int, default=_d("n_heads"), help="attention heads")
    m.add_argument("--d-ff", type=int, default=_d("d_ff"), help="feed-forward hidden width")
    m.add_argument("--ff-chunks", type=int, default=_d("ff_chunks"), help="feed-forward chunks")
    m.add_argument("--axial-shape", type=_axial_shape, default=None,
                   help="axial position grid, e.g. 64,64 (default: sinusoidal positions)")
    m.add_argument("--reversible", action=argparse.BooleanOptionalAction, default=True,
                   help="reversible layers (default: on)")
    m.add_argument("--dropout", type=float, default=_d("dropout"), help="dropout rate")
    o = p.add_argument_group("optimisation (may change on --resume)")
    o.add_argument("--steps", type=int, default=_d("steps"), help="total optimizer steps")
    o.add_argument("--batch-size", type=int, default=_d("batch_size"),
                   help="global batch: sequences per step, all ranks (fixed for a run)")
    o.add_argument("--grad-accum", type=int, default=_d("grad_accum"), help="micro-batches per rank and step")
    o.add_argument("--lr", type=float, default=_d("lr"), help="peak learning rate")
    o.add_argument("--warmup", type=int, default=_d("warmup"), help="linear warm-up steps, then cosine decay")
    o.add_argument("--min-lr-ratio", type=float, default=_d("min_lr_ratio"), help="final lr / peak lr")
    o.add_argument("--weight-decay", type=float, default=_d("weight_decay"), help="AdamW weight decay (matrices)")
    o.add_argument("--grad-clip", type=float, default=_d("grad_clip"), help="max gradient norm (0 = off)")
    o.add_argument("--seed", type=int, default=_d("seed"),
                   help="RNG seed of initialisation, data and dropout (fixed for a run)")
    o.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process (default: torch's)")
    r = p.add_argument_group("run folder, logging and checkpoints")
    r.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<task>)")
    r.add_argument("--log-every", type=int, default=_d("log_every"), help="steps between log records")
    r.add_argument("--eval-every", type=int, default=_d("eval_every"), help="steps between evaluations (0 = never)")
    r.add_argument("--eval-batches", type=int, default=_d("eval_batches"), help="validation batches per evaluation")
    r.add_argument("--save-every", type=int, default=_d("save_every"), help="steps between checkpoints")
    x = r.add_mutually_exclusive_group()
    x.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out (no value: <out>/checkpoint.pt; default: start a new run)")
    x.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --out holds one (deletes its checkpoint, log and model)")
    r.add_argument("--stop-at", type=int, default=None,
                   help="checkpoint and exit after this step (time slicing; default: run to --steps)")
    r.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="save the final model to <out>/model with ReformerLM.save_pretrained (default: on)")
    return p


def config_from_namespace(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed command-line options."""
    return TrainConfig(**vars(args))
