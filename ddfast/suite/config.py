"""Suite configuration: a TOML file → a list of :class:`Cell` s, each identified by a hash of its configuration.

A cell is one set (``method`` on ``dataset`` at ``ipc`` images per class with ``seed``) evaluated under the
suite's regimes, with and without augmentation. Its id is the first 16 hex digits of the sha256 of the
canonical JSON of everything that determines its results (method and its options, data, evaluation
settings, teacher / SSL-target settings when used), so an edited setting gives a new cell and an
unchanged one is found again in its run folder. See ``docs/suite.md`` for the file format.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

__all__ = ["REGIMES", "PROTOCOLS", "AUGMENTATIONS", "Cell", "SuiteConfig", "load_config", "parse_config",
           "cell_hash", "read_toml"]

REGIMES = ("hl", "sl", "sl+kd")  # label regimes (ddfast.evaluate.regimes)
PROTOCOLS = ("finetune", "linear")  # transfer protocols (ddfast.evaluate.transfer)
AUGMENTATIONS = ("default", "none")  # "default": the regime's own augmentation; "none": switched off

# Defaults of the tables a TOML file may set; any key not listed here is an error naming it.
SUITE_DEFAULTS = {
    "name": "suite",
    "out": None,  # run root; default runs/suite-<name>
    "datasets": ["digits"],
    "methods": ["random"],
    "ipc": [10],
    "seeds": [0],
    "regimes": ["hl"],
    "augmentations": ["default"],
    "baseline": "random",  # the method whose cells give the "gain over random" of the others ("" = none)
    "transfer_target": None,  # data set the transfer protocols fine-tune / probe on (None: the cell's)
    "root": None,  # data root of load_dataset
}
EVALUATION_DEFAULTS = {
    "arch": "convnet",
    "model_options": {"widths": [32, 64], "norm": "instance"},
    "models": 3,
    "epochs": 300,
    "batch_size": 256,
    "temperature": 20.0,
    "cutmix": False,
}
TEACHER_DEFAULTS = {  # SGD trajectory on the real training split; its final checkpoint is the teacher
    "arch": "convnet",
    "model_options": {"widths": [32, 64], "norm": "instance"},
    "epochs": 20,
    "every": 5,
    "lr": 0.05,
    "momentum": 0.9,
    "batch_size": 128,
    "seed": 0,
}
SSL_DEFAULTS = {  # Barlow Twins target of KRR-ST
    "widths": [32, 64, 128],
    "epochs": 4,
    "batch_size": 256,
    "seed": 0,
}
TRANSFER_DEFAULTS = {  # ddfast.evaluate.transfer.TransferSettings fields (CPU scale)
    "pretrain_epochs": 200,
    "finetune_steps": 300,
    "linear_steps": 1000,
    "target_train_size": 100,
}


def read_toml(path: str) -> dict:
    """Parse a TOML file with ``tomllib`` (Python ≥ 3.11) or ``tomli``; a clear error otherwise."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise RuntimeError("reading TOML on Python 3.10 needs `pip install tomli` (Python >= 3.11 has tomllib)") from e
    with open(path, "rb") as f:
        return tomllib.load(f)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_hash(config: dict) -> str:
    """First 16 hex digits of sha256 of the canonical JSON of ``config``."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:16]


@dataclass
class Cell:
    """One set and its evaluations; ``config`` is everything its results depend on."""

    config: dict
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = cell_hash(self.config)

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def label(self) -> str:
        c = self.config
        name = c.get("name") or c["method"]
        return f"{name}/{c['dataset']}/ipc{c['ipc']}/s{c['seed']}"

    def to_json(self) -> dict:
        return {"id": self.id, "config": self.config}


@dataclass
class SuiteConfig:
    name: str
    out: str
    cells: list = field(default_factory=list)
    slurm: dict = field(default_factory=dict)
    source: str | None = None


def _merge(defaults: dict, given: dict | None, where: str) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"[{where}]: unknown key(s) {unknown}; expected keys from {sorted(defaults)}")
    out = copy.deepcopy(defaults)
    out.update(given)
    return out


def _as_list(value, name: str) -> list:
    if isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"suite.{name}: expected a non-empty list, got {value!r}")
    return list(value)


def _check_regimes(regimes, where: str) -> list:
    regimes = [str(r).lower() for r in _as_list(regimes, "regimes")]
    bad = [r for r in regimes if r not in REGIMES + PROTOCOLS]
    if bad:
        raise ValueError(f"{where}.regimes: expected names from {REGIMES + PROTOCOLS}, got {bad}")
    return regimes


def _cell_config(method: str, dataset: str, ipc: int, seed: int, *, suite: dict, evaluation: dict, teacher: dict,
                 ssl: dict, transfer: dict, method_options: dict, regimes: list, extra: dict | None = None) -> dict:
    from ddfast.suite.methods import method_spec

    spec = method_spec(method)
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"suite.ipc: expected positive integers, got {ipc!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"suite.seeds: expected integers, got {seed!r}")
    regimes = [r for r in regimes if r in spec.regimes] or []
    if not regimes:
        raise ValueError(f"method {method!r}: none of the regimes {suite['regimes']} applies; it supports {spec.regimes}")
    uses_transfer = any(r in PROTOCOLS for r in regimes)
    needs_teacher = spec.needs_teacher or any(r in ("sl", "sl+kd") for r in regimes)
    cfg = {
        "method": method,
        "dataset": dataset,
        "root": suite["root"],
        "ipc": ipc,
        "seed": seed,
        "regimes": regimes,
        "augmentations": list(suite["augmentations"]),
        "options": dict(method_options),
        "evaluation": evaluation,
        "teacher": teacher if needs_teacher else None,
        "ssl": ssl if spec.needs_ssl else None,
        "transfer": ({**transfer, "target": suite["transfer_target"] or dataset} if uses_transfer else None),
    }
    if extra:
        cfg.update(extra)
    return cfg


def parse_config(raw: dict, source: str | None = None, out: str | None = None) -> SuiteConfig:
    """Expand a parsed TOML document into cells (grid × methods, plus explicit ``[[cell]]`` entries and the
    baseline cells the gain scores need)."""
    from ddfast.suite.methods import METHODS, method_spec

    known = {"suite", "evaluation", "teacher", "ssl", "transfer", "methods", "cell", "slurm"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"suite config: unknown table(s) {unknown}; expected tables from {sorted(known)}")
    suite = _merge(SUITE_DEFAULTS, raw.get("suite"), "suite")
    evaluation = _merge(EVALUATION_DEFAULTS, raw.get("evaluation"), "evaluation")
    teacher = _merge(TEACHER_DEFAULTS, raw.get("teacher"), "teacher")
    ssl = _merge(SSL_DEFAULTS, raw.get("ssl"), "ssl")
    transfer = dict(TRANSFER_DEFAULTS, **(raw.get("transfer") or {}))
    for name in ("datasets", "methods", "ipc", "seeds", "augmentations"):
        suite[name] = _as_list(suite[name], name)
    bad = [a for a in suite["augmentations"] if a not in AUGMENTATIONS]
    if bad:
        raise ValueError(f"suite.augmentations: expected names from {AUGMENTATIONS}, got {bad}")
    regimes = _check_regimes(suite["regimes"], "suite")
    per_method = raw.get("methods") or {}
    if not isinstance(per_method, dict):
        raise ValueError("[methods]: expected tables [methods.<name>] of method options")
    for m in list(suite["methods"]) + list(per_method):
        method_spec(m)  # unknown names raise here, listing METHODS
    cells: dict[str, Cell] = {}

    def add(cfg):
        cell = Cell(cfg)
        cells.setdefault(cell.id, cell)

    common = dict(suite=suite, evaluation=evaluation, teacher=teacher, ssl=ssl, transfer=transfer)
    for dataset in suite["datasets"]:
        for ipc in suite["ipc"]:
            for seed in suite["seeds"]:
                for method in suite["methods"]:
                    spec = method_spec(method)
                    mregimes = [r for r in regimes if r in spec.regimes]
                    if not mregimes:
                        raise ValueError(f"method {method!r} supports the regimes {list(spec.regimes)}, none of "
                                         f"suite.regimes {regimes}; give it a [[cell]] with its own regimes")
                    add(_cell_config(method, dataset, ipc, seed, method_options=per_method.get(method, {}),
                                     regimes=mregimes, **common))
    for i, entry in enumerate(raw.get("cell") or []):
        entry = dict(entry)
        method = entry.pop("method", None)
        if method is None:
            raise ValueError(f"[[cell]] #{i + 1}: expected a 'method' key (one of {sorted(METHODS)})")
        dataset = entry.pop("dataset", suite["datasets"][0])
        ipcs = _as_list(entry.pop("ipc", suite["ipc"]), "ipc")
        seeds = _as_list(entry.pop("seeds", entry.pop("seed", suite["seeds"])), "seeds")
        cregimes = _check_regimes(entry.pop("regimes", regimes), f"[[cell]] #{i + 1}")
        extra = {}
        if "name" in entry:
            extra["name"] = str(entry.pop("name"))
        if method == "artifact":
            path = entry.pop("path", None)
            if not path:
                raise ValueError(f"[[cell]] #{i + 1}: method 'artifact' needs path = \"<file>.safetensors\"")
            path = os.path.abspath(os.path.join(os.path.dirname(source) if source else ".", path))
            extra["path"] = path
            extra["artifact_sha256"] = _file_sha256(path)
        options = {**per_method.get(method, {}), **entry}
        for ipc in ipcs:
            for seed in seeds:
                add(_cell_config(method, dataset, ipc, seed, method_options=options, regimes=cregimes,
                                 extra=dict(extra), **common))
    baseline = suite["baseline"]
    if baseline:
        if baseline not in METHODS:
            raise ValueError(f"suite.baseline: expected a method name from {sorted(METHODS)} or \"\", got {baseline!r}")
        needed = {}
        for cell in list(cells.values()):
            c = cell.config
            if c["method"] == baseline:
                continue
            key = (c["dataset"], c["ipc"], c["seed"])
            needed.setdefault(key, set()).update(c["regimes"])
        bspec = method_spec(baseline)
        for (dataset, ipc, seed), regs in sorted(needed.items(), key=lambda kv: str(kv[0])):
            regs = [r for r in regimes + sorted(set(regs) - set(regimes)) if r in regs and r in bspec.regimes]
            if regs:
                add(_cell_config(baseline, dataset, ipc, seed, method_options=per_method.get(baseline, {}),
                                 regimes=regs, **common))
    out = out or suite["out"] or os.path.join("runs", f"suite-{suite['name']}")
    return SuiteConfig(name=str(suite["name"]), out=out, cells=list(cells.values()), slurm=dict(raw.get("slurm") or {}),
                       source=source)


def _file_sha256(path: str) -> str:
    if not os.path.exists(path):
        raise ValueError(f"[[cell]] path: {path} does not exist")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_config(path: str, out: str | None = None) -> SuiteConfig:
    """Read ``path`` (TOML) or a built-in name (``quickstart``: ``ddfast/suite/configs/quickstart.toml``)."""
    if not os.path.exists(path):
        builtin = os.path.join(os.path.dirname(__file__), "configs", path if path.endswith(".toml") else f"{path}.toml")
        if os.path.exists(builtin):
            path = builtin
        else:
            names = sorted(f[:-5] for f in os.listdir(os.path.join(os.path.dirname(__file__), "configs")))
            raise FileNotFoundError(f"config: {path} not found (built-in suites: {names})")
    return parse_config(read_toml(path), source=path, out=out)
