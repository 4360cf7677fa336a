"""Decision calibration on the site: counts on its validation split, under DP.

After the last round the server sends the final global adapter and a few candidate
decision biases (:mod:`fedtune.common.calibration`). The site scores its
validation split (never its training records, never the test set) with each
candidate and replies with the per-class counts, noised by the Gaussian mechanism.
The release is checked against the site's ledger, charged once per message, and
composed into the run's accountant like a DP-SGD segment; the run's noise was
planned with it from round 1 (:func:`fedtune.common.accounting.run_plan`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedtune.client.privacy import PrivacyState
from fedtune.client.releases import CALIBRATION, Book, Releases
from fedtune.client.site import SiteData
from fedtune.common import calibration, records
from fedtune.common.config import RunConfig
from fedtune.common.features import HeadOnly, head_features
from fedtune.common.loops import class_logits
from fedtune.common.model import classifier_head

logger = logging.getLogger(__name__)


def segment(cfg: RunConfig) -> tuple[float, float, int]:
    """The accountant's view of the release: one Gaussian mechanism."""
    return (cfg.calibration_sigma, 1.0, 1)


@torch.no_grad()
def val_logits(cfg: RunConfig, model: torch.nn.Module, site: SiteData, *,
               device: torch.device, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The final model's logits and the labels of the site's validation split."""
    feats = head_features(model, site.val, device=device, pad_id=pad,
                          batch_size=cfg.train.eval_batch_size,
                          top_layers=cfg.lora.top_layers)
    head = HeadOnly(classifier_head(model)[1])
    was_training = head.training
    head.eval()
    out, labels = [], []
    step = max(1, cfg.train.eval_batch_size)
    for i in range(0, len(feats), step):
        chunk = [feats[j] for j in range(i, min(i + step, len(feats)))]
        batch = {"features": torch.stack([r["features"] for r in chunk]).to(device)}
        out.append(class_logits(head, batch).cpu())
        labels += [int(r["labels"]) for r in chunk]
    head.train(was_training)
    k = len(cfg.data.labels)
    return (torch.cat(out).numpy() if out else np.zeros((0, k), np.float32),
            np.asarray(labels, np.int64))


def release(cfg: RunConfig, *, model: torch.nn.Module, site: SiteData,
            device: torch.device, pad: int, biases: np.ndarray, book: Book | None,
            saved: Mapping[str, Any] | None, run: str, message: str, round_: int,
            run_name: str = "") -> tuple[dict[str, Any], PrivacyState]:
    """Check, release and charge the site's calibration counts
    (:class:`~fedtune.client.releases.Releases`); returns the reply's metrics and
    the run's privacy state with the release composed in."""
    dp = cfg.privacy.enabled
    seg = segment(cfg)
    state = PrivacyState.from_config(dict(saved) if saved is not None else None)
    releases = Releases(cfg.privacy, state.history, book, run=run, round_=round_,
                        message=message, run_name=run_name)
    releases.check(CALIBRATION, seg)  # refuses before anything is computed
    logits, labels = val_logits(cfg, model, site, device=device, pad=pad)
    exact = calibration.released(logits, labels, biases)
    seed = secrets.randbits(62) if cfg.privacy.secure_noise else (
        cfg.train.seed * 1000 + round_ + 7)
    k = biases.shape[1]
    out = calibration.noisy(exact, z=seg[0] if dp else 0.0,
                            rng=np.random.default_rng(seed),
                            candidates=len(biases), num_classes=k)
    releases.charge(CALIBRATION, seg)  # before the reply exists
    metrics: dict[str, Any] = {records.NUM_EXAMPLES: len(site.val),
                               records.CALIBRATION_COUNTS: [float(v) for v in
                                                            out.ravel()],
                               **releases.metrics()}
    logger.info("calibration: %s released the %s of %d validation records for %d "
                "decision biases (noise %g x sensitivity %.2f)", site.name,
                calibration.release_name(k), len(site.val), len(biases),
                seg[0] if dp else 0.0, calibration.sensitivity(len(biases), k))
    return metrics, state
