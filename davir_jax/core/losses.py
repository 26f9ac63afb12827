"""Token log-probs and per-example losses: small pure functions shared by scoring and training.

`token_logprobs` never builds the whole `[batch, seq, vocab]` float32 log-softmax: it applies the
LM head to one chunk of the sequence at a time (`jax.lax.map`), and within a chunk to one block of
the vocabulary at a time (an online log-sum-exp), so peak memory is `batch * chunk * block`
floats; given the loss mask, only at the positions that count (the response tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from davir_jax.core import registry

# Response positions per row in one LM-head application, and vocabulary entries per block of its
# log-sum-exp. A `rows * chunk * block` tile of logits stays in cache between the head's product
# and the log-sum-exp (on 2 CPU cores, for 8 rows and a 49K vocabulary: 32 x 4096 ran the head +
# log-softmax 1.19x as fast as 16 positions over the whole vocabulary at d = 256, 1.15x at 576).
LM_HEAD_CHUNK = 32
VOCAB_BLOCK = 4096


def token_logprobs(
    logits_fn: Callable[..., jax.Array],
    hidden_btd: jax.Array,
    targets_bt: jax.Array,
    chunk: int = LM_HEAD_CHUNK,
    mask_bt: jax.Array | None = None,
    vocab_block: int = 0,
) -> jax.Array:
    """log p(target_t | prefix) `[B, T]` float32, from final hidden states `[B, T, D]`.

    `logits_fn` maps `[..., D]` hidden states to float32 logits `[..., V]` (the model's head).
    `targets_bt[:, t]` is the token predicted at position t (i.e. input_ids shifted left).
    With `vocab_block`, `logits_fn(h, vocab=(start, size))` must give the logits of entries
    `start .. start + size - 1` only (`Decoder.logits` does), and the log-sum-exp runs over the
    vocabulary one such block at a time; 0 takes the whole vocabulary at once.

    With `mask_bt`, only the masked positions are computed (the others are 0): each row's masked
    positions are moved to its front (a stable sort, so the batch axis and its sharding stay as
    they are) and the chunks past the longest row's count are skipped by `lax.cond`. Scoring and
    SFT need log-probs at response tokens only, so prompt and padding tokens cost no LM-head
    matmul or log-softmax over the vocabulary, the largest cost of a small model's step.
    """
    one = functools.partial(_full_vocab_logprobs, logits_fn)
    if vocab_block:
        vocab = jax.eval_shape(logits_fn, hidden_btd[:1, :1]).shape[-1]
        if vocab_block < vocab:
            one = functools.partial(_blocked_vocab_logprobs, logits_fn, vocab_block, vocab)
    if mask_bt is None:
        return _chunked_logprobs(one, hidden_btd, targets_bt, chunk, None)
    keep = mask_bt > 0
    order = jnp.argsort(~keep, axis=1, stable=True)  # [B, T]: masked positions first
    h = jnp.take_along_axis(hidden_btd, order[..., None], axis=1)
    y = jnp.take_along_axis(targets_bt, order, axis=1)
    needed = keep.sum(axis=1).max()
    lp = _chunked_logprobs(one, h, y, chunk, needed)
    rows = jnp.arange(lp.shape[0])[:, None]
    return jnp.where(keep, jnp.zeros_like(lp).at[rows, order].set(lp), 0.0)


def _full_vocab_logprobs(
    logits_fn: Callable[..., jax.Array], h: jax.Array, y: jax.Array
) -> jax.Array:
    """log p(y) at hidden states `h` `[..., D]` from the logits of the whole vocabulary."""
    logits = logits_fn(h).astype(jnp.float32)  # [..., V]
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _blocked_vocab_logprobs(
    logits_fn: Callable[..., jax.Array], block: int, vocab: int, h: jax.Array, y: jax.Array
) -> jax.Array:
    """log p(y) from `block` vocabulary entries' logits at a time: a running max and sum of
    exponentials (an online log-sum-exp, as in a blocked softmax) and the target's logit, picked
    from the block that holds it. A last partial block is read as the final `block` entries,
    with those of the block before it excluded, so no entry counts twice."""
    f32 = jnp.float32

    def visit(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        m, total, picked = carry
        lo = j * block  # this block's own entries: lo .. lo + block - 1 (clipped to vocab)
        start = jnp.minimum(lo, vocab - block)
        logits = logits_fn(h, vocab=(start, block)).astype(f32)  # [..., block]
        ids = start + jnp.arange(block)
        logits = jnp.where(ids >= lo, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        total = total * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        here = (y >= lo) & (y < lo + block)
        at = jnp.clip(y - start, 0, block - 1)
        pick = jnp.take_along_axis(logits, at[..., None], axis=-1)[..., 0]
        return m_new, total, jnp.where(here, pick, picked)

    # Block 0 is whole (block < vocab), so the running max is finite after the first visit.
    init = (jnp.full(y.shape, -jnp.inf, f32), jnp.zeros(y.shape, f32), jnp.zeros(y.shape, f32))
    m, total, picked = jax.lax.fori_loop(0, -(-vocab // block), visit, init)
    return picked - (m + jnp.log(total))


def _chunked_logprobs(
    one_fn: Callable[[jax.Array, jax.Array], jax.Array],
    hidden_btd: jax.Array,
    targets_bt: jax.Array,
    chunk: int,
    needed: jax.Array | None,
) -> jax.Array:
    """`token_logprobs` of positions `[0, needed)` of every row (all with `needed=None`), one
    `[B, chunk]` slice of the sequence at a time; the rest is 0."""
    b, t, d = hidden_btd.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    h = h.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, c, D]
    y = y.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, c]

    # Rematerialised: under a gradient, the backward pass recomputes one chunk's logits instead
    # of the map keeping every chunk's `[B, c, V]` logits (the whole `[B, T, V]` again). The
    # checkpoint wraps the `cond` too: with the checkpoint inside it, the map's backward kept one
    # `[V, D]` head-weight cotangent per chunk (4.8 GB of temporaries for SmolLM2's SFT step at
    # one row of 1024, 1.1 GB now; tests/test_losses.py).
    @jax.checkpoint
    def step(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        i, hc, yc = args
        if needed is None:
            return one_fn(hc, yc)
        skip = lambda hc, yc: jnp.zeros(yc.shape, jnp.float32)  # noqa: E731
        return jax.lax.cond(i * chunk < needed, one_fn, skip, hc, yc)

    lp = jax.lax.map(step, (jnp.arange(n), h, y))  # [n, B, c]
    return lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def shift_targets(
    input_ids_bt: jax.Array, loss_mask_bt: jax.Array, segment_ids_bt: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Next-token targets and their mask: position t predicts token t+1.

    `loss_mask_bt[:, t]` marks token t as a response token; its prediction happens at t-1. With
    `segment_ids_bt` (packed rows), a prediction across two examples is never counted.
    """
    targets = jnp.pad(input_ids_bt[:, 1:], ((0, 0), (0, 1)))
    mask = jnp.pad(loss_mask_bt[:, 1:] > 0, ((0, 0), (0, 1)))
    if segment_ids_bt is not None:
        same = jnp.pad(segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1], ((0, 0), (0, 1)))
        mask = mask & same & (segment_ids_bt > 0)
    return targets, mask.astype(jnp.float32)


def masked_nll(logprobs_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row summed NLL over masked positions and the token count: `([B], [B])`."""
    mask = mask_bt.astype(jnp.float32)
    return -(logprobs_bt * mask).sum(-1), mask.sum(-1)


def segment_nll(
    logprobs_bt: jax.Array, mask_bt: jax.Array, segment_ids_bt: jax.Array, num_segments: int
) -> tuple[jax.Array, jax.Array]:
    """Per-example summed NLL and token count of packed rows: `([B, S], [B, S])`.

    Column s holds segment s+1 (segment 0 is padding). The NLL summed over the response tokens
    of one example is the `L_m(y|x)` of method.md (arXiv 2310.13008, Sec. 3).
    """
    b, t = logprobs_bt.shape
    mask = mask_bt.astype(jnp.float32)
    seg = jnp.clip(segment_ids_bt, 0, num_segments)  # ids beyond S would alias; the packer caps S
    flat = (jnp.arange(b, dtype=jnp.int32)[:, None] * (num_segments + 1) + seg).reshape(-1)
    n = b * (num_segments + 1)
    nll = jax.ops.segment_sum((-logprobs_bt * mask).reshape(-1), flat, num_segments=n)
    cnt = jax.ops.segment_sum(mask.reshape(-1), flat, num_segments=n)
    shape = (b, num_segments + 1)
    return nll.reshape(shape)[:, 1:], cnt.reshape(shape)[:, 1:]


def example_nll(
    model: Any,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    loss_mask: jax.Array,
    num_segments: int,
    chunk: int = LM_HEAD_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """Summed response NLL and response-token count of every example in a (packed or padded)
    batch, `([B, S], [B, S])`: the one function scoring and training share."""
    hidden = model.hidden_states(input_ids, segment_ids, positions)
    return _nll_of_hidden(model, hidden, input_ids, segment_ids, loss_mask, num_segments, chunk)


def _nll_of_hidden(
    model: Any,
    hidden: jax.Array,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    loss_mask: jax.Array,
    num_segments: int,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """`example_nll` from the final hidden states `[B, T, D]`."""
    targets, mask = shift_targets(input_ids, loss_mask, segment_ids)
    lp = token_logprobs(model.logits, hidden, targets, chunk, mask, model.vocab_block(VOCAB_BLOCK))
    return segment_nll(lp, mask, segment_ids, num_segments)


def segment_mean(
    hidden_btd: jax.Array, mask_bt: jax.Array, segment_ids_bt: jax.Array, num_segments: int
) -> jax.Array:
    """Per-example mean of `hidden_btd` over the positions `mask_bt` marks: `[B, S, D]` float32
    (column s is segment s+1; an example without such positions gets zeros)."""
    b, t, d = hidden_btd.shape
    seg = jnp.clip(segment_ids_bt, 0, num_segments)
    flat = (jnp.arange(b, dtype=jnp.int32)[:, None] * (num_segments + 1) + seg).reshape(-1)
    w = mask_bt.astype(jnp.float32).reshape(-1)
    n = b * (num_segments + 1)
    sums = jax.ops.segment_sum(hidden_btd.astype(jnp.float32).reshape(-1, d) * w[:, None], flat, n)
    cnt = jax.ops.segment_sum(w, flat, num_segments=n)
    mean = sums / jnp.maximum(cnt, 1.0)[:, None]
    return mean.reshape(b, num_segments + 1, d)[:, 1:]


def example_nll_and_embedding(
    model: Any,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    loss_mask: jax.Array,
    num_segments: int,
    chunk: int = LM_HEAD_CHUNK,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`example_nll` plus each example's final hidden states mean-pooled over its response
    tokens (the positions the loss mask marks), `[B, S, D]`: the embedding a diversity step
    (DEITA's, arXiv 2312.15685) compares, from the same forward pass."""
    hidden = model.hidden_states(input_ids, segment_ids, positions)
    nll, cnt = _nll_of_hidden(model, hidden, input_ids, segment_ids, loss_mask, num_segments, chunk)
    return nll, cnt, segment_mean(hidden, loss_mask, segment_ids, num_segments)


def sft_loss_sums(
    model: Any,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    loss_mask: jax.Array,
    weights: jax.Array,
    chunk: int = LM_HEAD_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """(weighted summed response NLL, weighted response-token count) of a batch.

    The SFT loss is their ratio over the whole (accumulated, global) batch: the mean over all
    response tokens, token-weighted, so it does not depend on how examples are packed into rows
    or split into micro-batches. `weights` `[B, S]` is each example's weight (0 for filler).
    """
    nll, cnt = example_nll(
        model, input_ids, segment_ids, positions, loss_mask, weights.shape[1], chunk
    )
    return (nll * weights).sum(), (cnt * weights).sum()


# -- preference objectives ----------------------------------------------------------------------
# Each takes per-pair summed log-probs of the chosen (c) and rejected (r) responses under the
# policy (`pi_*`) and the frozen reference (`ref_*`), their response-token counts (`n_*`), `beta`
# and the label smoothing, and returns (per-pair loss, reward of c, reward of r), `[...]` each.
# The rewards are what TRL logs as rewards/chosen and rewards/rejected for that objective.
# The built-in objectives are registered with `register_objective`, the decorator a plugin uses
# (`davir_jax.plugins`), so there is one table and one way into it.

# name -> (function, default beta). DPO's 0.1 is the paper's and TRL's default; IPO's 0.1 is
# TRL's; token-normalised log-ratios are ~T times smaller, so dpo_norm's default is larger (the
# SimPO range, arXiv 2405.14734); davir_dpo's normaliser is tens to hundreds of nats, and its
# default was chosen by the experiment recorded in benchmarks/RESULTS.md.
PREFERENCE_OBJECTIVES: dict[str, tuple[Callable[..., Any], float]] = {}
# Objectives that never read `ref_*`: `davir dpo` computes no reference log-probs for them.
REFERENCE_FREE: set[str] = set()

ObjectiveFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def register_objective(
    name: str, default_beta: float, *, needs_reference: bool = True
) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator adding `fn(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta, label_smoothing)
    -> (loss, reward_c, reward_r)` to `PREFERENCE_OBJECTIVES` under `name`, with the beta that
    `dpo.beta: null` resolves to. `needs_reference=False`: `fn` ignores `ref_*` (they are 0)."""
    registry.check_name(name, "an objective name")
    if isinstance(default_beta, bool) or not default_beta > 0:
        raise ValueError(f"objective {name!r}: default_beta must be positive, got {default_beta}")

    def deco(fn: ObjectiveFn) -> ObjectiveFn:
        entry = (fn, float(default_beta))
        kind = "preference objective"
        registry.add(PREFERENCE_OBJECTIVES, name, fn, kind, entry, owner=lambda e: e[0])
        if not needs_reference:
            REFERENCE_FREE.add(name)
        return fn

    return deco


# Reference NLLs are floored here (nats) so a response the reference finds certain (NLL rounding
# to 0 in float32) cannot divide by zero in `davir_dpo`.
MIN_REF_NLL = 1e-3


def _smoothed_sigmoid_loss(z: jax.Array, label_smoothing: float) -> jax.Array:
    """-(1 - e) log sigmoid(z) - e log sigmoid(-z): DPO's loss with conservative label smoothing
    (Mitchell 2023, "A note on DPO with noisy preferences")."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(
        -z
    )


@register_objective("dpo", 0.1)
def dpo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7):
    -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])."""
    rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return _smoothed_sigmoid_loss(rc - rr, label_smoothing), rc, rr


@register_objective("ipo", 0.1)
def ipo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float, label_smoothing: float = 0.0):
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17), with summed sequence log-probs:
    (h - 1 / (2 beta))^2 with h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).
    At the reference (h = 0) it is 1 / (4 beta^2), not log 2. Label smoothing does not apply."""
    h = (pi_c - ref_c) - (pi_r - ref_r)
    return (h - 1.0 / (2.0 * beta)) ** 2, beta * (pi_c - ref_c), beta * (pi_r - ref_r)


@register_objective("dpo_norm", 2.0)
def dpo_norm_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float, label_smoothing: float = 0.0):
    """Token-normalised DPO: each log-ratio divided by its response's token count,
    r(y) = beta * (log pi(y|x) - log ref(y|x)) / T(y); loss -log sigmoid(r(y_w) - r(y_l))."""
    rc = beta * (pi_c - ref_c) / jnp.maximum(n_c, 1.0)
    rr = beta * (pi_r - ref_r) / jnp.maximum(n_r, 1.0)
    return _smoothed_sigmoid_loss(rc - rr, label_smoothing), rc, rr


@register_objective("davir_dpo", 10.0)
def davir_dpo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float, label_smoothing: float = 0.0):
    """DavIR-DPO (Zhou et al., arXiv 2310.13008, Sec. 4): each log-ratio divided by the response's
    own NLL under the frozen reference, L_ref(y|x) = -log ref(y|x) (summed):
    r(y) = beta * (log pi(y|x) - log ref(y|x)) / L_ref(y|x); loss -log sigmoid(r(y_w) - r(y_l)).
    The same relative loss reduction as the DavIR selection score."""
    rc = beta * (pi_c - ref_c) / jnp.maximum(-ref_c, MIN_REF_NLL)
    rr = beta * (pi_r - ref_r) / jnp.maximum(-ref_r, MIN_REF_NLL)
    return _smoothed_sigmoid_loss(rc - rr, label_smoothing), rc, rr


@register_objective("simpo", 2.0, needs_reference=False)
def simpo_loss(
    pi_c,
    pi_r,
    ref_c,
    ref_r,
    n_c,
    n_r,
    beta: float,
    label_smoothing: float = 0.0,
    gamma_beta_ratio: float = 0.5,
):
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6), reference-free:
    -log sigmoid(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma), with the
    target margin gamma = `gamma_beta_ratio` * beta (the SimPO code's parameterisation; its
    defaults beta 2, ratio 0.5). Rewards: beta times the mean token log-prob."""
    rc = beta * pi_c / jnp.maximum(n_c, 1.0)
    rr = beta * pi_r / jnp.maximum(n_r, 1.0)
    return _smoothed_sigmoid_loss(rc - rr - gamma_beta_ratio * beta, label_smoothing), rc, rr


# ORPO's odds need a mean token log-prob below 0 (probability below 1): this keeps log(1 - p)
# finite where a response is certain (and on filler pairs, whose log-probs are 0).
MAX_MEAN_LOGP = -1e-6


@register_objective("orpo", 0.1, needs_reference=False)
def orpo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float, label_smoothing: float = 0.0):
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 6-7), reference-free: the chosen
    response's mean token NLL plus beta (ORPO's lambda; TRL's default 0.1) times
    -log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = P(y) / (1 - P(y)) with P(y) the
    mean token probability exp(log pi(y|x) / |y|). Rewards (as TRL): beta times the mean token
    log-prob. Label smoothing does not apply."""
    mean_c = jnp.minimum(pi_c / jnp.maximum(n_c, 1.0), MAX_MEAN_LOGP)
    mean_r = jnp.minimum(pi_r / jnp.maximum(n_r, 1.0), MAX_MEAN_LOGP)

    def log_odds(m: jax.Array) -> jax.Array:
        return m - jnp.log(-jnp.expm1(m))  # log p - log(1 - p), stable near p = 1

    ratio = -jax.nn.log_sigmoid(log_odds(mean_c) - log_odds(mean_r))
    return -mean_c + beta * ratio, beta * mean_c, beta * mean_r


@register_objective("hinge", 0.1)
def hinge_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float, label_smoothing: float = 0.0):
    """Hinge on the DPO margin (SLiC-HF, Zhao et al. 2023, arXiv 2305.10425, as TRL's
    loss_type="hinge"): max(0, 1 - beta * h), h the difference of the two log-ratios. Label
    smoothing does not apply."""
    rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return jax.nn.relu(1.0 - (rc - rr)), rc, rr


@register_objective("robust", 0.1)
def robust_dpo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float, label_smoothing: float = 0.0):
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, Eq. 8; TRL's loss_type="robust"):
    an unbiased DPO loss when a share e (`label_smoothing`, below 0.5) of the pairs is flipped:
    [(1 - e) (-log sigmoid(beta h)) + e log sigmoid(-beta h)] / (1 - 2 e)."""
    rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    z, e = rc - rr, label_smoothing
    loss = ((1.0 - e) * -jax.nn.log_sigmoid(z) + e * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * e)
    return loss, rc, rr
