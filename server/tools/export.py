"""``fedtune export``: a run's chosen round as something a hospital can deploy.

- without ``--merge``: a standard PEFT adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) with the base model's reference, the run's config
  (``fedtune_config.yaml``) and ``fedtune_model.json`` (task, labels, head, round);
- ``--merge``: LoRA merged into the base weights (peft ``merge_and_unload``), saved
  as a Hugging Face directory that loads without fedtune: an
  ``AutoModelForCausalLM`` directory, or for classification the encoder as an
  ``AutoModel`` directory plus ``classifier_head.safetensors``, with
  ``fedtune_standalone.py`` (:mod:`fedtune.common.standalone`) that runs it;
- ``--quantize int8`` (with ``--merge``): dynamic int8 quantization of every
  ``nn.Linear`` for CPU inference.

Export reads the run directory and never writes to it; the output directory is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedtune.common import assets, config, standalone
from fedtune.common.errors import FedtuneError
from fedtune.common.model import (
    ADAPTER_FILE,
    FEDTUNE_META,
    RUN_CONFIG,
    load_tokenizer,
)
from fedtune.server.runtime.trained import Trained, load_model, resolve

logger = logging.getLogger(__name__)



def export(source: str | Path, *, out: str | Path, which: str | None = None,
           merge: bool = False, quantize: str = "") -> dict[str, Any]:
    """Write the export; returns what was written (round, files and sizes)."""
    if quantize and quantize != "int8":
        raise FedtuneError(f"--quantize {quantize!r}: only int8 is supported")
    if quantize and not merge:
        raise FedtuneError("--quantize int8 needs --merge (it quantizes the merged "
                           "model's linear layers)")
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FedtuneError(f"{dest}: exists and is not empty; pass a new --out "
                           "directory (nothing was overwritten)")
    trained = resolve(source, which)
    if merge and trained.cfg.lora.prompt_method:
        raise FedtuneError(f"--merge: lora.method {trained.cfg.lora.method} adds "
                           "virtual tokens, which no weight can absorb; export the "
                           "adapter (without --merge) and load it with peft")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        meta = _meta(trained, kind="int8" if quantize else "merged" if merge
                     else "adapter")
        if merge:
            _write_merged(trained, tmp, meta=meta, int8=bool(quantize))
        else:
            _write_adapter(trained, tmp, meta=meta)
        (tmp / "README.md").write_text(_readme(meta), encoding="utf-8")
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {p.name: p.stat().st_size for p in sorted(dest.iterdir()) if p.is_file()}
    logger.info("exported round %d of %s to %s (%s, %.1f MB)", trained.round,
                trained.source, dest, meta["export"], sum(files.values()) / 1e6)
    return {"round": trained.round, "out": str(dest), "kind": meta["export"],
            "files": files, "bytes": sum(files.values())}


def _meta(trained: Trained, *, kind: str) -> dict[str, Any]:
    cfg = trained.cfg
    return {**trained.meta, "export": kind, "round": trained.round,
            "source_run": str(trained.source.resolve()), "task": cfg.model.task,
            "base_model": cfg.model.name_or_path,
            "labels": list(cfg.data.labels) if cfg.model.task == "classification"
            else [], "head_hidden": cfg.model.head_hidden,
            "max_length": cfg.data.length_cap,
            "input_column": (cfg.data.text_column if cfg.model.task == "classification"
                             else cfg.data.prompt_column),
            "pooling": "masked mean over last_hidden_state"
            if cfg.model.task == "classification" else None}


def _write_adapter(trained: Trained, out: Path, *, meta: dict[str, Any]) -> None:
    for name in ("adapter_config.json", ADAPTER_FILE):
        shutil.copy2(trained.adapter / name, out / name)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    ref = trained.cfg.model.name_or_path
    if ref.startswith(assets.PREFIX):  # an embedded default: name where it lies
        adapter_cfg["base_model_name_or_path"] = assets.resolve(ref)
        (out / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    (out / RUN_CONFIG).write_text(config.dump_yaml(trained.cfg), encoding="utf-8")
    (out / FEDTUNE_META).write_text(json.dumps(meta, indent=2) + "\n")


def _write_merged(trained: Trained, out: Path, *, meta: dict[str, Any],
                  int8: bool) -> None:
    cfg = trained.cfg
    peft: Any = load_model(trained)
    merged: Any = peft.merge_and_unload()
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
    if cfg.model.task == "classification":
        encoder = merged.encoder
        encoder.config.id2label = dict(enumerate(cfg.data.labels))
        encoder.config.label2id = {n: i for i, n in enumerate(cfg.data.labels)}
        runnable: torch.nn.Module = standalone.MeanPoolClassifier(
            encoder, merged.head.float())
        saved = encoder
    else:
        runnable = saved = merged
    if int8:
        saved.config.save_pretrained(str(out))
        quantized = standalone.quantize(runnable.float().eval())
        torch.save(quantized.state_dict(), out / standalone.INT8)
    else:
        saved.save_pretrained(str(out))
        if cfg.model.task == "classification":
            save_file({k: v.detach().contiguous() for k, v in
                       merged.head.state_dict().items()}, str(out / standalone.HEAD))
    tok.save_pretrained(str(out))
    shutil.copy2(standalone.__file__, out / "fedtune_standalone.py")
    (out / FEDTUNE_META).write_text(json.dumps(meta, indent=2) + "\n")


def _readme(meta: dict[str, Any]) -> str:
    kind, task = meta["export"], meta["task"]
    head = (f"# fedtune export: round {meta['round']} of {meta['source_run']}\n\n"
            f"Base model: `{meta['base_model']}`; task: {task}"
            + (f"; labels: {', '.join(meta['labels'])}" if meta["labels"] else "")
            + ".\n\n")
    if kind == "adapter":
        return head + (
            "A PEFT adapter (LoRA" + (" + the classification head" if task ==
                                       "classification" else "") + ").\n\n"
            "```python\nfrom fedtune.server.tools.export import load_model, resolve\n"
            "model = load_model(resolve(\"THIS_DIR\"))\n```\n\n"
            + ("A causal LM also loads with plain peft: `AutoPeftModelForCausalLM."
               "from_pretrained(\"THIS_DIR\")` (the base is named in "
               "adapter_config.json).\n" if task != "classification" else
               "The classification base is fedtune's encoder + masked-mean-pooling "
               "head: export with `--merge` to run it without fedtune.\n"))
    return head + (
        ("Int8 (dynamic quantization of every linear layer, CPU inference). "
         if kind == "int8" else "LoRA merged into the weights. ")
        + "Runs without fedtune (torch + transformers only):\n\n"
        "```bash\npython fedtune_standalone.py THIS_DIR \"a record's text\"\n```\n\n"
        "```python\nfrom fedtune_standalone import load\nmodel = load(\"THIS_DIR\")\n"
        "print(model([\"a record's text\"]))\n```\n\n"
        + ("`AutoModelForCausalLM.from_pretrained(\"THIS_DIR\")` loads it directly; "
           "prompts were trained as `prompt + \"\\n\"`.\n"
           if task != "classification" and kind == "merged" else
           "fedtune_standalone.py's docstring describes the pooling and head "
           "exactly.\n"))
