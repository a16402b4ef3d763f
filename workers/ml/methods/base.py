"""What a method is: a loss over a forget batch and a retain batch.

Methods that compare with a reference model read the reference's per-example summed
log-probabilities, computed once before training from the same network (adapter off,
or the previous adapter version when a chain continues): never a copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from workers.ml.losses import retain_loss, retain_parts

Batch = dict[str, torch.Tensor]


@dataclass
class References:
    """Reference log p(y|x) summed over target tokens, indexed like the datasets."""

    forget: torch.Tensor | None = None
    substitute: torch.Tensor | None = None  # per substitute item (idk, relabel)
    extra: dict[str, Any] = field(default_factory=dict)


class Method:
    name: ClassVar[str]
    spec_type: ClassVar[type[BaseModel]]
    needs_reference: ClassVar[bool] = False
    # whether step 0 also measures the holdout items' mean next-token entropy
    # (refs.extra["holdout_entropy"])
    needs_holdout_entropy: bool = False
    # The loss is `with_retain`'s: the loop may then back-propagate the forget part and
    # the retain part one after the other (the same gradient, half the activations alive).
    separable_retain: ClassVar[bool] = False

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def prepare(self, model: Any) -> None:
        """Hook for state fixed before training (RMU's random direction)."""

    def substitutes(self, forget: list[dict[str, str]]) -> list[list[dict[str, str]]] | None:
        """Answers to train towards instead of each forget item's (idk: a refusal,
        relabel: the answer with synthetic values), the same number per item; None for
        methods that only push the forget answers away. The loss receives, for each
        forget item of a batch, one of them (cycling from step to step)."""
        return None

    def loss(
        self,
        model: Any,
        forget: Batch,
        retain: Batch | None,
        refs: References,
        substitute: Batch | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def with_retain(
        self, model: Any, retain: Batch | None, forget_term: torch.Tensor, logs: dict[str, float]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """gamma * forget_term + alpha * the spec's retain loss (NLL or KL)."""
        keep = self.retain_term(model, retain)
        loss = self.spec.gamma * forget_term + self.spec.alpha * keep
        return loss, {**logs, "retain_loss": keep.item()}

    def retain_term(self, model: Any, retain: Batch | None) -> torch.Tensor:
        """The spec's retain loss, NLL or KL (0 without a retain batch)."""
        return retain_loss(model, retain, self.spec.retain_loss)

    def backward(
        self,
        model: Any,
        forget: Batch,
        retain: Batch | None,
        refs: References,
        substitute: Batch | None = None,
        scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Back-propagate `scale` x the loss; return the (detached) loss and its parts.
        A separable loss goes back in two passes, forget part then retain part, so only
        one autograd graph is alive at a time."""
        if not (self.separable_retain and retain is not None):
            loss, parts = self.loss(model, forget, retain, refs, substitute)
            (scale * loss).backward()
            return loss.detach(), parts
        loss, parts = self.loss(model, forget, None, refs, substitute)
        (scale * loss).backward()
        kept, kept_parts = self.retain_backward(model, retain, scale)
        return loss.detach() + kept, {**parts, **kept_parts}

    def retain_backward(
        self, model: Any, retain: Batch, scale: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Back-propagate `scale` x the retain part alone (alpha x the retain loss): the
        second pass of a separable loss, and a paused step's whole work (it repairs
        without pushing the forget items any further)."""
        # pass by pass, each back-propagated before the next runs (data.passes): only one
        # pass's activations alive, none padded to another pass's longest row
        parts = []
        for part in retain_parts(model, retain, self.spec.retain_loss):
            (scale * self.spec.alpha * part).backward()
            parts.append(part.detach())
        keep = torch.stack(parts).sum()
        return self.spec.alpha * keep, {"retain_loss": keep.item()}


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def build(spec: Any) -> Method:
    try:
        return REGISTRY[spec.name](spec)
    except KeyError as exc:
        raise ValueError(f"no implementation for method {spec.name!r}") from exc


def ref_slice(ref: torch.Tensor | None, batch: Batch, device: torch.device) -> torch.Tensor:
    if ref is None:
        raise RuntimeError("this method needs reference log-probabilities")
    return ref[batch["index"]].to(device)
