"""The CXR change family's auxiliary terms and its external evaluation (05_cxr_change).

- **Adversarial term** (``adv_weight``): the research's conditional PatchGAN
  (:class:`lib.models.cxr_change.Discriminator`) judges ``(baseline, follow-up, change map)``: real maps are
  the training target ``sign(change)``, fake ones the model's ``tanh`` output. One optimizer trains both
  (:func:`lib.train.fit` has one): the discriminator's loss sees the prediction detached, and the
  generator's term runs the discriminator through :func:`torch.func.functional_call` with its parameters
  detached, so each loss moves only its own network.
- **Classification head** (``classify_weight``): the research's :class:`~lib.models.cxr_change.ClassificationModel`
  on the change model's own encoder (shared, not a copy) names the findings each image carries
  (multi-label over :data:`lib.data.paired.FINDINGS`: baseline = persistent + resolved, follow-up =
  persistent + appeared), binary cross-entropy.
- :func:`ablation`: the same model trained without, with only the adversarial and with only the
  classification term, from the same seed and loaders (no MIM pre-training), each scored like the main
  run and reported against the arm without it.
- :func:`external`: MS-CXR-T (prepared ``ms_cxr_t``: current/prior pairs with progression labels, no pixel
  maps): the signed predicted change area of each pair, and how well it orders worsening above stable
  above improving (ROC AUC), beside the naive subtraction's. No pixel map is claimed.

Validation in every arm uses the change loss alone, so best epochs are chosen on the same criterion.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lib import metrics
from lib.atomic import write_csv
from lib.data.paired import FINDINGS, CXRPairs
from lib.families import cxr_change as fam
from lib.families.common import split_loaders
from lib.families.results import row
from lib.losses.cxr_change import change_loss, change_target
from lib.models.cxr_change import ClassificationModel, Discriminator
from lib.runs import seed_everything

PROGRESSION = ("improving", "stable", "worsening")
COMPARISONS = (("worsening", "improving"), ("worsening", "stable"), ("stable", "improving"))
NEGATIVE = {"pneumothorax"}  # more air: a worsening pneumothorax lowers attenuation (negative change)


class AuxChangeModel(nn.Module):
    """A change model with its auxiliary networks; ``forward`` is the change model's, ``encoder`` its encoder."""

    def __init__(self, change: nn.Module, discriminator: nn.Module | None = None, classifier: nn.Module | None = None):
        super().__init__()
        self.change, self.discriminator, self.classifier = change, discriminator, classifier

    @property
    def encoder(self) -> nn.Module:
        return self.change.encoder

    def forward(self, baseline: torch.Tensor, followup: torch.Tensor) -> torch.Tensor:
        return self.change(baseline, followup)


def wrap(cfg: Mapping[str, Any], model: nn.Module) -> nn.Module:
    """``model`` with the auxiliary networks ``cfg`` asks for (:class:`AuxChangeModel`), or ``model`` itself
    when ``adv_weight`` and ``classify_weight`` are both 0."""
    if not (cfg["adv_weight"] or cfg["classify_weight"]):
        return model
    disc = cls = None
    if cfg["adv_weight"]:
        disc = Discriminator(channels=min(64, 2 * cfg["channels"][0]), num_layers=3, norm_groups=cfg["norm_groups"])
    if cfg["classify_weight"]:
        cls = ClassificationModel(fam.model_config(cfg), labels_num=len(FINDINGS))
        cls.encoder = model.encoder  # shared with the change model
    return AuxChangeModel(model, disc, cls)


def _bce(logits: torch.Tensor, target: float | torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    target = torch.full_like(logits, target) if isinstance(target, float) else target.float()
    return F.binary_cross_entropy_with_logits(logits, target)


def aux_step(net: AuxChangeModel, batch: Mapping[str, Any], *, augment: bool, dice_weight: float,
             adv_weight: float, classify_weight: float):
    """``(loss, terms)``: the change loss, plus (in training) the adversarial and classification terms."""
    b, f, c = batch["baseline"], batch["followup"], batch["change"]
    findings = (batch["findings_baseline"], batch["findings_followup"]) if "findings_baseline" in batch else None
    if net.training and augment:
        b, f, c, *rest = fam.augment_pairs(b, f, c, findings=findings)
        findings = rest[0] if rest else None
    pred = net(b, f)
    loss, terms = change_loss(pred, c, dice_weight)
    if not net.training:
        return loss, terms
    core = getattr(net, "module", net)  # under DDP: its networks (the change model's forward stays in DDP)
    if core.discriminator is not None and adv_weight:
        disc = core.discriminator
        d_loss = 0.5 * (_bce(disc(b, f, change_target(c).to(pred.dtype)), 1.0) + _bce(disc(b, f, pred.detach()), 0.0))
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        g_loss = _bce(torch.func.functional_call(disc, frozen, (b, f, pred)), 1.0)
        loss = loss + d_loss + adv_weight * g_loss
        terms = {**terms, "adv_d": d_loss.detach(), "adv_g": g_loss.detach()}
    if core.classifier is not None and classify_weight:
        if findings is None:
            raise ValueError("classify_weight > 0 needs pairs that say which findings each image carries "
                             "(pairs.csv persistent / resolved / appeared)")
        cls = _bce(core.classifier(torch.cat([b, f])), torch.cat(findings))
        loss = loss + classify_weight * cls
        terms = {**terms, "classify": cls.detach()}
    return loss, terms


def steps(cfg: Mapping[str, Any]) -> tuple[functools.partial, functools.partial]:
    step = functools.partial(aux_step, augment=cfg["augment"], dice_weight=cfg["dice_weight"],
                             adv_weight=cfg["adv_weight"], classify_weight=cfg["classify_weight"])
    return step, step


# --------------------------------------------------------------------------- ablation

def arms(cfg: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """Arm -> (adv_weight, classify_weight): without both, each alone at the preset's weight (or 0.1)."""
    adv, cls = cfg["adv_weight"] or 0.1, cfg["classify_weight"] or 0.1
    return {"without": (0.0, 0.0), "adversarial": (adv, 0.0), "classification": (0.0, cls)}


def score(cfg: Mapping[str, Any], model: nn.Module, loaders: Mapping[str, DataLoader], device) -> dict[str, float]:
    """The main run's change metrics of ``model`` on the test split at the validation-chosen threshold."""
    val, test = (fam.predict(model, loaders[s], device, cfg["amp"]) for s in ("val", "test"))
    threshold = metrics.choose_threshold(val["pred"].abs(), val["change"])
    return {k: float(v) for k, v in metrics.change_summary(test["pred"], test["change"], threshold).items()}


def ablation(cfg: Mapping[str, Any], loaders: Mapping[str, DataLoader], out_dir: str | Path, device) -> pd.DataFrame:
    """Train every arm of :func:`arms` from ``cfg.seed`` on fresh loaders of the same data (no MIM, no
    resume) into ``out_dir/<arm>``; one row per arm with its test scores. Writes ``aux_ablation.csv``."""
    data = {s: loaders[s].dataset for s in ("train", "val", "test")}
    rows = []
    for arm, (adv, cls) in arms(cfg).items():
        c = {**cfg, "adv_weight": adv, "classify_weight": cls, "mim_epochs": 0, "resume": False}
        seed_everything(c["seed"])
        model = fam.build(c)
        result = fam.train(c, model, split_loaders(c, data), Path(out_dir) / arm, device)
        rows.append({"arm": arm, "adv_weight": adv, "classify_weight": cls, **score(c, model, loaders, device),
                     "status": result.status})
    table = pd.DataFrame(rows).set_index("arm")
    write_csv(Path(out_dir) / "aux_ablation.csv", table.reset_index())
    return table


def ablation_rows(table: pd.DataFrame, n: int) -> list[dict]:
    """Held-out rows: each auxiliary arm's Dice against the arm without it (same seed, same data)."""
    base = table.loc["without"]
    return [row(f"{fam.TASK}, + {arm} term (ablation, no MIM)", "Dice on changed pixels (mean over pairs with change)",
                table.loc[arm, "dice"], "same training without it", base["dice"], True, n)
            for arm in table.index if arm != "without"]


# --------------------------------------------------------------------------- external: MS-CXR-T

def find_external(spec: str):
    """The prepared MS-CXR-T of ``spec`` ('' none; 'auto' when found, else None with a notice; a name or
    folder: required, stopping with how to get it)."""
    from lib.data import locate, prepared

    if not spec:
        return None
    if spec == "auto":
        found = locate.find_prepared("ms_cxr_t")
        if found is None:
            print("external: no prepared ms_cxr_t on this machine (credentialed PhysioNet access; "
                  "python -m lib.data.convert ms_cxr_t --help): skipped")
            return None
        return prepared.open_dataset(found)
    return prepared.open_dataset(locate.require_prepared(spec)[0])


def change_area(signed: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per pair: share of pixels above ``threshold`` with + sign minus the share with − sign ``[N]``."""
    flat = signed.flatten(1)
    return (flat > threshold).float().mean(1) - (flat < -threshold).float().mean(1)


def progression_columns(pairs: pd.DataFrame) -> list[str]:
    """The columns of ``pairs`` that hold progression labels (values among :data:`PROGRESSION` and '')."""
    return [c for c in pairs.columns if c not in ("pair", "subject", "split", "a", "b")
            and (vals := set(pairs[c].astype(str)) - {""}) and vals <= set(PROGRESSION)]


def external(cfg: Mapping[str, Any], model: nn.Module, thresholds: Mapping[str, float], out_dir: str | Path,
             device, sigma: float = 0.0) -> pd.DataFrame | None:
    """AUCs of the signed change area ordering each progression label pair, model and subtraction (each at
    its own validation threshold, ``thresholds``), per finding and pooled; ``external_ms_cxr_t.csv``."""
    ds = find_external(cfg["external"])
    if ds is None:
        return None
    data = CXRPairs(ds, "test", cfg["image_size"])
    out = fam.predict(model, DataLoader(data, batch_size=cfg["batch_size"]), device, cfg["amp"])
    areas = {"model": change_area(out["pred"], thresholds["model"]),
             "subtraction": change_area(fam.subtraction_baseline(out["baseline"], out["followup"], sigma),
                                        thresholds["subtraction"])}
    pairs = data.pairs.reset_index(drop=True)
    rows, pooled = [], {m: {"y": [], "s": []} for m in areas}
    for col in progression_columns(pairs):
        finding = col.removesuffix("_progression")
        sign = -1.0 if finding in NEGATIVE else 1.0
        for hi, lo in COMPARISONS:
            keep = pairs[col].isin([hi, lo]).to_numpy()
            y = (pairs.loc[keep, col] == hi).astype(int).to_numpy()
            if len(set(y)) < 2:
                continue
            r = {"finding": finding, "comparison": f"{hi} > {lo}", "n": int(keep.sum())}
            for m, a in areas.items():
                s = sign * a.numpy()[keep]
                r[f"auc_{m}"] = metrics.auc(s, y)
                if (hi, lo) == COMPARISONS[0]:
                    pooled[m]["y"] += list(y)
                    pooled[m]["s"] += list(s)
            rows.append(r)
    table = pd.DataFrame(rows, columns=["finding", "comparison", "n", "auc_model", "auc_subtraction"])
    if pooled["model"]["y"] and len(set(pooled["model"]["y"])) == 2:
        table.loc[len(table)] = {"finding": "all", "comparison": "worsening > improving", "n": len(pooled["model"]["y"]),
                                 **{f"auc_{m}": metrics.auc(p["s"], p["y"]) for m, p in pooled.items()}}
    write_csv(Path(out_dir) / "external_ms_cxr_t.csv", table)
    return table


def external_rows(table: pd.DataFrame | None) -> list[dict]:
    """One held-out row, the pooled worsening-vs-improving AUC, if the external set had both labels."""
    if table is None or not (table["finding"] == "all").any():
        return []
    r = table[table["finding"] == "all"].iloc[0]
    out = row("MS-CXR-T: signed change area orders worsening above improving (pooled findings)",
              "ROC AUC (external, no pixel maps)", r["auc_model"], "naive subtraction's change area",
              r["auc_subtraction"], True, int(r["n"]), split="ms_cxr_t test")
    return [{**out, "data": "ms_cxr_t"}]


def record(run_dir: str | Path, rows: list[dict], extra: list[dict]) -> list[dict]:
    """Append ``extra`` to the run's held-out rows (in place) and rewrite ``heldout_metrics.json``."""
    from lib.families.results import write_heldout

    rows += extra
    write_heldout(run_dir, rows)
    return rows
