"""Adapter state <-> Flower ``ArrayRecord``, message keys, and payload size.

Message keys are named constants so the server and client never drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

# RecordDict keys (Flower's strategies use the same defaults).
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"

# MetricRecord keys a client sends (scalars only; never per-sample values).
NUM_EXAMPLES = "num-examples"  # FedAvg weights by this
TRAIN_LOSS = "train-loss"
EPSILON_TOTAL = "epsilon-total"  # the site ledger's, over all runs
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
DP_STEPS = "dp-steps"
SAMPLE_RATE = "sample-rate"  # Poisson sampling rate of this round's DP-SGD
TRAINABLE_PARAMS = "trainable-params"  # dimensions DP-SGD noised this round
TRAIN_SECONDS = "train-seconds"
SITE = "site"  # a training reply's ConfigRecord: the daemon's --label (not secret)
SITE_LABEL = "label"  # ... its key
PARTITION = "partition"  # simulation only: the site's partition index (no data)
SITE_PREFIX = "p"  # a simulated site's name in the server's logs: p<partition>


def site_name(partition: int) -> str:
    """A simulated site's short name (``p3``), as logs, report and plots show it."""
    return f"{SITE_PREFIX}{partition}"
LORA_A_DIGEST = "lora-a-digest"  # FFA-LoRA: 48 bits of sha256 of the frozen A
EVAL_LOSS = "eval-loss"
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"
PERPLEXITY = "perplexity"
# ... and after a personalisation round: the site's own held-out split scored with
# the global adapter and with its personalised copy (which never leaves the site)
GLOBAL = "global-"  # prefix: global-eval-loss, global-macro-f1, ...
PERSONAL = "personal-"  # prefix: personal-eval-loss, personal-macro-f1, ...
PERSONAL_EPSILON = "personal-epsilon"  # what the personalisation spent
# ... and after a calibration message: the site's validation counts under DP
# (common/calibration.py: [1 + 2K, C] flattened), and the released class histogram
# a CLASS_COUNTS query returns (the one the site released for its logit adjustment)
CALIBRATION_COUNTS = "calibration-counts"
CLASS_COUNTS = "class-counts"

# ConfigRecord keys the server sends.
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # FedProx (Flower's key)
RESUMED_AT = "resumed-at"  # first round of a resumed run (0: not resumed)
QUERY = "query"  # what a query message asks for
SITE_SIZE = "site-size"  # ... the site's number of training records
PERSONALIZE = "personalize"  # an evaluate message that asks for local fine-tuning
CALIBRATE = "calibrate"  # an evaluate message that asks for calibration counts
DECISION_BIASES = "decision-biases"  # ... its candidates, [K, C] flattened


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack adapter tensors (kept in their order) into an ``ArrayRecord``."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy())
                        for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord`` into CPU tensors (copies, writable)."""
    return {k: torch.from_numpy(np.array(arr.numpy(), copy=True))
            for k, arr in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record (the adapter parameters, without framing)."""
    return int(sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
                   for a in record.values()))


def wire_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of a record (tensor data plus Flower's per-array headers)."""
    return int(record.count_bytes())
