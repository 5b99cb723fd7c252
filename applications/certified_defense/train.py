"""Training a denoiser in front of a query-only classifier (denoised smoothing), on the shared loop.

Salman et al. 2020 ("Denoised Smoothing") put a denoiser D before a fixed classifier f and certify
the smoothed f∘D. Objectives, with δ ~ N(0, σ²I) in pixel space:

    MSE   ‖D(x + δ) − x‖²                       (needs no classifier: trained by backprop on D alone)
    Stab  CE(f(D(x + δ)), argmax f(x))          (needs f: no labels, only the classifier's answers)

``mse+stab`` pre-trains with MSE, then trains Stab — the best recipe. How Stab gets its gradient:

- ``fo-ds``: backprop through f — the white-box upper bound (needs the classifier module);
- ``zo-ae-ds`` (Zhang et al., ICLR 2022): D → encoder → z → [decoder → f] where the bracket is the
  black box; ZO in z only (RGE with q directions, or central CGE), chain rule through encoder and D;
- ``zo-ds`` (DeepZero, Chen et al. 2024): sparse CGE (ZO-GraSP ratios, fresh random masks every
  epoch) directly on D's parameters, with f as the model's last, query-only stage, through the
  fast exact engine.

Every query to the classifier during training is counted by its ``core.BlackBox`` (``queries``);
a ``target.budget`` stops the run with its checkpoint kept. Evaluation queries go through a
separate counter.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from applications.certified_defense.config import DefenseConfig
from core.blackbox import BlackBox, BudgetExceeded
from core.runtime.cli import resolve_device
from core.runtime.data import Dataset, DataSplit, batches, load_dataset
from core.runtime.errors import TrainingDiverged
from core.runtime.experiment import Experiment
from core.runtime.seeding import seed_everything


def labels_of(out: torch.Tensor) -> torch.Tensor:
    """Class labels from a black box's answer: logits [N, K] → argmax, labels [N] as they are."""
    return out.argmax(1) if out.dim() == 2 else out.long()


class DefenseExperiment(Experiment):
    """One denoiser training run (one method) against one black-box classifier."""

    app = "defense"
    plot_metric = "noisy_accuracy"
    single_process_reason = ("every rank would query the classifier itself (pseudo-labels, ZO-GraSP, evaluation), "
                             "its queries and target.budget counted per process")

    @property
    def stop_errors(self):            # a budget running out, or the classifier failing mid-run
        from applications.certified_defense.targets import TargetError

        return (BudgetExceeded, TargetError)

    def __init__(self, cfg: DefenseConfig, *, resume: dict[str, Any] | None = None, data: Dataset | None = None,
                 target=None) -> None:
        from core.models import build_model, model_spec

        super().__init__(cfg, resume=resume)
        self.device = resolve_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        self.data = data or load_dataset(cfg.data.name, cfg.data.data_root, image_size=cfg.data.image_size,
                                         normalize=False)
        if cfg.data.train_subset:
            self.data.train = DataSplit(self.data.train.x[:cfg.data.train_subset],
                                        self.data.train.y[:cfg.data.train_subset])
        self.data.test = DataSplit(self.data.test.x[:cfg.data.test_subset], self.data.test.y[:cfg.data.test_subset])
        self.target = target or target_from_config(cfg, self.data)
        method = cfg.optim.method
        if method == "fo-ds" and cfg.stab_epochs:
            if self.target.white_box is None:
                raise ValueError("optim.method=fo-ds backpropagates through the classifier, but this target is "
                                 "query-only; use zo-ds or zo-ae-ds, or a checkpoint/trained target")
            self.target.white_box.to(self.device)        # backprop runs through it, beside D
            for p in self.target.white_box.parameters():
                p.requires_grad_(False)
        # the training black box: budget and max_batch from the config; evaluation has its own counter
        fn = self.target.blackbox
        self.box = BlackBox(fn, budget=cfg.target.budget or None, max_batch=cfg.target.max_batch or None,
                            name="classifier")
        self.eval_box = BlackBox(fn, max_batch=cfg.target.max_batch or None, name="classifier-eval")
        c = self.data.input_shape[0]
        self.model = build_model("dncnn", in_channels=c, depth=cfg.denoiser.depth,
                                 width=cfg.denoiser.width).to(self.device)
        self.model_spec = model_spec(self.model)
        self._steps = math.ceil(len(self.data.train) / cfg.data.batch_size)
        self.pre_optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.denoiser.pretrain_lr)
        self.ae = None
        if method == "zo-ae-ds":
            self.ae = build_model("autoencoder", in_channels=c, width=cfg.ae.width,
                                  latent_channels=cfg.ae.latent_channels, downsamples=cfg.ae.downsamples).to(self.device)
            if resume is None:
                self._pretrain_autoencoder()
            else:
                self.ae.load_state_dict(resume["app_state"]["ae"])
        self.pseudo = self._pseudo_labels() if cfg.stab_epochs and method != "fo-ds" else None
        trainable = list(self.model.parameters()) + (list(self.ae.encoder.parameters()) if self.ae else [])
        if method == "fo-ds":
            # the white-box baseline trains Stab as Salman et al. do: Adam (denoiser.pretrain_lr); SGD at the
            # ZO learning rate diverges on full first-order gradients
            self.optimizer = torch.optim.Adam(trainable, lr=cfg.denoiser.pretrain_lr)
            self.scheduler = None
        else:
            self.optimizer, self.scheduler = self._stab_optimizer(trainable)
        self.composite = None
        if method == "zo-ds" and cfg.stab_epochs and resume is not None and resume.get("estimator") is not None:
            self._setup_zo_ds()          # resuming in the Stab phase: its ratios and plan come from the checkpoint

    # -- set-up ------------------------------------------------------------------------------------
    def _stab_optimizer(self, params):
        from core.runtime.blocks import make_optimizer

        return make_optimizer(self.cfg.optim, params, self._steps)

    def _pretrain_autoencoder(self) -> None:
        """ZO-AE-DS's autoencoder: reconstruction of clean training images (pixel-wise binary
        cross-entropy on the sigmoid output), by backprop — it is ours."""
        cfg, ae = self.cfg, self.ae
        opt = torch.optim.Adam(ae.parameters(), lr=cfg.ae.lr)
        gen = torch.Generator().manual_seed(cfg.run.seed + 41)
        for _ in range(cfg.ae.epochs):
            for x, _ in batches(self.data.train, cfg.data.batch_size, shuffle=True, generator=gen):
                x = x.to(self.device)
                opt.zero_grad(set_to_none=True)
                F.binary_cross_entropy(ae(x), x).backward()    # MSE stalls at an all-black image on MNIST
                opt.step()
        ae.eval()
        for p in ae.decoder.parameters():          # the decoder becomes part of the black box
            p.requires_grad_(False)

    @torch.no_grad()
    def _pseudo_labels(self) -> torch.Tensor:
        """Stab's targets argmax f(x) on the clean training images: one query per image, counted once."""
        if self.resume is not None and self.resume["app_state"].get("pseudo") is not None:
            return self.resume["app_state"]["pseudo"]
        out = [labels_of(self.box(x.to(self.device))) for x, _ in
               batches(self.data.train, max(self.cfg.data.batch_size, 256), shuffle=False)]
        return torch.cat(out).cpu()

    def _setup_zo_ds(self) -> None:
        from core.runtime.blocks import make_estimator, sparsity_ratios
        from core.sparsity import SparsityPlan

        cfg = self.cfg
        self.composite = nn.Sequential(self.model, self.box)
        params = list(self.model.parameters())
        if self.resume is not None:
            self.ratios = self.resume.get("ratios")
        else:
            g = torch.Generator().manual_seed(cfg.run.seed + 5)
            idx = torch.randperm(len(self.data.train), generator=g)[:cfg.zo.grasp_per_class * 10]
            x = self.data.train.x[idx].to(self.device)
            x = x + cfg.denoiser.sigma * torch.randn(x.shape, generator=g).to(x)
            self.ratios = sparsity_ratios(cfg.zo, self.composite, F.cross_entropy, x, self.pseudo[idx].to(self.device),
                                          seed=cfg.run.seed)
        if self.ratios is not None:
            self.plan = SparsityPlan(self.composite, self.ratios, refresh_every=cfg.zo.refresh_epochs * self._steps,
                                     seed=cfg.run.seed + 3)
        self.estimator = make_estimator(cfg.zo, "zo-cge", self.composite, plan=self.plan, seed=cfg.run.seed,
                                        params=params)

    # -- the loop's parts --------------------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        return self.cfg.mse_epochs + self.cfg.stab_epochs

    @property
    def queries(self) -> int:
        """Training queries to the classifier (pseudo-labels, ZO-GraSP and every ZO evaluation)."""
        return int(self.box.queries) + self.fo_queries

    def phase(self, epoch: int) -> str:
        return "mse" if epoch < self.cfg.mse_epochs else "stab"

    def batches(self, epoch: int):
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + epoch)
        order = torch.randperm(len(self.data.train), generator=gen)
        bs = self.cfg.data.batch_size
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            yield idx, self.data.train.x[idx].to(self.device)

    def steps_per_epoch(self) -> int:
        return self._steps

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + self.step)
        return self.cfg.denoiser.sigma * torch.randn(x.shape, generator=gen).to(x)

    def train_step(self, batch) -> dict[str, float]:
        idx, x = batch
        noisy = x + self._noise(x)
        if self.phase(self.epoch) == "mse":
            self.pre_optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(self.model(noisy), x)
            loss.backward()
            self.pre_optimizer.step()
            return {"loss": float(loss.detach())}
        method = self.cfg.optim.method
        if method == "zo-ds":
            if self.estimator is None:   # ZO-GraSP on the denoiser as the Stab phase starts (after MSE)
                self._setup_zo_ds()
            y = self.pseudo[idx].to(self.device)
            return {"loss": self.optimize(F.cross_entropy, noisy, y)}
        self.optimizer.zero_grad(set_to_none=True)
        if method == "fo-ds":
            f = self.target.white_box
            with torch.no_grad():
                y = f(x).argmax(1)
            loss = F.cross_entropy(f(self.model(noisy)), y)
            loss.backward()
            self.fo_queries += 2 * len(x)
        else:
            loss = self._zo_ae_step(noisy, self.pseudo[idx].to(self.device))
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged (loss {float(loss)}) at step {self.step}: lower optim.lr")
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return {"loss": float(loss.detach())}

    def _zo_ae_step(self, noisy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ZO in the latent z = enc(D(x + δ)); the decoder and f form the black box (Zhang et al. 2022)."""
        from core import input_space_backward

        cfg, B = self.cfg, noisy.shape[0]
        z = self.ae.encode(self.model(noisy))

        def per_sample_loss(zb: torch.Tensor) -> torch.Tensor:      # [K·B, ...] → [K·B]
            logits = self.box(self.ae.decode(zb))
            return F.cross_entropy(logits, y.repeat(zb.shape[0] // B), reduction="none")

        gen = torch.Generator(device=z.device).manual_seed(cfg.run.seed * 7_919 + self.step)
        d = z[0].numel()
        return input_space_backward(per_sample_loss, z, method=cfg.ae.zo, mu=cfg.zo.mu, q=cfg.zo.q or d,
                                    central=cfg.ae.zo == "cge", chunk=cfg.zo.objective_batch, generator=gen)

    def front(self) -> nn.Module:
        """What stands before the classifier at certification: D, or D → encoder → decoder (ZO-AE-DS)."""
        return nn.Sequential(self.model, self.ae) if self.ae is not None else self.model

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        front = self.front()
        was = front.training
        front.eval()
        gen = torch.Generator().manual_seed(self.cfg.run.seed + 99)
        mse, correct, n = 0.0, 0, 0
        for x, y in batches(self.data.test, 100, shuffle=False):
            x, y = x.to(self.device), y.to(self.device)
            noisy = x + self.cfg.denoiser.sigma * torch.randn(x.shape, generator=gen).to(x)
            out = front(noisy)
            mse += float(((out - x) ** 2).flatten(1).mean(1).sum())
            correct += int((labels_of(self.eval_box(out)) == y).sum())
            n += len(y)
        front.train(was)
        return {"test_mse": mse / n, "noisy_accuracy": correct / n, "eval_queries": float(self.eval_box.queries)}

    # -- identity and state --------------------------------------------------------------------------
    def run_name(self) -> str:
        return f"{self.cfg.optim.method}-{self.cfg.denoiser.objective}-s{self.cfg.denoiser.sigma:g}"

    def summary(self) -> str:
        cfg = self.cfg
        return (f"{cfg.optim.method} ({cfg.denoiser.objective}, σ={cfg.denoiser.sigma:g}) against "
                f"{self.target.description}, {cfg.mse_epochs} MSE + {cfg.stab_epochs} Stab epochs")

    def tags(self) -> dict[str, Any]:
        return {"method": self.cfg.optim.method, "target": self.target.description,
                "white_box": "yes" if self.cfg.optim.method == "fo-ds" else "no"}

    def blackboxes(self) -> dict[str, Any]:
        return {"classifier": self.box, "classifier-eval": self.eval_box}

    def app_state(self) -> dict[str, Any]:
        return {"pre_optimizer": self.pre_optimizer.state_dict(), "pseudo": self.pseudo,
                "ae": self.ae.state_dict() if self.ae is not None else None,
                "ae_spec": _spec(self.ae), "method": self.cfg.optim.method}

    def load_app_state(self, state: dict[str, Any]) -> None:
        self.pre_optimizer.load_state_dict(state["pre_optimizer"])


def target_from_config(cfg: DefenseConfig, data: Dataset):
    """The classifier as a query-only target: trained here (``target.source=train``) or loaded."""
    from applications.certified_defense.provider import train_target
    from applications.certified_defense.targets import TargetError, load_target, target_from_module

    t = cfg.target
    if t.source == "train":
        full = load_dataset(cfg.data.name, cfg.data.data_root, image_size=cfg.data.image_size, normalize=False)
        model, _ = train_target(full, arch=t.arch, depth=t.depth, width=t.width, epochs=t.epochs, lr=t.lr,
                                batch_size=32, seed=cfg.run.seed, device=resolve_device(cfg.run.device))
        return target_from_module(model.cpu(), data_shape=data.input_shape, num_classes=data.num_classes,
                                  labels_only=t.labels_only, description=f"a {t.arch} trained here")
    try:
        return load_target(t.source, data_shape=data.input_shape, num_classes=data.num_classes,
                           labels_only=t.labels_only, timeout=t.timeout)
    except TargetError as exc:            # at start-up a bad target is the user's input: one line, exit 2
        raise ValueError(f"target: {exc}") from None


def _spec(model):
    from core.models import model_spec

    return model_spec(model) if model is not None else None


def front_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """Rebuild what a defense checkpoint puts before the classifier (D, or D + autoencoder), eval mode."""
    from core.models import from_spec

    denoiser = from_spec(state["model_spec"], state["model"])
    app = state.get("app_state") or {}
    if app.get("ae_spec"):
        return nn.Sequential(denoiser, from_spec(app["ae_spec"], app["ae"])).eval()
    return denoiser.eval()
