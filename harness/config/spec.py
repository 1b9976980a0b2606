"""Experiment specs: one YAML file per benchmark row, sharing defaults through `inherit:`.

A row file names the file it inherits from (another row, or a family default under `_base/`) and
says only what differs. Loading merges the chain, then checks every key and type against the
dataclasses below, so a typo fails with one line naming the file and the key.

Sizes are written [width, height], the way the benchmark table writes its test size.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from harness.errors import BenchError
from harness.paths import experiments_dir

TABLE_FILE = "_table.yaml"


@dataclass
class Columns:
    """The benchmark table's columns for this row, as the table writes them."""

    model: str
    backbone: str
    ema: bool
    crop_test: Optional[list[int]]  # null is the table's "-": whole-image inference
    batch_size: int
    epochs: int
    test_size: list[int]


@dataclass
class Reference:
    """The row's reference mIoU: one value per run listed in the table cell. A table row must give it; one of
    our rows (not in `_table.yaml`) may give its own or none (an empty list: no delta, no verdict)."""

    miou: list[float] = field(default_factory=list)
    lightseg: Optional[float] = None  # a "(light-seg 72.11)" note in the cell
    source: str = "segbench"  # "light-seg" when the figure comes from the light-seg codebase


@dataclass
class ModelSpec:
    family: str
    backbone: str
    output_stride: int
    eval_half_resolution: bool  # lxtGH DF-Seg speed trick: infer at half size
    # The ImageNet backbone file United-Perception's config names (`saver.pretrain_model`), in UP's key layout;
    # the user brings it (nothing downloads). A Cityscapes run without it warns loudly and is marked.
    backbone_checkpoint: Optional[str] = None
    init_checkpoint: Optional[str] = None  # a whole-model checkpoint to start from
    # family `smp` only (harness.models.smp_family): segmentation-models-pytorch's architecture and encoder
    # names, and the architecture's constructor keywords, passed through after a check against its signature.
    arch: Optional[str] = None
    encoder: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSpec:
    """Input normalisation, on 0-255 RGB as UP's `normalize` transform."""

    mean: list[float]
    std: list[float]


@dataclass
class LossSpec:
    name: str  # "ohem" (UP's seg_ohem on every supervised output) or "ce"
    ohem_thresh: float
    ohem_min_kept: int
    aux_weights: list[float] = field(default_factory=list)  # one per auxiliary output; none by default


WARMUP_TYPES = ("linear",)
LOSSES = ("ohem", "ce")


@dataclass
class TrainSpec:
    """UP's training recipe. Every value lives in experiments/_base/default.yaml (the one home of the shared
    recipe) or in a family's or row's file; the fields here only type them."""

    crop_size: list[int]
    lr_per_image: float  # UP's config lr: multiplied by the global batch
    scale_range: list[float]  # drawn as UP's seg_rand_resize
    flip: bool
    pad_value: int  # image padding before normalisation (labels pad with 255, ignored)
    momentum: float
    weight_decay: float
    warmup_iters: int
    warmup_type: str
    warmup_ratio: float  # warm-up starts at this fraction of the lr
    poly_power: float
    min_lr: float
    ema_decay: float
    ema_ramp: float  # UP's ExpEMA: decay x (1 - exp(-step / ema_ramp)); 0 = constant decay
    eval_every_epochs: int  # UP's test_freq; 0: evaluate only at the end
    # Batch norm layers stay in eval mode (running statistics): for fine-tuning, and for exact comparisons of
    # process counts on CPU, where there is no SyncBatchNorm.
    freeze_bn: bool
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int  # periodic checkpoints kept (best.pt besides); not part of the recipe
    workers: Optional[int]  # data-loader processes per training process; null: this machine's cores per process


@dataclass
class EvalSpec:
    flip: bool
    scales: list[float]
    crop_stride: Optional[list[int]] = None  # sliding-window stride when columns.crop_test is set; None: 2/3 of it


@dataclass
class SyntheticBudget:
    """What `--synthetic` changes so that a row trains in minutes on a laptop CPU."""

    iters: int
    batch_size: int
    crop_size: list[int]
    test_size: list[int]
    scale_range: list[float]
    lr: float  # global
    warmup_iters: int
    ema_decay: float
    ema_ramp: float
    eval_every: int  # iterations; 0: evaluate only at the end
    log_every: int
    ohem_min_kept: int
    workers: int
    checkpoint_every: int
    keep_checkpoints: int  # periodic checkpoints a synthetic run keeps (best.pt besides); not in the recipe


@dataclass
class Spec:
    row: str
    columns: Columns
    reference: Reference
    model: ModelSpec
    loss: LossSpec
    train: TrainSpec
    data: DataSpec
    eval: EvalSpec
    synthetic: SyntheticBudget

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys, the form MLflow params take."""
        return flatten(self.to_dict())

    @property
    def network_key(self) -> str:
        """Which network the row builds, as a key: its model section but the starting-weight files (they change
        values, never shapes or cost). Rows with one key share sizes, FLOPs and speed figures."""
        model = dataclasses.replace(self.model, backbone_checkpoint=None, init_checkpoint=None)
        return repr(dataclasses.asdict(model))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# --- loading -----------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        elif value is None and isinstance(merged.get(key), dict):  # `key: null` drops an inherited mapping
            merged[key] = {}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# libyaml's safe loader where PyYAML has it: every finishing run reads every spec, and the pure-Python parser takes
# seconds of a core for them.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise BenchError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                         "save the file as UTF-8") from None
    except OSError as exc:
        raise BenchError(f"{path}: cannot be read ({exc.strerror or exc}); check the file and its "
                         "permissions") from None
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BenchError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _resolve_chain(path: Path, root: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise BenchError(f"{path}: inheritance cycle ({chain}); remove one 'inherit:'")
    data = _read_yaml(path)
    parent_name = data.pop("inherit", None)
    if parent_name is None:
        return data
    if not isinstance(parent_name, str):
        raise BenchError(f"{path}: key 'inherit' must be a file name such as '_base/deeplabv3'")
    parent = root / f"{parent_name}.yaml"
    if not parent.is_file():
        raise BenchError(f"{path}: key 'inherit' names '{parent_name}', but {parent} does not exist")
    return _deep_merge(_resolve_chain(parent, root, (*seen, path)), data)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp`, or raise naming `where`."""
    if tp is Any:
        return value  # checked by whoever consumes it (e.g. smp keywords against the constructor's signature)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BenchError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise BenchError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BenchError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_check_value(k, key_tp, f"{where} key {k!r}"): _check_value(v, value_tp, f"{where}.{k}")
                for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise BenchError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise BenchError(f"{where}.{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_value(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BenchError(f"{where}.{name}: missing required key; add it to the row or its family default")
    return cls(**kwargs)


def load_spec(row: str, root: Optional[Path] = None) -> Spec:
    """Load and validate one row's resolved spec."""
    root = root or experiments_dir()
    path = root / f"{row}.yaml"
    if not path.is_file():
        raise BenchError(unknown_row_message(row, root))
    data = _resolve_chain(path, root)
    # A reference figure belongs to its own table row; it is never inherited from a base row.
    data["reference"] = _read_yaml(path).get("reference")
    table_row = is_table_row(row, root)
    if data["reference"] is None:
        if table_row:
            raise BenchError(f"{path}: missing required key 'reference'; give the row's reference mIoU")
        data["reference"] = {}  # one of our rows: no reference, so no delta and no verdict
    named = data.pop("row", row)
    if named != row:
        raise BenchError(f"{path}: key 'row' says '{named}' but the file is {row}.yaml; rename the file or fix the key")
    where = str(path.relative_to(root.parent))
    try:
        spec = _build(Spec, {"row": row, **data}, where)
    except BenchError as exc:
        # Name the file as a path (experiments/x.yaml: key ...), not a dotted prefix.
        raise BenchError(str(exc).replace(f"{where}.", f"{where}: ", 1)) from None
    _check_ranges(spec, where, table_row)
    return spec


def _check_ranges(spec: Spec, where: str, table_row: bool = True) -> None:
    """Values that pass the type check but cannot train: one line naming the key, the value and the range."""
    t, s, c = spec.train, spec.synthetic, spec.columns

    def require(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            raise BenchError(f"{where}: {key} is {value!r}; accepted: {accepted}")

    def size(key: str, value: list[int]) -> None:
        require(len(value) == 2 and all(v > 0 for v in value), key, value, "[width, height], two positive integers")

    sizes: list[tuple[str, list[int]]] = [("train.crop_size", t.crop_size), ("synthetic.crop_size", s.crop_size),
                                          ("columns.test_size", c.test_size), ("synthetic.test_size", s.test_size)]
    for key, pair in sizes:
        size(key, pair)
    positive: list[tuple[str, float]] = [
        ("columns.batch_size", c.batch_size), ("columns.epochs", c.epochs), ("synthetic.batch_size", s.batch_size),
        ("synthetic.iters", s.iters), ("train.log_every", t.log_every), ("synthetic.log_every", s.log_every)]
    for key, number in positive:
        require(number > 0, key, number, "a positive integer")
    for key, number in (("train.lr_per_image", t.lr_per_image), ("synthetic.lr", s.lr)):
        require(number > 0, key, number, "a positive number")
    for key, span in (("train.scale_range", t.scale_range), ("synthetic.scale_range", s.scale_range)):
        require(len(span) == 2 and 0 < span[0] <= 1 <= span[1], key, span, "[low, high] with 0 < low <= 1 <= high")
    require(t.warmup_type in WARMUP_TYPES, "train.warmup_type", t.warmup_type, ", ".join(WARMUP_TYPES))
    require(0 < t.warmup_ratio <= 1, "train.warmup_ratio", t.warmup_ratio, "0 < ratio <= 1")
    for key, number in (("train.ema_decay", t.ema_decay), ("synthetic.ema_decay", s.ema_decay),
                        ("train.momentum", t.momentum)):
        require(0 <= number < 1, key, number, "0 <= value < 1")
    non_negative: list[tuple[str, float]] = [
        ("train.weight_decay", t.weight_decay), ("train.min_lr", t.min_lr), ("train.warmup_iters", t.warmup_iters),
        ("synthetic.warmup_iters", s.warmup_iters), ("train.ema_ramp", t.ema_ramp), ("synthetic.ema_ramp", s.ema_ramp),
        ("train.eval_every_epochs", t.eval_every_epochs), ("synthetic.eval_every", s.eval_every),
        ("train.checkpoint_every", t.checkpoint_every), ("synthetic.checkpoint_every", s.checkpoint_every),
        ("train.workers", t.workers or 0), ("synthetic.workers", s.workers), ("train.poly_power", t.poly_power),
        ("loss.ohem_min_kept", spec.loss.ohem_min_kept), ("synthetic.ohem_min_kept", s.ohem_min_kept)]
    for key, number in non_negative:
        require(number >= 0, key, number, "zero or more")
    require(spec.loss.name in LOSSES, "loss.name", spec.loss.name, ", ".join(LOSSES))
    require(0 <= t.pad_value <= 255, "train.pad_value", t.pad_value, "a pixel value 0-255")
    for key, kept in (("train.keep_checkpoints", t.keep_checkpoints),
                      ("synthetic.keep_checkpoints", s.keep_checkpoints)):
        require(kept >= 1, key, kept, "1 or more (the newest checkpoint is what a resume needs)")
    require(0 < spec.loss.ohem_thresh <= 1, "loss.ohem_thresh", spec.loss.ohem_thresh, "a probability, 0 < thresh <= 1")
    require(all(w >= 0 for w in spec.loss.aux_weights), "loss.aux_weights", spec.loss.aux_weights, "weights >= 0")
    require(len(spec.data.mean) == 3, "data.mean", spec.data.mean, "three numbers (R, G, B on 0-255)")
    require(len(spec.data.std) == 3 and all(v > 0 for v in spec.data.std), "data.std", spec.data.std,
            "three positive numbers (R, G, B on 0-255)")
    require(spec.model.output_stride in (8, 16, 32), "model.output_stride", spec.model.output_stride, "8, 16 or 32")
    if c.crop_test is not None:
        size("columns.crop_test", c.crop_test)
    if spec.eval.crop_stride is not None:
        size("eval.crop_stride", spec.eval.crop_stride)
    require(bool(spec.eval.scales) and all(v > 0 for v in spec.eval.scales), "eval.scales", spec.eval.scales,
            "a non-empty list of positive scales")
    require((bool(spec.reference.miou) or not table_row) and all(0 <= v <= 100 for v in spec.reference.miou),
            "reference.miou", spec.reference.miou, "one or more percentages 0-100" if table_row else
            "percentages 0-100, or [] (or no reference key) for a row outside the table")


def _row_files(root: Path) -> set[str]:
    return {p.stem for p in root.glob("*.yaml") if not p.name.startswith("_")}


def _listed_rows(root: Path) -> list[str]:
    table = _read_yaml(root / TABLE_FILE) if (root / TABLE_FILE).is_file() else None
    if table is None or not isinstance(table.get("rows"), list):
        raise BenchError(f"{root / TABLE_FILE}: missing, or has no 'rows:' list of row ids in table order")
    return [str(r) for r in table["rows"]]


def is_table_row(row: str, root: Optional[Path] = None) -> bool:
    """Whether `_table.yaml` lists `row`. Without a readable table every row is held to the table's rules."""
    root = root or experiments_dir()
    try:
        return row in _listed_rows(root)
    except BenchError:
        return True


def row_ids(root: Optional[Path] = None) -> list[str]:
    """The benchmark table's row ids in table order, as `_table.yaml` lists them; every listed row must have a
    file. Spec files the table does not list are our rows (`our_row_ids`)."""
    root = root or experiments_dir()
    rows = _listed_rows(root)
    files = _row_files(root)
    missing = [r for r in rows if r not in files]
    if missing:
        raise BenchError(f"{root / TABLE_FILE}: lists {', '.join(missing)} but no such experiments/<row>.yaml exists")
    return rows


def our_row_ids(root: Optional[Path] = None) -> list[str]:
    """Rows a team added beside the table: spec files `_table.yaml` does not list, in name order."""
    root = root or experiments_dir()
    return sorted(_row_files(root) - set(_listed_rows(root)))


def table_title(root: Optional[Path] = None) -> str:
    root = root or experiments_dir()
    return str(_read_yaml(root / TABLE_FILE).get("title", "Benchmark"))


def table_tolerance(root: Optional[Path] = None) -> float:
    """The verdict tolerance in mIoU points, as `_table.yaml` sets it (`tolerance:`)."""
    root = root or experiments_dir()
    value = _read_yaml(root / TABLE_FILE).get("tolerance")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise BenchError(f"{root / TABLE_FILE}: tolerance is {value!r}; give the verdict tolerance in mIoU points, "
                         "a number 0 or more (e.g. tolerance: 0.5)")
    return float(value)


def load_all(root: Optional[Path] = None) -> list[Spec]:
    """The table's rows only, in table order."""
    return [load_spec(row, root) for row in row_ids(root)]


def load_ours(root: Optional[Path] = None) -> list[Spec]:
    """Our rows (spec files outside `_table.yaml`), in name order."""
    return [load_spec(row, root) for row in our_row_ids(root)]


ALL_ROWS = "all"  # --rows all: every row, the table's and ours


def select_rows(patterns: str, training: bool = False, root: Optional[Path] = None) -> list[Spec]:
    """The one row selector of every verb that takes rows: the rows comma-separated globs name (`all`: every
    row), table order then ours, each once. With `training` (a verb that trains or times training), a light-seg
    row is its base row (the same recipe and network), listed once. A glob matching nothing is a one-line error."""
    import fnmatch

    globs = [g.strip() for g in patterns.split(",") if g.strip()]
    if not globs:
        raise BenchError(f"--rows {patterns!r} names no row; give row globs separated by commas, e.g. "
                         "--rows 'sf_seg*,pspnet-r50', or --rows all")
    specs = load_all(root) + load_ours(root)
    by_row = {s.row: s for s in specs}
    chosen: dict[str, Spec] = {}
    for glob in globs:
        matched = [s for s in specs if fnmatch.fnmatch(s.row, "*" if glob == ALL_ROWS else glob)]
        if not matched:
            raise BenchError(f"--rows {glob!r} matches no row; see `bench list` for the row ids (or --rows all)")
        for spec in matched:
            if training:
                spec = by_row.get(base_row(spec.row, root), spec)
            chosen.setdefault(spec.row, spec)
    return list(chosen.values())


def select_row(row: str, training: bool = False, root: Optional[Path] = None) -> Spec:
    """The one row a single-row verb (`run --row`, `doctor --row`) names, by `select_rows`' rules: a row id
    (an unknown one says the closest ids; only its own spec file is read) or a glob naming exactly one row."""
    if any(c in row for c in "*?[,") or row == ALL_ROWS:
        found = select_rows(row, training, root)
        if len(found) != 1:
            raise BenchError(f"--row {row!r} names {len(found)} rows ({', '.join(s.row for s in found[:5])}"
                             f"{', ...' if len(found) > 5 else ''}); give one row id (see `bench list`)")
        return found[0]
    spec = load_spec(row, root)
    return load_spec(base_row(row, root), root) if training and base_row(row, root) != row else spec


def unknown_row_message(row: str, root: Path) -> str:
    known = sorted(p.stem for p in root.glob("*.yaml") if not p.name.startswith("_"))
    close = difflib.get_close_matches(row, known, n=3, cutoff=0.4)
    suggestion = f"; closest: {', '.join(close)}" if close else ""
    return f"unknown row '{row}'{suggestion} (see `bench list` for all rows)"


# --- light-seg rows ----------------------------------------------------------------------------

LIGHTSEG_SUFFIX = "-lightseg"


def is_lightseg(row: str) -> bool:
    return row.endswith(LIGHTSEG_SUFFIX)


def base_row(row: str, root: Optional[Path] = None) -> str:
    """The row whose runs a light-seg row uses: the row its spec inherits from (same recipe, compared with the
    light-seg codebase's figure). Any other row is its own."""
    if not is_lightseg(row):
        return row
    root = root or experiments_dir()
    try:
        parent = (yaml.safe_load((root / f"{row}.yaml").read_text()) or {}).get("inherit")
    except (OSError, yaml.YAMLError):
        return row  # load_spec reports a broken file with its own message
    if isinstance(parent, str) and not parent.startswith("_") and (root / f"{parent}.yaml").is_file():
        return parent
    return row


def training_row(row: str) -> tuple[str, Optional[str]]:
    """The row `bench run` trains for `row`, and a one-line note when that is another row (a light-seg row is its
    base row's recipe: the table compares the base row's runs with the light-seg figure)."""
    base = select_row(row, training=True).row
    if base == row:
        return row, None
    return base, (f"note: {row} is {base}'s recipe compared with the light-seg figure; training {base} "
                  f"(the table uses its runs for both rows)")
