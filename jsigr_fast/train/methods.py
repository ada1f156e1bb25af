"""The training methods: one small class per method, registered by name in ``METHODS``.

Every method sees the same model, data, optimizer and schedule; only ``loss`` differs. A method
returns ``(loss, terms)``: the scalar the trainer calls ``backward()`` on once, and detached 0-d
tensors for the log. Randomness comes from ``ctx.generator`` (saved in checkpoints). Auxiliary
passes (attacks, SmoothGrad, teachers) run on the unwrapped model, with BatchNorm running
statistics frozen (the library's attacks do that), so DDP sees exactly one forward and one
backward per step. State beyond the classifier (J-SIGR / JARN adaptor + discriminator with their
optimizers; teacher weights) is in ``state_dict()`` and travels in the checkpoint.

Exact semantics (per batch ``x, y``; all terms are per-sample means):

=============  ===================================================================================
standard       ``CE(f(x), y)``
jsigr          ``CE + lambda_m mean||m * grad_x l||^2 + lambda_j mean||J||_F^2`` (J-SIGR Eq. 10) with
               the mask from the trained adaptor's saliency of the gradient at ``x + eps std(x) z``;
               adaptor step every call, discriminator every ``disc_every`` (JSIGR criterion)
jacobian       ``CE + lambda_j mean||J||_F^2``, or ``CE + lambda_j sqrt(sum||J||_F^2) / N`` with
               ``jacobian_squared=false`` (Jakubovitz & Giryes Eq. 6 / N)
input_grad     ``CE + lambda_ig mean||grad_x l||^2`` (double backprop)
jarn           ``CE(f(x), y)`` before ``jarn_start`` of the steps; then JARN's ``CE(f(x+u)) +
               lambda_adv E log(1 - D(f_apt(grad_x l)))``, ``u ~ U[-noise, noise]``
jarn_at1       as jarn, but on a 1-step random-start FGSM example (``fgsm_at``'s random_start)
               instead of x: FGSM-AT1 before ``jarn_start``, JARN on the adversarial batch after
ir             ``CE - ir_lambda_d mean cos(J_c, I) + ir_lambda_m mean||J_c||`` with ``I`` the
               teacher's SmoothGrad map (online per batch, or precomputed once)
pgd_at         ``CE(f(x_pgd), y)``, l_inf PGD with random start (Madry et al.)
fgsm_at        random_start: ``CE(f(x_adv), y)``, ``x_adv`` one step of ``fgsm_alpha * eps`` from
               ``x + U[-eps, eps]``, projected (Wong et al. 2020). clean_adv: ``mean`` over the batch
               ``[x; x_fgsm]`` of ``CE`` (= half clean + half adversarial loss), ``x_fgsm`` FGSM at the
               model's *predicted* label (no label leaking; J-SIGR §5.1.2)
distill        no teacher: ``CE(f(x) / T, y)`` (stage 1: the teacher at temperature T); with a teacher:
               ``-sum softmax(t(x)/T) log_softmax(f(x)/T)`` (stage 2: the distilled student)
=============  ===================================================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .build import build_model
from .checkpoint import load_weights
from .config import TrainConfig
from .errors import CheckpointError, ConfigError

__all__ = ["METHODS", "Method", "MethodContext", "get_method"]


@dataclass
class MethodContext:
    cfg: TrainConfig
    device: torch.device
    input_shape: tuple
    arch: dict  # the student's architecture (a teacher given as a plain state_dict uses it)
    generator: torch.Generator
    total_steps: int
    channels_last: bool = False


def _unwrap(model: nn.Module) -> nn.Module:
    from jsigr_fast import unwrap_parallel

    return unwrap_parallel(model)


def _mode(cfg) -> str:
    """The describe() suffix of a gradient penalty taken by finite differences."""
    return f", finite differences (step {cfg.fd_step:g})" if cfg.mode == "fd" else ""


def _ce(model, x, y):
    ce = F.cross_entropy(model(x), y)
    return ce, {"ce": ce.detach()}


class Method:
    """Base class. Subclasses set ``name``, ``uses`` (config keys they read: setting any other
    method's key explicitly draws a warning) and ``terms`` (the logged loss terms)."""

    name = ""
    uses: tuple = ()
    terms: tuple = ("ce",)

    def __init__(self, cfg: TrainConfig, ctx: MethodContext, state: Optional[dict] = None):
        self.cfg, self.ctx = cfg, ctx

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: list, *, step: int, grad_scale=None):
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def state_dict(self) -> dict:
        return {}

    def modules(self) -> dict:
        """Stateful modules besides the classifier (moved to the device, fingerprinted under DDP)."""
        return {}

    def after_step(self) -> dict:
        """Called once the classifier's step was accepted on every rank: commit the method's own
        updates (the J-SIGR/JARN adaptor and discriminator). Returns extra log terms."""
        return {}

    def after_skip(self) -> None:
        """Called when the step was skipped on every rank: drop what the loss call staged."""

    def train(self, mode: bool = True) -> None:
        pass

    def prepare_data(self, spec, log=print):
        return spec


# --------------------------------------------------------------------------------------------------
class Standard(Method):
    name = "standard"

    def loss(self, model, x, y, extra, *, step, grad_scale=None):
        return _ce(model, x, y)


class _CriterionMethod(Method):
    """J-SIGR and JARN: the library's stateful criterion owns the adaptor/discriminator pair."""

    def __init__(self, cfg, ctx, state=None):
        super().__init__(cfg, ctx, state)
        self.crit = self._make_criterion().to(ctx.device)
        if state is not None:
            try:
                self.crit.load_state_dict(state["criterion"])
            except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
                detail = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise CheckpointError(f"the {self.name} adaptor/discriminator state does not fit this "
                                      f"configuration: {detail}") from None

    def state_dict(self):
        return {"criterion": self.crit.state_dict()}

    def modules(self):
        return {"criterion": self.crit}

    def after_step(self):
        # The criterion defers its adaptor/discriminator steps (auto_step=False) so that a skipped,
        # non-finite step moves nothing; under DDP it averages their gradients over ranks itself.
        return self.crit.step()

    def after_skip(self):
        self.crit.discard()

    def train(self, mode=True):
        self.crit.train(mode)

    def _gan_kwargs(self):
        c = self.cfg
        return dict(discriminator=c.disc, disc_every=c.disc_every, adaptor_lr=c.adaptor_lr, disc_lr=c.disc_lr,
                    generator_loss=c.generator_loss, auto_step=False)


class JSIGRMethod(_CriterionMethod):
    name = "jsigr"
    uses = ("lambda_m", "lambda_j", "jsigr_eps", "beta", "mask_quantile", "jacobian_estimator", "n_proj", "disc",
            "disc_every", "adaptor_lr", "disc_lr", "generator_loss", "backend", "mode", "fd_step")
    terms = ("ce", "sig", "jac", "mask_fraction", "gen", "disc")

    def _make_criterion(self):
        from jsigr_fast import JSIGR

        c = self.cfg
        return JSIGR(self.ctx.input_shape, lambda_m=c.lambda_m, lambda_j=c.lambda_j, eps=c.jsigr_eps, beta=c.beta,
                     mask_quantile=c.mask_quantile, jacobian=c.jacobian_estimator, n_proj=c.n_proj,
                     backend=c.backend, mode=c.mode, fd_step=c.fd_step, **self._gan_kwargs())

    def loss(self, model, x, y, extra, *, step, grad_scale=None):
        return self.crit(model, x, y, return_terms=True, generator=self.ctx.generator, grad_scale=grad_scale)

    def describe(self):
        c = self.cfg
        mask = f"mask_quantile={c.mask_quantile}" if c.mask_quantile is not None else f"beta={c.beta}"
        return (f"jsigr: CE + {c.lambda_m}*R_sig + {c.lambda_j}*R_j ({c.jacobian_estimator}, n_proj={c.n_proj}), "
                f"eps={c.jsigr_eps}, {mask}, disc {c.disc} every {c.disc_every}{_mode(c)}")


class JARNMethod(_CriterionMethod):
    name = "jarn"
    uses = ("lambda_adv", "jarn_noise", "jarn_start", "disc", "disc_every", "adaptor_lr", "disc_lr",
            "generator_loss", "backend")
    terms = ("ce", "gen", "adv", "disc")

    def __init__(self, cfg, ctx, state=None):
        super().__init__(cfg, ctx, state)
        self.start_step = int(round(cfg.jarn_start * ctx.total_steps))

    def _make_criterion(self):
        from jsigr_fast import JARN

        return JARN(self.ctx.input_shape, lambda_adv=self.cfg.lambda_adv, noise=self.cfg.jarn_noise,
                    backend=self.cfg.backend, **self._gan_kwargs())

    def _inputs(self, model, x, y):
        return x

    def loss(self, model, x, y, extra, *, step, grad_scale=None):
        x = self._inputs(model, x, y)
        if step < self.start_step:
            return _ce(model, x, y)
        return self.crit(model, x, y, return_terms=True, generator=self.ctx.generator, grad_scale=grad_scale)

    def describe(self):
        c = self.cfg
        return (f"{self.name}: JARN (lambda_adv={c.lambda_adv}, noise={c.jarn_noise:.4g}, disc {c.disc} every "
                f"{c.disc_every}) from step {self.start_step} of {self.ctx.total_steps}")


def _fgsm_random_start(model, x, y, cfg, generator):
    """Wong et al. (2020): x + U[-eps, eps], one signed step of fgsm_alpha * eps, projected onto the
    eps-ball and [0, 1]: exactly one step of the library's PGD with a random start."""
    from jsigr_fast.attacks import pgd

    return pgd(_unwrap(model), x, y, cfg.attack_eps, alpha=cfg.fgsm_alpha * cfg.attack_eps, steps=1,
               random_start=True, generator=generator)


class JARNAT1Method(JARNMethod):
    name = "jarn_at1"
    uses = JARNMethod.uses + ("attack_eps", "fgsm_alpha")

    def _inputs(self, model, x, y):
        return _fgsm_random_start(model, x, y, self.cfg, self.ctx.generator)

    def describe(self):
        return super().describe() + f"; inputs: 1-step FGSM eps={self.cfg.attack_eps:.4g} random start"


class JacobianMethod(Method):
    name = "jacobian"
    uses = ("lambda_j", "jacobian_estimator", "n_proj", "jacobian_squared", "backend", "mode", "fd_step")
    terms = ("ce", "jac")

    def loss(self, model, x, y, extra, *, step, grad_scale=None):
        from jsigr_fast import jacobian_regularization

        c = self.cfg
        return jacobian_regularization(model, x, y, lambda_j=c.lambda_j, squared=c.jacobian_squared,
                                       estimator=c.jacobian_estimator, n_proj=c.n_proj, backend=c.backend,
                                       return_terms=True, generator=self.ctx.generator, grad_scale=grad_scale,
                                       mode=c.mode, fd_step=c.fd_step)

    def describe(self):
        c = self.cfg
        reg = "mean ||J||_F^2" if c.jacobian_squared else "sqrt(sum ||J||_F^2) / N"
        return f"jacobian: CE + {c.lambda_j}*{reg} ({c.jacobian_estimator}, n_proj={c.n_proj}){_mode(c)}"


class InputGradMethod(Method):
    name = "input_grad"
    uses = ("lambda_ig", "backend", "mode", "fd_step")
    terms = ("ce", "ig")

    def loss(self, model, x, y, extra, *, step, grad_scale=None):
        from jsigr_fast import double_backprop

        c = self.cfg
        loss, t = double_backprop(model, x, y, lambda_ig=c.lambda_ig, backend=c.backend, return_terms=True,
                                  grad_scale=grad_scale, mode=c.mode, fd_step=c.fd_step)
        return loss, {"ce": t["ce"], "ig": t["sig"]}

    def describe(self):
        return f"input_grad: CE + {self.cfg.lambda_ig}*mean||grad_x l||^2{_mode(self.cfg)}"


class PGDATMethod(Method):
    name = "pgd_at"
    uses = ("attack_eps", "attack_steps", "attack_alpha")
    terms = ("ce",)

    def loss(self, model, x, y, extra, *, step, grad_scale=None):
        from jsigr_fast.attacks import pgd

        c = self.cfg
        x_adv = pgd(_unwrap(model), x, y, c.attack_eps, alpha=c.attack_alpha, steps=c.attack_steps,
                    random_start=True, generator=self.ctx.generator)
        return _ce(model, x_adv, y)

    def describe(self):
        c = self.cfg
        return f"pgd_at: l_inf eps={c.attack_eps:.4g}, {c.attack_steps} steps of {c.attack_alpha:.4g}, random start"


class FGSMATMethod(Method):
    name = "fgsm_at"
    uses = ("attack_eps", "fgsm_variant", "fgsm_alpha")
    terms = ("ce", "ce_clean", "ce_adv")

    def __init__(self, cfg, ctx, state=None):
        super().__init__(cfg, ctx, state)
        if cfg.fgsm_variant == "random_start":  # one adversarial batch: no clean / adversarial split to log
            self.terms = ("ce",)

    def loss(self, model, x, y, extra, *, step, grad_scale=None):
        c = self.cfg
        if c.fgsm_variant == "random_start":
            return _ce(model, _fgsm_random_start(model, x, y, c, self.ctx.generator), y)
        # clean_adv: FGSM at the predicted label, from one forward at x (prediction and gradient).
        from jsigr_fast.batchnorm import frozen_running_stats

        base = _unwrap(model)
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad(), frozen_running_stats(base):
            logits = base(xg)
            pred = logits.detach().argmax(1)
            (g,) = torch.autograd.grad(F.cross_entropy(logits, pred, reduction="sum"), xg)
        x_adv = (x + c.attack_eps * g.sign()).clamp(0.0, 1.0).detach()
        n = x.shape[0]
        per = F.cross_entropy(model(torch.cat([x, x_adv])), torch.cat([y, y]), reduction="none")
        loss = per.mean()
        return loss, {"ce": loss.detach(), "ce_clean": per[:n].mean().detach(), "ce_adv": per[n:].mean().detach()}

    def describe(self):
        c = self.cfg
        if c.fgsm_variant == "random_start":
            return f"fgsm_at: random start, step {c.fgsm_alpha}*eps, eps={c.attack_eps:.4g}"
        return f"fgsm_at: mean CE of clean and FGSM(predicted label) batches, eps={c.attack_eps:.4g}"


# --------------------------------------------------------------------------------------------------
class _TeacherMethod(Method):
    """A method with a frozen teacher network: loaded from ``--teacher`` at the start, from the
    run's own checkpoint on resume (so the teacher file need not exist any more)."""

    teacher: Optional[nn.Module] = None

    def __init__(self, cfg, ctx, state=None):
        super().__init__(cfg, ctx, state)
        self.teacher_arch = self.teacher_info = None
        if state is not None and state.get("teacher") is not None:
            arch = state.get("teacher_arch")
            if not (isinstance(arch, dict) and isinstance(arch.get("model"), str)
                    and isinstance(arch.get("kwargs", {}), dict) and isinstance(state["teacher"], dict)):
                raise CheckpointError(f"the teacher needs 'teacher' (a state_dict) and 'teacher_arch' "
                                      f"({{'model': name, 'kwargs': {{...}}}}), got teacher_arch {arch!r}"[:300])
            self._set_teacher(arch, state["teacher"], source="the checkpoint")
            self.teacher_info = state.get("teacher_info")
            if self.teacher_info is not None and not isinstance(self.teacher_info, dict):
                raise CheckpointError(f"'teacher_info' must be a mapping or None, got {self.teacher_info!r}"[:300])
        elif cfg.teacher:
            sd, arch, conf = load_weights(cfg.teacher)
            self._set_teacher(arch or ctx.arch, sd, source=cfg.teacher)
            if conf is not None:
                self.teacher_info = {"method": conf.get("method"), "temperature": conf.get("temperature")}

    def _set_teacher(self, arch, state_dict, source):
        from .checkpoint import load_model_weights

        teacher = build_model(arch)
        load_model_weights(teacher, state_dict, f"teacher {source} ({arch['model']})")
        teacher.eval().to(self.ctx.device)
        if self.ctx.channels_last:
            teacher.to(memory_format=torch.channels_last)
        self.teacher, self.teacher_arch = teacher, arch

    def state_dict(self):
        if self.teacher is None:
            return {"teacher": None}
        return {"teacher": self.teacher.state_dict(), "teacher_arch": self.teacher_arch,
                "teacher_info": self.teacher_info}

    def modules(self):
        return {"teacher": self.teacher} if self.teacher is not None else {}


class IRMethod(_TeacherMethod):
    name = "ir"
    uses = ("teacher", "ir_lambda_d", "ir_lambda_m", "ir_targets", "ir_samples", "ir_sigma", "ir_phi", "backend")
    terms = ("ce", "cos", "mag")

    def _targets(self, x, y, generator):
        from jsigr_fast import smoothgrad

        c = self.cfg
        return smoothgrad(self.teacher, x, y, n_samples=c.ir_samples, sigma=c.ir_sigma, phi=c.ir_phi,
                          chunk=min(c.ir_samples, 10), generator=generator)

    def prepare_data(self, spec, log=print):
        if self.cfg.ir_targets != "precompute":
            return spec
        if spec.augmented:
            raise ConfigError("ir_targets=precompute needs un-augmented training images; use ir_targets=online")
        import time

        from jsigr_fast.data import make_loader, mix_seed

        from .data import WithTargets

        start = time.perf_counter()
        g = torch.Generator(self.ctx.device).manual_seed(mix_seed(self.cfg.seed, 3))
        loader = make_loader(spec.train, self.cfg.eval_batch_size or self.cfg.batch_size, train=False)
        chunks = []
        for x, y in loader:
            x, y = x.to(self.ctx.device), y.to(self.ctx.device)
            chunks.append(self._targets(x, y, g).cpu())
        spec.train = WithTargets(spec.train, torch.cat(chunks))
        log(f"ir: precomputed SmoothGrad targets ({self.cfg.ir_samples} samples) for {len(spec.train)} images "
            f"in {time.perf_counter() - start:.1f} s")
        return spec

    def loss(self, model, x, y, extra, *, step, grad_scale=None):
        from jsigr_fast import interpretation_regularization

        c = self.cfg
        targets = extra[0] if extra else self._targets(x, y, self.ctx.generator)
        return interpretation_regularization(model, x, y, targets, lambda_d=c.ir_lambda_d, lambda_m=c.ir_lambda_m,
                                             backend=c.backend, return_terms=True, grad_scale=grad_scale)

    def describe(self):
        c = self.cfg
        return (f"ir: CE - {c.ir_lambda_d}*cos(J_c, I) + {c.ir_lambda_m}*||J_c||; I = teacher SmoothGrad "
                f"({c.ir_samples} samples, sigma={c.ir_sigma}, phi={c.ir_phi}, {c.ir_targets})")


class DistillMethod(_TeacherMethod):
    name = "distill"
    uses = ("teacher", "temperature")
    terms = ("ce", "soft_ce")

    def __init__(self, cfg, ctx, state=None):
        super().__init__(cfg, ctx, state)
        info = self.teacher_info or {}
        if self.teacher is not None and info.get("method") is not None and (
                info.get("method") != "distill" or info.get("temperature") != cfg.temperature):
            import warnings

            warnings.warn(f"distill: the teacher was trained with method={info.get('method')!r}, "
                          f"temperature={info.get('temperature')}; defensive distillation expects a teacher trained "
                          f"with --method distill --temperature {cfg.temperature}", RuntimeWarning, stacklevel=2)

    def loss(self, model, x, y, extra, *, step, grad_scale=None):
        T = self.cfg.temperature
        logits = model(x)
        if self.teacher is None:  # stage 1: the teacher itself, trained at temperature T
            loss = F.cross_entropy(logits / T, y)
            return loss, {"ce": F.cross_entropy(logits.detach(), y), "soft_ce": loss.detach()}
        # at least float32 (bf16/fp16 logits under autocast are widened), never narrower than the
        # student's own logits: a float64 model keeps float64 (`.float()` used to round it to float32)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.no_grad():
            soft = F.softmax(self.teacher(x).to(dtype) / T, dim=1)
        loss = -(soft * F.log_softmax(logits.to(dtype) / T, dim=1)).sum(1).mean()
        return loss, {"ce": F.cross_entropy(logits.detach(), y), "soft_ce": loss.detach()}

    def describe(self):
        T = self.cfg.temperature
        if self.teacher is None:
            return f"distill (stage 1, teacher): CE(f(x)/{T:g}, y)"
        return f"distill (stage 2, student): soft CE at T={T:g} against the teacher's softmax(t(x)/{T:g})"


METHODS = {cls.name: cls for cls in (Standard, JSIGRMethod, JacobianMethod, InputGradMethod, JARNMethod,
                                     JARNAT1Method, IRMethod, PGDATMethod, FGSMATMethod, DistillMethod)}


def get_method(name: str):
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
