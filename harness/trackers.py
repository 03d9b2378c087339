"""TensorBoard and Weights & Biases, off by default (train.tensorboard, train.wandb): rank 0 sends each
log.jsonl record to them, with the step as the x-axis and the tokens and the FLOPs spent so far
(C = M_train·D, M11) beside it, so that runs of equal C overlay when plotted against either.

    <out_dir>/tb/          TensorBoard's event files; a resumed run appends to them (tensorboard --logdir runs/)
    <out_dir>/wandb/       W&B's files for the run (an offline run, WANDB_MODE=offline, lives there whole)
    <out_dir>/wandb.json   the W&B run's id: a resumed run continues the same W&B run

log.jsonl stays the record: a tracker that fails (no network, not logged in) warns once and logs no
more, and training goes on. Trackers read the records and nothing else, so they cannot change the
trajectory (they are no key of config.TRAJECTORY). The packages are optional (requirements-extras.txt);
a run that asks for one that is missing is refused before any work (preflight.check_run).
"""
import importlib.util
import json
import os
import re
import secrets
import string
from pathlib import Path

from harness import rundir
from harness import safe_io

WANDB_ID = "wandb.json"
# what the trackers write in their folders: --overwrite moves a folder aside (and deletes it) only when it holds no other
WRITTEN = {"tb": re.compile(r"events\.out\.tfevents\..+"),
           "wandb": re.compile(r"(offline-)?run-[\w.-]+|latest-run|debug(-internal|-cli\.[\w.-]+)?\.log")}


def missing(tcfg):
    """The line that installs the package a tracker the config asks for needs, or None when all are there."""
    for key in ("tensorboard", "wandb"):
        if getattr(tcfg, key) and importlib.util.find_spec(key) is None:
            return f"train.{key}=true needs the {key} package: pip install {key} (or pip install -r requirements-extras.txt)"
    return None


def strangers(out_dir, names):
    """{folder: [its entries that no tracker wrote]} of the tracker folders among a run's files `names`."""
    found = {name: sorted(p.name for p in (Path(out_dir) / name).iterdir() if not WRITTEN[name].fullmatch(p.name))
             for name in WRITTEN if name in names}
    return {name: others for name, others in found.items() if others}


def start(tcfg, out_dir, step, flops_per_token, config):
    """The trackers the config asks for, started on rank 0 at `step` (0, or the checkpoint's when resuming).
    config is what W&B records as the run's config."""
    sinks = []
    if tcfg.tensorboard:
        sinks.append(_started("TensorBoard", lambda: TensorBoard(out_dir, step)))
    if tcfg.wandb:
        sinks.append(_started("W&B", lambda: WandB(tcfg, out_dir, config)))
    return Trackers([s for s in sinks if s], flops_per_token)


def _started(name, make):
    try:
        return make()
    except Exception as e:  # not logged in, no network, a damaged wandb.json: each package raises its own kinds
        rundir.warn(f"{name} could not start ({type(e).__name__}: {rundir.one_line(e)}); training goes on, "
                    f"log.jsonl holds every record")
        return None


class Trackers:
    """The started trackers, each dropped with one warning the first time it fails."""

    def __init__(self, sinks, flops_per_token):
        self.sinks, self.flops_per_token = sinks, flops_per_token

    def __bool__(self):
        return bool(self.sinks)

    def log(self, record):
        values = scalars(record, self.flops_per_token)
        for sink in list(self.sinks):
            self._call(sink, sink.log, record["step"], values)

    def close(self):
        for sink in list(self.sinks):
            self._call(sink, sink.close)
        self.sinks = []

    def _call(self, sink, method, *args):
        try:
            method(*args)
        except Exception as e:
            rundir.warn(f"{sink.name} failed ({type(e).__name__}: {rundir.one_line(e)}): it logs no more in this run; "
                        f"training goes on, log.jsonl holds every record")
            self.sinks.remove(sink)


def scalars(record, flops_per_token):
    """{name: number} of a log.jsonl record: <kind>/<key> for each number (a training record's numbers; an
    evaluation's BPC per split), <kind>/<key>/layer<i> for a list per MoE layer, and the tokens and FLOPs
    spent so far. An evaluation's copies of the training numbers of its step are left out: logged once."""
    kind = record["kind"]
    out = {"tokens": record["tokens"], "flops": record["tokens"] * flops_per_token}
    for key, v in record.items():
        if key in ("kind", "step", "tokens") or (kind == "eval" and not key.startswith("bpc_")):
            continue
        if isinstance(v, list):
            out.update({f"{kind}/{key}/layer{i}": x for i, x in enumerate(v) if rundir.is_number(x)})
        elif rundir.is_number(v):
            out[f"{kind}/{key}"] = v
    return out


class TensorBoard:
    """Event files in <out_dir>/tb/, flushed at every record. Resumed at step s, the events past s that a
    killed run had written are hidden (purge_step), as log.jsonl drops its lines past s."""
    name = "TensorBoard"

    def __init__(self, out_dir, step):
        from torch.utils.tensorboard import SummaryWriter
        folder = Path(out_dir) / "tb"
        safe_io.refuse_link(folder)
        folder.mkdir(exist_ok=True)
        if not os.access(folder, os.W_OK):  # else the writer's own thread would fail later, with a traceback
            raise PermissionError(f"{folder} cannot be written")
        self.writer = SummaryWriter(str(folder), purge_step=step + 1)

    def log(self, step, values):
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A W&B run of the project, name and group of the config, its files in <out_dir>/wandb/, its id in
    <out_dir>/wandb.json so that a resumed run continues it. The x-axis of every chart is our step (W&B's
    own step counts calls and goes on across a resume). W&B cannot take points back: a run killed after its
    last checkpoint keeps the points it logged past it, and the resumed run logs those steps again."""
    name = "W&B"

    def __init__(self, tcfg, out_dir, config):
        import wandb
        out = Path(out_dir)
        self.run = wandb.init(project=tcfg.wandb_project, name=tcfg.wandb_run_name or out.resolve().name,
                              group=tcfg.wandb_group or None, id=run_id(out), resume="allow", dir=str(out),
                              config=config, settings=wandb.Settings(console="off", quiet=True))  # our output stays ours
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step, values):
        self.run.log({"step": step, **values})

    def close(self):
        self.run.finish()


def run_id(out):
    """The W&B run id of the run in out: read from wandb.json, or drawn (8 characters, as W&B's) and kept there."""
    path = out / WANDB_ID
    if path.exists() or path.is_symlink():
        saved = json.loads(safe_io.read_bytes(path))
        if not (isinstance(saved, dict) and isinstance(saved.get("id"), str) and saved["id"].isalnum()):
            raise ValueError(f"{path} holds no W&B run id (a JSON object with an id of letters and digits)")
        return saved["id"]
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    safe_io.write_text(path, json.dumps({"id": new}) + "\n")
    return new
