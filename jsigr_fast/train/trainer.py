"""The training loop: one ``loss.backward()`` per step, exact resume, non-finite guards, DDP, AMP.

One step::

    loss, terms = method.loss(model, x, y)        # under autocast; double backprop inside, out of place
    agree over ranks: is the loss finite? was a stop signal received?
    finite:     scaler.scale(loss).backward(); grad norm finite? -> optimizer step (else skip)
    not finite: skip (count; stop after max_nonfinite in a row, weights untouched)
    scheduler.step()                              # per step, skipped steps included

Exact resume: the checkpoint holds the model, optimizer, scheduler, GradScaler, method state
(adaptor/discriminator with their optimizers, teacher), every rank's RNG states (torch CPU/CUDA,
numpy, python, the method's generator), the epoch and the batch within it. The loader derives
epoch e's order from ``seed + e`` and skips the finished batches (``set_epoch(e, start_batch=k)``);
evaluation uses its own generator and runs before the checkpoint is written, so nothing consumes
a random number between "checkpoint written" and "next step" that a resumed run would not.
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint as ckpt_io
from .build import build_model, build_optimizer, build_scheduler, model_arch
from .config import RESUMABLE_CHANGES, TrainConfig, build_config, check_combination, resolve, to_dict
from .data import build_data
from .distributed import all_reduce_, broadcast_module, gather_objects, setup, teardown
from .errors import CheckpointError, ConfigError, DataError, NonFiniteError
from .logs import LOG_FILES, RunLog, logged_rows
from .methods import METHODS, MethodContext, get_method
from .signals import StopSignal

__all__ = ["Trainer", "train", "STEP_DELAY_ENV"]

# Testing hook: sleep this many seconds after every step, so a test can interrupt a run mid-epoch.
STEP_DELAY_ENV = "JSIGR_FAST_TRAIN_STEP_DELAY"
CHECKPOINT_NAME = "last.pt"
BEST_NAME = "best.pt"  # keep_best: a copy of last.pt as written at the best evaluation so far


def previous_run(out: str) -> list[str]:
    """What an earlier run left in ``out`` that a new one would overwrite or append to: its
    checkpoint, and logs holding rows. (A run that failed before its first step leaves
    ``config.yaml`` and header-only logs: nothing to lose.)"""
    found = [name for name in (CHECKPOINT_NAME, BEST_NAME) if os.path.exists(os.path.join(out, name))]
    return found + [name for name in LOG_FILES if logged_rows(os.path.join(out, name))]


def _same_folder(a: str, b: str) -> bool:
    """Whether two paths name one folder (relative, trailing slashes, symlinks)."""
    return os.path.realpath(a) == os.path.realpath(b)


def _resume_path(resume: str, cfg: TrainConfig) -> str:
    if resume in ("auto", "last"):
        return os.path.join(cfg.out or resolve(cfg).out, CHECKPOINT_NAME)
    return os.path.join(resume, CHECKPOINT_NAME) if os.path.isdir(resume) else resume


def merge_resumed_config(saved: dict, current: TrainConfig, explicit: set, path: str = "the checkpoint") -> TrainConfig:
    """The checkpoint's config, with the keys given explicitly now. Changing a key that alters the
    trajectory (anything but ``RESUMABLE_CHANGES``) is an error: the run would not continue exactly."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path}: 'config' is not a mapping")
    try:  # a checkpoint is untrusted input: its config goes through the same checks as a config file
        base, _ = build_config(saved, file_source="the checkpoint's config", flags_from_text=False)
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: 'config': {exc}") from None
    changed = {}
    for k in explicit:
        new, old = getattr(current, k), saved.get(k)
        if new != old and k not in RESUMABLE_CHANGES:
            changed[k] = (old, new)
    if changed:
        desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ConfigError(f"cannot resume with a different {desc}: the run would not continue where it stopped. "
                          f"Start a new run (--init-from CKPT keeps the weights) or drop these flags")
    return dataclasses.replace(base, **{k: getattr(current, k) for k in explicit})


def _where(epoch: int, batch: int) -> str:
    """A checkpoint's position in words."""
    return f"end of epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, step {batch}"


class Trainer:
    """Build everything for ``cfg`` (or resume it) and train with :meth:`fit`.

    Args:
        cfg: the configuration (resolved here).
        resume: a checkpoint path, a run folder, or "auto" (``<out>/last.pt``; start fresh if absent).
        overwrite: start over in an ``out`` folder that holds a run (its checkpoint is removed, its
            logs truncated); without it, and without ``resume``, such a folder is a ConfigError. With
            ``resume`` it is allowed only when ``out`` is given and is not the checkpoint's folder: the
            resumed run then replaces the run ``out`` holds (refused without it).
        model: an ``nn.Module`` to train instead of ``cfg.model`` (Python API; pass it again to resume).
        explicit: config keys the user set (resume checks, warnings about unused keys).
    """

    resumed_from: str | None = None
    resume_elsewhere = False  # resumed into an --out other than the checkpoint's folder
    env = log = None

    def __init__(self, cfg: TrainConfig, *, resume: str | None = None, overwrite: bool = False,
                 model: nn.Module | None = None, explicit=frozenset()):
        self._saved_threads = torch.get_num_threads()
        try:
            self._build(cfg, resume, overwrite, model, set(explicit))
        except BaseException:
            self.close()
            raise

    def _build(self, cfg, resume, overwrite, model, explicit) -> None:
        contradiction = ("--overwrite starts a new run and --resume continues one: give only one of them "
                         "(with --resume, --overwrite only lets the run continue in another --out that holds a run)")
        if resume and overwrite and (resume in ("auto", "last") or "out" not in explicit):
            raise ConfigError(contradiction)  # in place for sure: said before any file is read
        ckpt = None
        self.resume_changes = {}  # key -> (the checkpoint's value, this resume's)
        if resume:
            path = _resume_path(resume, cfg)
            if resume == "auto" and not os.path.exists(path):
                pass  # a new run: _claim_out says so
            else:
                ckpt = ckpt_io.load_checkpoint(path)
                cfg = merge_resumed_config(ckpt["config"], cfg, explicit, path)
                done = ckpt["epoch"] + (ckpt["batch"] > 0)  # epochs finished or begun
                if cfg.epochs < done:  # cannot be honoured: the weights are already past that point
                    begun = f" and {ckpt['batch']} steps of epoch {done}" if ckpt["batch"] else ""
                    raise ConfigError(f"checkpoint {path} has already finished {ckpt['epoch']} epochs{begun}: --epochs "
                                      f"{cfg.epochs} would end before that. Pass --epochs {done} or more, or leave "
                                      f"--epochs out (the run's {ckpt['config'].get('epochs')})")
                self.resume_changes = {k: (ckpt["config"].get(k), getattr(cfg, k)) for k in sorted(explicit)
                                       if getattr(cfg, k) != ckpt["config"].get(k)}
                if "out" not in explicit:  # continue where the checkpoint is, even if the folder was moved
                    cfg.out = os.path.dirname(os.path.abspath(path))
                self.resumed_from = path
        cfg = resolve(cfg)
        # A resume into another folder (--resume CKPT --out OTHER) writes OTHER's last.pt and logs;
        # if OTHER holds another run, that run would be lost, so it is claimed like a new run's folder.
        self.resume_elsewhere = ckpt is not None and not _same_folder(cfg.out, os.path.dirname(
            os.path.abspath(self.resumed_from)))
        if resume and overwrite and not self.resume_elsewhere:
            raise ConfigError(contradiction)
        check_combination(cfg, resuming=ckpt is not None)
        self.cfg, self.ckpt = cfg, ckpt
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.env = env = setup(cfg.device)
        self.device = device = env.device
        # a throughput measurement writes only throughput.json, so it may share a run's folder
        self.writes_run = not cfg.throughput_steps
        self.fresh_logs = False
        if (ckpt is None or self.resume_elsewhere) and self.writes_run:
            self._claim_out(cfg.out, resume, overwrite)
        self._warn_unused(explicit)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
        if cfg.batch_size % env.world_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is the global batch; it must divide evenly over "
                              f"{env.world_size} ranks")
        self.out = cfg.out
        if env.is_main:
            os.makedirs(self.out, exist_ok=True)

        # data ----------------------------------------------------------------------------------
        from jsigr_fast.data import make_loader, mix_seed

        self.spec = build_data(cfg)
        self.per_rank_batch = cfg.batch_size // env.world_size
        self._make_loader = lambda ds, batch, train: make_loader(
            ds, batch, train=train, workers=cfg.workers, distributed=env.distributed, seed=cfg.seed,
            pin_memory=device.type == "cuda")
        self.train_loader = self._make_loader(self.spec.train, self.per_rank_batch, True)
        eval_batch = max((cfg.eval_batch_size or cfg.batch_size) // env.world_size, 1)
        self.eval_loader = self._make_loader(self.spec.test, eval_batch, False)
        self.steps_per_epoch = min(len(self.train_loader), cfg.steps_per_epoch or len(self.train_loader))
        if self.steps_per_epoch == 0:
            raise DataError(f"the training set ({len(self.spec.train)} images) is smaller than one batch of "
                            f"{self.per_rank_batch} per rank; lower --batch-size")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if "epochs" in self.resume_changes and env.is_main:
            self._warn_epochs(*self.resume_changes["epochs"], ckpt["global_step"])

        # model and method ----------------------------------------------------------------------
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        random.seed(cfg.seed)
        if model is not None:
            self.arch = {"model": type(model).__name__, "kwargs": {}, "custom": True}
        else:
            self.arch = ckpt["arch"] if ckpt is not None else model_arch(cfg, self.spec.input_shape,
                                                                        self.spec.num_classes)
            model = build_model(self.arch)
        if ckpt is None and cfg.init_from:
            sd, _, _ = ckpt_io.load_weights(cfg.init_from)
            missing = ckpt_io.load_model_weights(model, sd, f"--init-from {cfg.init_from} ({self.arch['model']})")
            if missing:
                self.print(f"--init-from: {cfg.init_from} has no {', '.join(missing)}; keeping the model's own")
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.net = model  # the unwrapped module (checkpoints, evaluation, attacks)
        if cfg.mode == "fd" and "jacobian_estimator" in get_method(cfg.method).uses:
            from jsigr_fast.functional import check_fd_estimator

            try:  # fd's exact estimator and train-mode BatchNorm: say so now, not at the first step
                check_fd_estimator(model, cfg.mode, cfg.jacobian_estimator)
            except ValueError as exc:
                raise ConfigError(f"--mode fd --jacobian-estimator {cfg.jacobian_estimator} on "
                                  f"{self.arch['model']}: {exc}") from None
        self.generator = torch.Generator(device).manual_seed(mix_seed(cfg.seed, 1, env.rank))
        ctx = MethodContext(cfg=cfg, device=device, input_shape=self.spec.input_shape, arch=self.arch,
                            generator=self.generator, total_steps=self.total_steps, channels_last=cfg.channels_last)
        try:
            self.method = get_method(cfg.method)(cfg, ctx, state=ckpt["method"] if ckpt is not None else None)
        except CheckpointError as exc:
            if ckpt is None:
                raise
            raise CheckpointError(f"checkpoint {self.resumed_from}: 'method': {exc}") from None
        train_before = self.spec.train
        self.spec = self.method.prepare_data(self.spec, log=self.print)
        if self.spec.train is not train_before:
            self.train_loader = self._make_loader(self.spec.train, self.per_rank_batch, True)
        self.counters = {"nonfinite_total": 0, "nonfinite_consecutive": 0, "overflow_skips": 0, "images": 0}
        # The running epoch's sums behind epochs.csv's means: the checkpoint holds them (summed over ranks)
        # when it is written mid-epoch, so a resumed epoch reports the means of all its steps.
        self._epoch_acc = None  # live accumulators of the epoch in progress (_train_epoch)
        self._epoch_partial = None  # a mid-epoch checkpoint's totals, until the resumed epoch takes them
        for name, module in self.method.modules().items():
            broadcast_module(module, env)
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.model = model
        # training stream: per-rank, independent of how many numbers construction consumed
        torch.manual_seed(mix_seed(cfg.seed, 2, env.rank))
        np.random.seed(mix_seed(cfg.seed, 5, env.rank) % 2 ** 32)
        random.seed(mix_seed(cfg.seed, 6, env.rank))

        # optimization --------------------------------------------------------------------------
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.epoch = self.batch = self.global_step = 0
        self.metrics: dict = {}
        self.best = None  # keep_best: {"metric", "value", "epoch"} of the checkpoint best.pt holds
        self.last_checkpoint = None  # (path, epoch, batch) of this run's latest checkpoint, once there is one
        if ckpt is not None:
            self._load_state(ckpt)
            self.last_checkpoint = (self.resumed_from, self.epoch, self.batch)
        self.terms = ("loss",) + tuple(self.method.terms)
        for name in (CHECKPOINT_NAME, BEST_NAME) if self.fresh_logs and env.is_main else ():
            # removed now, not at the first save: a crash before it must not leave the old run's
            # checkpoint beside the new run's logs (--resume auto would pick it up)
            if os.path.exists(os.path.join(self.out, name)):
                os.unlink(os.path.join(self.out, name))
        self.log = RunLog(self.out, self.method.terms, enabled=env.is_main and self.writes_run,
                          tensorboard=cfg.tensorboard, resume_step=self.global_step if ckpt is not None else None,
                          resume_epoch=self.epoch if ckpt is not None else None, fresh=self.fresh_logs)
        if self.best is not None and self.resume_elsewhere and self.writes_run:
            self._take_best_along()
        if env.is_main and self.writes_run:
            self._write_config(ckpt)
        self.step_delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)

    # --------------------------------------------------------------------------------------------
    def print(self, *args, **kw):
        if self.env.is_main:
            print(*args, **kw, flush=True)

    def _write_config(self, ckpt) -> None:
        """``config.yaml``: the config the run started with. A resume leaves it as it is (the
        checkpoint holds the config in use) and appends a comment line with the keys it changed, so
        the file still reads as a config file and says what the run really did."""
        import yaml

        path = os.path.join(self.out, "config.yaml")
        # a new run, or a resumed one in another folder (whose config.yaml, if any, is not this run's)
        if ckpt is None or self.resume_elsewhere or not os.path.exists(path):
            with open(path, "w") as f:
                yaml.safe_dump(to_dict(self.cfg) if ckpt is None else ckpt["config"], f, sort_keys=False)
        if self.resume_changes and self.epoch < self.cfg.epochs:  # nothing to record when nothing runs
            changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.resume_changes.items())
            with open(path, "a") as f:
                f.write(f"# resumed at epoch {self.epoch + 1}, step {self.batch} (global step {self.global_step}) "
                        f"with {changes}\n")

    def _warn_epochs(self, old: int, new: int, step: int) -> None:
        """What a changed ``epochs`` moves: everything defined as a fraction of all training steps."""
        cfg, old_total = self.cfg, old * self.steps_per_epoch
        what = []
        if cfg.schedule != "constant":
            # "stretched" alone hid that the lr can jump: a finished step run's decayed lr goes back up
            # when a milestone (a fraction of the run) moves past the resume point, so say what it does.
            # Step numbers are steps.csv's global_step (1-based); the first resumed one, `step + 1`, already
            # runs at the rebuilt schedule's lr (_load_state).
            from .build import lr_factor

            warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))  # as build_scheduler computes it
            was, now = (cfg.lr * lr_factor(step, total=t, warmup=warmup, schedule=cfg.schedule,
                                           milestones=cfg.milestones, gamma=cfg.gamma)
                        for t in (old_total, self.total_steps))
            change = (f"goes back up from {was:.3g} to" if now > was else
                      f"drops from {was:.3g} to" if now < was else "stays at")
            lr = (f"the lr {change} {now:.3g} at global step {step + 1}, the first resumed one"
                  if step < self.total_steps else "no step is left to run")
            if cfg.schedule == "step":
                at = lambda t: ", ".join(str(round(m * t) + 1) for m in cfg.milestones)  # noqa: E731
                lr += (f"; its milestones are fractions of the run and move from global steps {at(old_total)} to "
                       f"{at(self.total_steps)}" + (", and one that moves past the resume point undoes its decay"
                                                    if now > was and step < self.total_steps else ""))
            what.append(f"the {cfg.schedule} LR schedule is {'stretched' if new > old else 'compressed'} to the new "
                        f"total of {self.total_steps} steps from here on: {lr}")
        if cfg.method in ("jarn", "jarn_at1"):  # as JARNMethod computes its start
            was, now = int(round(cfg.jarn_start * old_total)), int(round(cfg.jarn_start * self.total_steps))
            what.append(f"jarn_start {cfg.jarn_start:g} is a fraction of all training steps, so JARN now starts at "
                        f"step {now} instead of {was} (the run is at step {step})")
        warnings.warn(f"resuming with epochs {old} -> {new}" + (": " + "; ".join(what) if what else ""),
                      RuntimeWarning, stacklevel=2)

    def _claim_out(self, out: str, resume, overwrite: bool) -> None:
        """Refuse to write a new run, or a run resumed from another folder, over an earlier run's
        checkpoint and logs in ``out``, unless told to."""
        # Rank 0 alone looks (the other ranks need not share its filesystem) and every rank acts on
        # its answer, so all of them stop, or all go on, together.
        found = gather_objects(previous_run(out) if self.env.is_main else None, self.env)[0]
        what = ", ".join(found)
        if self.ckpt is not None:  # resuming into a folder other than the checkpoint's
            if found and overwrite:
                self.print(f"--overwrite: resuming {self.resumed_from} in {out} (its {what} are replaced)")
            elif found:
                # only a checkpoint there can be continued; logs alone are an attempt that never saved one
                own = f"--resume {out} to continue that run, " if CHECKPOINT_NAME in found else ""
                raise ConfigError(f"{out} already holds another run ({what}); resuming {self.resumed_from} there "
                                  f"would overwrite it: pass {own}--overwrite to replace it with the resumed run, "
                                  f"or choose another --out")
        elif resume == "auto":  # a restart loop: logs here are from an attempt that never wrote a checkpoint
            self.print(f"--resume auto: no {os.path.join(out, CHECKPOINT_NAME)} yet, starting a new run"
                       + (f"; the logs of the earlier attempt ({what}) are cleared" if found else ""))
        elif found and overwrite:
            self.print(f"--overwrite: starting over in {out} (its {what} are replaced)")
        elif found:
            raise ConfigError(f"{out} already holds a run ({what}): pass --resume to continue it, --overwrite to "
                              f"start over in it (its checkpoint and logs are replaced), or choose another --out")
        self.fresh_logs = bool(found)

    def _take_best_along(self) -> None:
        """A run resumed into another folder brings the best.pt beside its checkpoint, so that the
        record (``self.best``) and the file stay together; without that file the record starts over."""
        src = os.path.join(os.path.dirname(os.path.abspath(self.resumed_from)), BEST_NAME)
        if not os.path.isfile(src):
            self.print(f"note: no {src} beside the checkpoint: best.pt is tracked from this resume on")
            self.best = None
            return
        if self.env.is_main:
            ckpt_io.copy_atomic(src, os.path.join(self.out, BEST_NAME))

    def _warn_unused(self, explicit: set) -> None:
        if not self.env.is_main:
            return
        specific = set().union(*(cls.uses for cls in METHODS.values()))
        used = set(get_method(self.cfg.method).uses) | {"backend"}
        if self.cfg.eval_attack != "none":
            used |= {"attack_eps", "attack_steps", "attack_alpha"}
        for key in sorted(explicit & specific - used):
            warnings.warn(f"config key '{key}' is not used by method {self.cfg.method!r}", RuntimeWarning, stacklevel=3)
        if "fd_step" in explicit & used and self.cfg.mode != "fd":
            warnings.warn("config key 'fd_step' is only used with mode fd (mode is 'autograd')", RuntimeWarning,
                          stacklevel=3)
        # keys a method reads only in some of its variants
        c = self.cfg
        idle = {"n_proj": (c.jacobian_estimator == "exact", "with jacobian_estimator 'exact' (K VJPs, no probes)"),
                "beta": (c.mask_quantile is not None, "when mask_quantile is set (the quantile rule replaces it)"),
                "fgsm_alpha": (c.method == "fgsm_at" and c.fgsm_variant != "random_start",
                               f"by fgsm_variant {c.fgsm_variant!r} (only by 'random_start')")}
        for key, (unused, why) in idle.items():
            if key in explicit & used and unused:
                warnings.warn(f"config key '{key}' is not used {why}", RuntimeWarning, stacklevel=3)

    def _load_state(self, ckpt: dict) -> None:
        # load_checkpoint checked the fields' types; here each state must also fit this run
        parts = [("model", self.net), ("optimizer", self.optimizer), ("scheduler", self.scheduler)]
        if ckpt.get("scaler") is not None and self.scaler.is_enabled():
            parts.append(("scaler", self.scaler))
        for key, target in parts:
            try:
                target.load_state_dict(ckpt[key])
            except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                detail = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise CheckpointError(f"checkpoint {self.resumed_from}: {key!r} does not fit this run: {detail}") \
                    from None
        # The optimizer's saved lr is what the checkpoint's schedule set for the next step. A resume with
        # another `epochs` rebuilds the schedule, whose lr for that step can differ: take the rebuilt
        # one now, or the first resumed step would run at the old schedule's lr (LambdaLR's own formula,
        # so an unchanged schedule gives the same float, and exact resume stays bit for bit).
        sched = self.scheduler
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() returns
        self.epoch, self.batch, self.global_step = ckpt["epoch"], ckpt["batch"], ckpt["global_step"]
        self.counters.update(ckpt["counters"])
        self.metrics = dict(ckpt.get("metrics") or {})
        self._epoch_partial = ckpt.get("epoch_partial") if self.batch else None
        self.best = ckpt.get("best")
        rng = ckpt["rng"]
        if rng["world_size"] == self.env.world_size:
            try:
                ckpt_io.restore_rng(rng["ranks"][self.env.rank], {"method": self.generator}, self.device)
            except (CheckpointError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                detail = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise CheckpointError(f"checkpoint {self.resumed_from}: 'rng' of rank {self.env.rank} cannot be "
                                      f"restored: {detail}") from None
        else:
            warnings.warn(f"checkpoint written by {rng['world_size']} ranks, resumed on {self.env.world_size}: random "
                          f"streams are reseeded (the run continues, but not bit-for-bit)", RuntimeWarning,
                          stacklevel=2)
            from jsigr_fast.data import mix_seed

            s = mix_seed(self.cfg.seed, 7, self.global_step, self.env.rank)
            torch.manual_seed(s)
            self.generator.manual_seed(mix_seed(s, 1))

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch):
        x, y, *extra = batch
        nb = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=nb)
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=nb), [e.to(self.device, non_blocking=nb) for e in extra]

    # --------------------------------------------------------------------------------------------
    def _step(self, x, y, extra, stop: StopSignal, *, step: int):
        """One training step. Returns (terms dict or None when skipped, stop requested on any rank)."""
        self.optimizer.zero_grad(set_to_none=True)
        grad_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        with self._autocast():
            loss, terms = self.method.loss(self.model, x, y, extra, step=step, grad_scale=grad_scale)
        terms = {"loss": loss.detach(), **terms}
        flags = torch.stack([(~torch.isfinite(loss.detach().float())).float(),
                             torch.tensor(float(stop.requested), device=self.device)])
        bad, stop_now = all_reduce_(flags, self.env, dist.ReduceOp.MAX).tolist()
        ok = False
        if not bad:
            self.scaler.scale(loss).backward()
            if self.scaler.is_enabled():
                if self.cfg.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
                before = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.scaler.get_scale() < before:  # inf/NaN gradients: GradScaler skipped the step
                    self.counters["overflow_skips"] += 1
                ok = True
            else:
                params = [p for p in self.net.parameters() if p.grad is not None]
                if self.cfg.grad_clip:
                    norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                else:
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                ok = bool(torch.isfinite(norm))
                if ok:
                    self.optimizer.step()
        del loss
        if ok:
            terms.update(self.method.after_step())
            self.counters["nonfinite_consecutive"] = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.method.after_skip()
            self.counters["nonfinite_total"] += 1
            self.counters["nonfinite_consecutive"] += 1
            what = "loss" if bad else "gradient"
            where = f"epoch {self.epoch + 1}, batch {self.batch + 1}, global step {step + 1}"
            row, total = self.counters["nonfinite_consecutive"], self.counters["nonfinite_total"]
            self.print(f"\nwarning: non-finite {what} at {where}: step skipped ({row} in a row, {total} in all)",
                       file=sys.stderr)
            if self.counters["nonfinite_consecutive"] >= self.cfg.max_nonfinite:
                if self.last_checkpoint is None:
                    last = "No checkpoint was written yet."
                else:
                    path, e, b = self.last_checkpoint
                    last = f"The last checkpoint is {path} ({_where(e, b)})."
                raise NonFiniteError(
                    f"the {what} was non-finite for {self.counters['nonfinite_consecutive']} consecutive steps "
                    f"({where}); stopping with the weights untouched. {last} Try a lower --lr, --grad-clip, "
                    f"--amp bf16 instead of fp16, or check the data for NaN")
        with warnings.catch_warnings():  # skipped steps still advance the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        return (terms if ok else None), bool(stop_now)

    def _train_epoch(self, epoch: int, stop: StopSignal):
        from tqdm import tqdm

        cfg = self.cfg
        self.train_loader.set_epoch(epoch, start_batch=self.batch)
        self.model.train()
        self.method.train(True)
        sums = {k: torch.zeros((), device=self.device, dtype=torch.float64) for k in self.terms}
        counts = dict.fromkeys(self.terms, 0)
        window, wcount = dict(sums), dict(counts)
        before = self._epoch_partial or {"sums": {}, "counts": {}, "seconds": 0.0, "images": 0}
        self._epoch_partial = None
        if self.env.is_main:  # the steps before the resume, already summed over the ranks: added once
            for k in self.terms:
                if before["counts"].get(k):
                    sums[k] = sums[k] + before["sums"][k]
                    counts[k] += before["counts"][k]
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.env.is_main), dynamic_ncols=True, leave=False, file=sys.stderr)
        t_epoch = t_window = time.perf_counter()
        images_epoch, images_window = before["images"], 0
        # what save() reads mid-epoch (the dicts are updated in place; the images count is copied back)
        acc = self._epoch_acc = {"sums": sums, "counts": counts, "start": t_epoch, "seconds": before["seconds"],
                                 "images": images_epoch}
        it = iter(self.train_loader)
        for b in range(self.batch, self.steps_per_epoch):
            x, y, extra = self._to_device(next(it))
            lr = self.optimizer.param_groups[0]["lr"]
            try:
                terms, stop_now = self._step(x, y, extra, stop, step=self.global_step)
                fatal = None
            except NonFiniteError as exc:  # raised below, once steps.csv has the rows up to this step
                terms, stop_now, fatal = None, False, exc
            if terms is not None:
                for k in self.terms:
                    v = terms.get(k)
                    if v is not None:
                        v = v.detach().to(torch.float64)
                        sums[k] = sums[k] + v
                        window[k] = window[k] + v
                        counts[k] += 1
                        wcount[k] += 1
            n = x.shape[0] * self.env.world_size
            images_epoch += n
            images_window += n
            acc["images"] = images_epoch
            self.counters["images"] += n
            self.batch, self.global_step = b + 1, self.global_step + 1
            bar.update(1)
            last = b + 1 == self.steps_per_epoch
            if self.global_step % cfg.log_every == 0 or last or stop_now or fatal is not None:
                keys = [k for k in self.terms if wcount[k]]
                values = torch.stack([window[k] / wcount[k] for k in keys]).tolist() if keys else []
                now = time.perf_counter()
                ips = images_window / max(now - t_window, 1e-9)
                row = {"epoch": epoch + 1, "batch": self.batch, "global_step": self.global_step,
                       "lr": lr, **dict(zip(keys, values)), "img_per_s": ips,
                       "nonfinite_total": self.counters["nonfinite_total"]}
                self.log.step(row)
                post = {k: f"{v:.4g}" for k, v in zip(keys, values) if k in ("loss", "ce", "sig", "jac", "ig", "gen",
                                                                              "cos", "soft_ce", "ce_adv")}
                post["img/s"] = f"{ips:.0f}"
                if self.counters["nonfinite_total"]:
                    post["skipped"] = self.counters["nonfinite_total"]
                bar.set_postfix(post, refresh=False)
                window = {k: torch.zeros_like(v) for k, v in window.items()}
                wcount = dict.fromkeys(self.terms, 0)
                t_window, images_window = now, 0
            if fatal is not None:
                bar.close()
                raise fatal
            if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 and not last:
                self.save()
            if self.step_delay:
                time.sleep(self.step_delay)
            if stop_now:
                bar.close()
                self.save()
                signum = stop.signum or signal.SIGTERM  # another rank's signal: as if SIGTERM
                self.print(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step "
                           f"{self.batch}/{self.steps_per_epoch}; checkpoint {os.path.join(self.out, CHECKPOINT_NAME)} "
                           f"(continue with --resume)", file=sys.stderr)
                return None, 128 + int(signum)
        bar.close()
        self._epoch_acc = None
        seconds = time.perf_counter() - t_epoch + before["seconds"]  # training time, not the downtime between
        keys = list(self.terms)
        totals = torch.stack([sums[k] for k in keys] + [torch.tensor(float(counts[k]), device=self.device,
                                                                     dtype=torch.float64) for k in keys])
        totals = all_reduce_(totals, self.env).tolist()
        means = {k: totals[i] / totals[len(keys) + i] for i, k in enumerate(keys) if totals[len(keys) + i]}
        return {"seconds": seconds, "img_per_s": images_epoch / max(seconds, 1e-9), **means}, None

    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Clean (and, with eval_attack, adversarial) accuracy on the test split, in eval mode, fp32."""
        from jsigr_fast import attacks
        from jsigr_fast.data import mix_seed

        cfg, net = self.cfg, self.net
        net.eval()
        gen = torch.Generator(self.device).manual_seed(mix_seed(cfg.seed, 4, epoch, self.env.rank))
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # correct, adversarial correct, total
        for i, batch in enumerate(self.eval_loader):
            if cfg.eval_max_batches is not None and i >= cfg.eval_max_batches:
                break
            x, y, _ = self._to_device(batch)
            stats[0] += (net(x).argmax(1) == y).sum()
            stats[2] += y.numel()
            if cfg.eval_attack != "none":
                with torch.enable_grad():
                    if cfg.eval_attack == "fgsm":
                        xa = attacks.fgsm(net, x, y, cfg.attack_eps)
                    else:
                        xa = attacks.pgd(net, x, y, cfg.attack_eps, alpha=cfg.attack_alpha, steps=cfg.attack_steps,
                                         generator=gen)
                stats[1] += (net(xa).argmax(1) == y).sum()
        net.train()
        correct, adv, total = all_reduce_(stats, self.env).tolist()
        out = {"eval_clean": correct / max(total, 1)}
        if cfg.eval_attack != "none":
            out["eval_adv"] = adv / max(total, 1)
        return out

    def _fingerprint(self) -> list:
        mods = [self.net] + [m for m in self.method.modules().values()]
        return [float(sum(p.detach().double().sum() for p in m.parameters())) for m in mods]

    def _partial_epoch(self) -> dict:
        """The epoch-in-progress totals behind epochs.csv's means, summed over the ranks (every rank
        calls this): the steps so far, so that a resumed epoch still reports all of its steps."""
        acc, keys = self._epoch_acc, list(self.terms)
        counts = [torch.tensor(float(acc["counts"][k]), device=self.device, dtype=torch.float64) for k in keys]
        totals = all_reduce_(torch.stack([acc["sums"][k] for k in keys] + counts), self.env).tolist()
        n = len(keys)
        kept = [i for i in range(n) if totals[n + i]]
        return {"sums": {keys[i]: totals[i] for i in kept}, "counts": {keys[i]: int(totals[n + i]) for i in kept},
                "seconds": acc["seconds"] + time.perf_counter() - acc["start"], "images": int(acc["images"])}

    def save(self) -> str:
        """Write ``<out>/last.pt`` (rank 0) with every rank's RNG state; all ranks take part."""
        rngs = gather_objects(ckpt_io.capture_rng({"method": self.generator}, self.device), self.env)
        prints = gather_objects(self._fingerprint(), self.env)
        partial = self._partial_epoch() if self._epoch_acc is not None and self.batch else None  # collective
        path = os.path.join(self.out, CHECKPOINT_NAME)
        if self.env.is_main:
            if any(p != prints[0] for p in prints[1:]):
                warnings.warn(f"ranks hold different weights (parameter sums {prints}); DDP replicas diverged",
                              RuntimeWarning, stacklevel=2)
            model_state = self.net.state_dict()
            ckpt_io.check_finite_state(model_state, "the model")
            state = {
                "format": ckpt_io.FORMAT,
                "versions": {"jsigr_fast": _version(), "torch": str(torch.__version__)},
                "config": to_dict(self.cfg),
                "arch": self.arch,
                "epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                "model": model_state,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "method": self.method.state_dict(),
                "counters": dict(self.counters),
                "rng": {"world_size": self.env.world_size, "ranks": rngs},
                "ranks": {"world_size": self.env.world_size, "fingerprints": prints},
                "metrics": dict(self.metrics),
                "epoch_partial": partial,
                "best": self.best,
            }
            ckpt_io.save_atomic(state, path)
        if self.env.distributed:
            dist.barrier()
        self.last_checkpoint = (path, self.epoch, self.batch)
        return path

    # --------------------------------------------------------------------------------------------
    def _header(self) -> None:
        cfg, s, env = self.cfg, self.spec, self.env
        n_params = sum(p.numel() for p in self.net.parameters())
        shape = "x".join(str(d) for d in s.input_shape)
        data = f"{cfg.dataset}{' (synthetic)' if cfg.synthetic else ''}"
        self.print(f"jsigr-fast train: {data}, {len(s.train)} train / {len(s.test)} test images of {shape}, "
                   f"{s.num_classes} classes")
        self.print(f"  model {self.arch['model']} ({n_params:,} parameters), {env.world_size} x {self.device.type}, "
                   f"amp {cfg.amp}, batch {cfg.batch_size} ({self.per_rank_batch} per rank), "
                   f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, {cfg.optimizer} lr {cfg.lr} "
                   f"{cfg.schedule}")
        self.print(f"  {self.method.describe()}")
        where = "new run"
        if self.ckpt and self.epoch >= cfg.epochs:
            where = (f"resumed from {self.resumed_from}, which has finished {self.epoch} of {cfg.epochs} epochs: "
                     f"nothing to do (raise --epochs to train longer)")
        elif self.ckpt:
            within = (f"after its first {self.batch} of {self.steps_per_epoch} steps" if self.batch
                      else "from its start")
            where = f"resumed from {self.resumed_from}: epoch {self.epoch + 1} of {cfg.epochs}, {within}"
        self.print(f"  out: {self.out} ({where})")

    def fit(self) -> int:
        """Train to the end (0), or stop on a signal after checkpointing (128 + signum)."""
        cfg = self.cfg
        with StopSignal() as stop:
            if cfg.throughput_steps:
                from .throughput import measure

                return measure(self, stop)
            self._header()
            for epoch in range(self.epoch, cfg.epochs):
                stats, code = self._train_epoch(epoch, stop)
                if code is not None:
                    return code
                self.epoch, self.batch = epoch + 1, 0
                row = {"epoch": epoch + 1, "global_step": self.global_step, **stats,
                       "nonfinite_total": self.counters["nonfinite_total"],
                       "overflow_skips": self.counters["overflow_skips"]}
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    row.update(self.evaluate(epoch))
                self.metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
                metric = cfg.keep_best
                improved = metric in row and (self.best is None or self.best["metric"] != metric
                                              or row[metric] > self.best["value"])
                if improved:  # recorded first, so that best.pt (a copy of this last.pt) says so too
                    self.best = {"metric": metric, "value": float(row[metric]), "epoch": epoch + 1}
                self.save()
                if improved and self.env.is_main:
                    ckpt_io.copy_atomic(os.path.join(self.out, CHECKPOINT_NAME), os.path.join(self.out, BEST_NAME))
                self.log.epoch(row)
                terms = " ".join(f"{k} {row[k]:.4g}" for k in self.terms if k in row)
                acc = "".join(f" | {k} {row[k]:.4f}" for k in ("eval_clean", "eval_adv") if k in row)
                best = f" | best {metric} so far: {BEST_NAME}" if improved else ""
                self.print(f"epoch {epoch + 1}/{cfg.epochs}: {terms} | {row['img_per_s']:.0f} img/s, "
                           f"{row['seconds']:.1f} s{acc}{best}")
                # a signal during evaluation / checkpointing: already saved; every rank stops together
                flag = torch.tensor(float(stop.signum or 0), device=self.device)
                signum = int(all_reduce_(flag, self.env, dist.ReduceOp.MAX))
                if signum:
                    return 128 + signum
            self.print(f"done: {os.path.join(self.out, CHECKPOINT_NAME)}")
            return 0

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        torch.set_num_threads(self._saved_threads)
        if self.env is not None:
            teardown(self.env)


def _version() -> str:
    import jsigr_fast

    return jsigr_fast.__version__


def train(cfg: TrainConfig, *, resume: str | None = None, overwrite: bool = False, model: nn.Module | None = None,
          explicit=frozenset()) -> int:
    """Build a :class:`Trainer` and run it; returns the exit code (0 done, 128 + signum stopped)."""
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite, model=model, explicit=explicit)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
