"""The certificate: a faster model path (another runtime, a reduced precision) proves on
the job's own images that it gives the reference's answers, or the job does not use it.

The reference is torch in float32. While a job certifies, every image the model gets is
run through the reference (whose answers are the rows written) and through each
candidate path; a candidate passes once the one-sided lower confidence bound of its top-1
agreement with the reference reaches ``AGREEMENT`` and no score moved by more than
``MAX_SCORE_DIFFERENCE`` (nor, with ``--embeddings``, an embedding's direction by more
than ``MIN_EMBEDDING_COSINE`` allows). A bound, not the point estimate: 200 agreeing
images do not show 99.5% (their bound is 98.5%), and a path that moves 1 answer in 100
fails long before its bound could pass. The sample is the job's first images in the
order the model receives them, at most ``SAMPLE_IMAGES``; the decision is taken as soon as
the figures settle it (passing needs at least ``images_needed()``: 598 all agreeing).
Pure bookkeeping: the Predictor feeds it outputs, the job reports its figures.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

AGREEMENT = 0.995  # the top-1 agreement a candidate's lower bound must reach
CONFIDENCE = 0.95  # of that one-sided bound (Clopper-Pearson)
MAX_SCORE_DIFFERENCE = 0.05  # the most any class's score may move (softmax or sigmoid scores)
MIN_EMBEDDING_COSINE = 0.99  # with --embeddings: the least cosine between an image's two embeddings
SAMPLE_IMAGES = 1000  # the most images certified: then 1 disagreement still passes (bound 99.53%)
# A path must also pay for its certificate: certifying costs its passes over the sample
# beside the reference's, and saves (1 - 1 / speedup) of the reference's time on every
# image after it; over a job of N images that pays from a speedup of
# 1 + sample / (N - sample) (3,200 images: 1.23; 100,000: 1.006). Timed on the job's own
# batches, after a first one (warm-up), from this many images on.
SPEED_SAMPLE_IMAGES = 64
MIN_SPEEDUP = 1.05  # where the job's size is unknown

PENDING, PASSED, FAILED = "pending", "passed", "failed"


def agreement_lower_bound(agreed: int, images: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided Clopper-Pearson lower bound of a proportion: the least p under which
    ``agreed`` or more of ``images`` would be seen with probability ``1 - confidence``.
    By bisection on the binomial tail (no scipy for one quantile)."""
    if images == 0 or agreed == 0:
        return 0.0
    alpha = 1.0 - confidence
    if agreed == images:
        return alpha ** (1.0 / images)
    low, high = 0.0, 1.0
    for _ in range(60):
        p = (low + high) / 2
        if _at_least(agreed, images, p) < alpha:
            low = p
        else:
            high = p
    return low


def _at_least(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space."""
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k, n + 1)]
    top = max(terms)
    return math.exp(top) * sum(math.exp(t - top) for t in terms)


def images_needed(agreement: float = AGREEMENT, confidence: float = CONFIDENCE) -> int:
    """The fewest images, all agreeing, whose bound reaches ``agreement`` (598 for the defaults)."""
    return math.ceil(math.log(1.0 - confidence) / math.log(agreement))


@dataclass
class Trial:
    """One candidate path's figures against the reference so far, and its verdict."""

    path: str
    images: int = 0
    agreed: int = 0
    max_score_difference: float = 0.0
    min_embedding_cosine: float | None = None
    verdict: str = PENDING
    reason: str = ""
    available: bool = True  # False: the path cannot run here (the reason says why)
    # Pass seconds, the reference's and this path's, on the same batches (after the first).
    reference_seconds: float = 0.0
    seconds: float = 0.0
    timed_images: int = 0

    @property
    def speedup(self) -> float | None:
        return self.reference_seconds / self.seconds if self.timed_images and self.seconds > 0 else None

    @property
    def lower_bound(self) -> float:
        return agreement_lower_bound(self.agreed, self.images)

    def add(self, reference: "Outputs", candidate: "Outputs", reference_seconds: float = 0.0, seconds: float = 0.0,
            needed_speedup: float = 0.0) -> None:
        if self.verdict != PENDING:
            return
        if candidate.probs.shape != reference.probs.shape or (reference.embeddings is not None and (
                candidate.embeddings is None or candidate.embeddings.shape != reference.embeddings.shape)):
            self.verdict, self.reason = FAILED, (f"its outputs are shaped {_shapes(candidate)} where the "
                                                 f"reference's are {_shapes(reference)}")
            return
        if self.images:  # the first batch warms the path up
            self.reference_seconds, self.seconds = self.reference_seconds + reference_seconds, self.seconds + seconds
            self.timed_images += len(reference.probs)
        self.images += len(reference.probs)
        self.agreed += int((reference.probs.argmax(1) == candidate.probs.argmax(1)).sum())
        self.max_score_difference = max(self.max_score_difference,
                                        float(np.abs(reference.probs - candidate.probs).max(initial=0.0)))
        if reference.embeddings is not None:
            cosine = float(_cosines(reference.embeddings, candidate.embeddings).min(initial=1.0))
            self.min_embedding_cosine = min(cosine, self.min_embedding_cosine or 1.0)
        self._decide(needed_speedup)

    def _decide(self, needed_speedup: float) -> None:
        if self.verdict != PENDING:
            return
        disagreed = self.images - self.agreed
        if self.max_score_difference > MAX_SCORE_DIFFERENCE:
            self.verdict, self.reason = FAILED, (f"a score moved by {self.max_score_difference:.3g} "
                                                 f"(at most {MAX_SCORE_DIFFERENCE} allowed)")
        elif self.min_embedding_cosine is not None and self.min_embedding_cosine < MIN_EMBEDDING_COSINE:
            self.verdict, self.reason = FAILED, (f"an embedding turned (cosine {self.min_embedding_cosine:.4f}, at "
                                                 f"least {MIN_EMBEDDING_COSINE} allowed)")
        elif agreement_lower_bound(SAMPLE_IMAGES - disagreed, SAMPLE_IMAGES) < AGREEMENT:
            self.verdict, self.reason = FAILED, (f"{disagreed} of {self.images} top-1 labels differ: even if the rest "
                                                 f"of the {SAMPLE_IMAGES}-image sample agreed, the agreement's bound "
                                                 f"would stay under {AGREEMENT:.1%}")
        elif self.timed_images >= SPEED_SAMPLE_IMAGES and (self.speedup or 0.0) < needed_speedup:
            self.verdict, self.reason = FAILED, (f"it runs {self.speedup:.2f}x the reference's speed on the job's "
                                                 f"batches, where paying for its certificate needs "
                                                 f"{needed_speedup:.2f}x")
        elif self.lower_bound >= AGREEMENT:
            self.verdict = PASSED

    def figures(self) -> dict:
        return {**asdict(self), "agreement": self.agreed / self.images if self.images else None,
                "agreement_lower_bound": self.lower_bound, "speedup": self.speedup}


@dataclass
class Outputs:
    """What a path gives for a batch, on the host: every class's score, and the embeddings (or None)."""

    probs: np.ndarray
    embeddings: np.ndarray | None


def _shapes(outputs: Outputs) -> str:
    return " and ".join(str(value.shape) for value in (outputs.probs, outputs.embeddings) if value is not None)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-12)


class Certification:
    """The trials of a job's candidate paths (fastest first), fed by the model's passes
    from any thread; ``chosen`` is the first candidate that passed once every faster one
    failed, the reference (None) once all failed, and undecided (``decided`` False) until then.

    ``insist``: the user asked for the (one) candidate's precision (``--dtype bfloat16``):
    it is chosen once its verdict is in, passed or failed; a failure is reported, not hidden.
    ``must_pay``: the choice is for speed alone (``--runtime auto --dtype auto``): a path
    must also pay for its certificate (SPEED_SAMPLE_IMAGES); one asked for by name need not."""

    def __init__(self, candidates: list[str], reference: str, insist: bool = False, must_pay: bool = False):
        self.reference = reference
        self.trials = [Trial(path) for path in candidates]
        self.insist, self.must_pay = insist, must_pay
        self._lock = threading.Lock()
        self.expected_images: Callable[[], int | None] = lambda: None  # the job's size, where known

    def needed_speedup(self) -> float:
        """What a path must gain to pay for its certificate over the job (see SPEED_SAMPLE_IMAGES)."""
        if not self.must_pay:
            return 0.0
        images, sample = self.expected_images(), images_needed()
        return 1.0 + sample / max(1, images - sample) if images else MIN_SPEEDUP

    def fail(self, path: str, why: str) -> None:
        """The path cannot run here (not loaded, or it raised on the job's images): it
        fails, and is never chosen, even where insisted on."""
        with self._lock:
            for trial in self.trials:
                if trial.path == path and trial.verdict == PENDING:
                    trial.verdict, trial.reason, trial.available = FAILED, why, False

    def add(self, reference: Outputs, candidates: dict[str, Outputs], seconds: dict[str, float]) -> None:
        """One batch: the reference's outputs and each candidate's, and each one's pass
        seconds (``seconds[self.reference]`` the reference's)."""
        needed = self.needed_speedup()
        with self._lock:
            for trial in self.trials:
                if trial.path in candidates:
                    trial.add(reference, candidates[trial.path], seconds[self.reference], seconds[trial.path], needed)

    @property
    def pending(self) -> list[str]:
        return [trial.path for trial in self.trials if trial.verdict == PENDING]

    @property
    def decided(self) -> bool:
        return self._choice() is not PENDING

    @property
    def chosen(self) -> str | None:
        choice = self._choice()
        return None if choice is PENDING else choice

    def _choice(self):
        for trial in self.trials:
            if self.insist and trial.available and trial.verdict == FAILED:
                return trial.path
            if trial.verdict == PASSED:
                return trial.path
            if trial.verdict == PENDING:
                return PENDING
        return None  # every candidate failed (or there were none): the reference

    def figures(self) -> dict:
        """For the summary and the report."""
        with self._lock:
            return {"reference": self.reference, "chosen": self.chosen or self.reference, "decided": self.decided,
                    "agreement_threshold": AGREEMENT, "confidence": CONFIDENCE,
                    "max_score_difference_allowed": MAX_SCORE_DIFFERENCE, "sample_images": SAMPLE_IMAGES,
                    "trials": [trial.figures() for trial in self.trials]}
