"""Class text embeddings: prompts through a CLIP text tower, averaged over templates and synonyms."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from densevlm.vocab.templates import TemplateSet
from densevlm.vocab.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

# Written into cache and export metadata; describes the reduction below in one line.
NORMALIZATION = "unit: l2(mean_synonyms(l2(mean_templates(l2(encode_text)))))"


@runtime_checkable
class TextEncoder(Protocol):
    """What the builder needs from a model (the backbone's ``DenseCLIP`` provides it).

    ``name`` names the architecture (e.g. ``"EVA02-CLIP-B-16"``); ``weights_id`` identifies the weights (a
    checkpoint hash or a pretrained tag) so a cache never serves embeddings of other weights.
    """

    name: str
    weights_id: str
    tokenizer: Callable[[list[str]], torch.Tensor]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


def check_text_encoder(model: Any) -> None:
    """Raise TypeError naming every missing or mistyped attribute of the :class:`TextEncoder` interface."""
    problems = []
    if not callable(getattr(model, "encode_text", None)):
        problems.append("encode_text(LongTensor) -> Tensor (N, D)")
    if not callable(getattr(model, "tokenizer", None)):
        problems.append("tokenizer(list[str]) -> LongTensor")
    for attr in ("name", "weights_id"):
        if not isinstance(getattr(model, attr, None), str):
            problems.append(f"{attr}: str (got {getattr(model, attr, None)!r})")
    if problems:
        raise TypeError(f"{type(model).__name__} is not a text encoder; it lacks: {'; '.join(problems)}")


def model_device(model: Any) -> torch.device:
    """Where tokens must go: ``model.device`` if set, else the device of its first parameter, else CPU."""
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    # Embeddings must not depend on dropout; restore the caller's mode afterwards (a student may be training).
    if isinstance(model, torch.nn.Module):
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
    else:
        yield


def class_prompts(vocabulary: Vocabulary, templates: TemplateSet) -> list[list[list[str]]]:
    """``prompts[c][s][t]``: sentence for class ``c``, name/synonym ``s``, template ``t``."""
    return [[templates.format(n) for n in entry.all_names] for entry in vocabulary]


def encode_texts(
    model: TextEncoder, texts: Sequence[str], *, batch_size: int = 256, progress: bool = False,
    normalize: bool = True, desc: str = "text embeddings",
) -> torch.Tensor:
    """Encode sentences in batches under no_grad, in eval mode; float32 rows on the CPU.

    The one batched text encoder of the package. Rows are L2-normalised unless ``normalize`` is false (Talk2DINO
    works with the raw ``encode_text`` outputs).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    out = []
    starts = range(0, len(texts), batch_size)
    with torch.no_grad(), _eval_mode(model):
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            chunk = list(texts[start : start + batch_size])
            tokens = model.tokenizer(chunk)
            emb = model.encode_text(tokens.to(device))
            if emb.ndim != 2 or emb.shape[0] != len(chunk):
                raise ValueError(
                    f"{model.name}.encode_text returned shape {tuple(emb.shape)} for {len(chunk)} texts, "
                    f"expected ({len(chunk)}, D)"
                )
            # Normalise in float32: half-precision towers would otherwise lose the small per-template differences.
            out.append((F.normalize(emb.float(), dim=-1) if normalize else emb.float()).cpu())
    return torch.cat(out, dim=0)


def build_text_embeddings(
    model: TextEncoder,
    vocabulary: Vocabulary,
    templates: TemplateSet,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Class embeddings (N, D), float32 on the CPU, **unit norm**.

    For each class and each of its names (primary name and synonyms) every template is formatted and encoded;
    each sentence embedding is L2-normalised, averaged over templates and normalised; the per-name vectors are
    averaged over names and normalised again.

    Differences from the reference (``tools/generate_text_embeddings.py::build_text_embedding_lvis``):
      * rows are unit norm; the reference overwrote the normalised mean with the raw mean, so its shipped
        316-class files have row norms 0.89-0.96 (cosine logits were therefore scaled down per class);
      * a comma list ('wardrobe, closet, press') is embedded name by name and averaged, where the reference fed
        the whole comma string into one prompt.
    Sentences are encoded in batches of ``batch_size`` across classes, so small classes share calls.
    """
    check_text_encoder(model)
    prompts = class_prompts(vocabulary, templates)
    k = len(templates)
    flat = [text for per_class in prompts for per_name in per_class for text in per_name]
    # The class each name belongs to, so names can be pooled per class with one index_add.
    name_owner = torch.tensor([c for c, per_class in enumerate(prompts) for _ in per_class], dtype=torch.long)
    sentence = encode_texts(model, flat, batch_size=batch_size, progress=progress)  # (names*K, D)
    per_name = F.normalize(sentence.view(-1, k, sentence.shape[-1]).mean(dim=1), dim=-1)  # (names, D)
    sums = torch.zeros(len(vocabulary), per_name.shape[-1]).index_add_(0, name_owner, per_name)
    counts = torch.bincount(name_owner, minlength=len(vocabulary)).clamp_min(1).unsqueeze(1)
    out = F.normalize(sums / counts, dim=-1)
    bad = (~torch.isfinite(out).all(dim=1)) | (out.norm(dim=1) < 0.5)
    if bad.any():
        i = int(bad.nonzero()[0])
        # A zero or NaN row means the tower returned degenerate vectors (e.g. broken weights or fp16 overflow).
        raise ValueError(
            f"text embedding of class {i} ({vocabulary[i].name!r}) in {vocabulary.name!r} is not finite or is zero "
            f"(model {model.name}, weights {model.weights_id})"
        )
    logger.info(
        "built text embeddings %s for %s (%d classes, %d names, %d templates '%s') with %s [%s]",
        tuple(out.shape), vocabulary.name, len(vocabulary), len(per_name), k, templates.name, model.name,
        model.weights_id,
    )
    return out
