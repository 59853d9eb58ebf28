"""Direct preference optimisation loss (Rafailov et al., 2023) from summed sequence log-probs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dpo_loss(policy_chosen_logp_B, policy_rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B, beta: float):
    """Mean over the batch of -log sigmoid(r_chosen - r_rejected), r = beta * (log pi - log pi_ref).

    Inputs are per-sequence log-probs (e.g. from `sequence_logprobs`); the reference ones carry no
    gradient. Returns (loss, metrics) with metrics rewards_chosen, rewards_rejected (batch means of
    r), margin (mean of r_chosen - r_rejected) and accuracy (fraction with r_chosen > r_rejected).
    The align stage adds the NLL of the chosen responses itself.
    """
    if beta <= 0:
        raise ValueError(f"align.beta is {beta}; set it to a positive value (the default is 0.1).")
    shapes = {a.shape for a in (policy_chosen_logp_B, policy_rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss: the four log-prob inputs must be 1-D of one batch size; got {shapes}.")
    rewards_chosen_B = beta * (policy_chosen_logp_B - jax.lax.stop_gradient(ref_chosen_logp_B))
    rewards_rejected_B = beta * (policy_rejected_logp_B - jax.lax.stop_gradient(ref_rejected_logp_B))
    margin_B = rewards_chosen_B - rewards_rejected_B
    loss = jnp.mean(-jax.nn.log_sigmoid(margin_B))
    metrics = dict(
        rewards_chosen=jnp.mean(rewards_chosen_B),
        rewards_rejected=jnp.mean(rewards_rejected_B),
        margin=jnp.mean(margin_B),
        accuracy=jnp.mean((margin_B > 0).astype(jnp.float32)),
    )
    return loss, metrics
