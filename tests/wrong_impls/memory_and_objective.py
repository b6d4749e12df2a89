"""Wrong replay memories, log-probs and objective terms (notebook 3)."""

import torch

from minirlhf.memory import ReplayMemory, ReplayMinibatch

from . import wrong

# ---------------------------------------------------------------- replay memories


class _Memory(ReplayMemory):
    """get_minibatches written out, with hooks for one mistake each."""

    def order(self, batch_size, generator):
        return torch.randperm(batch_size, generator=generator)

    def returns(self):
        return self.advantages + self.values

    def get_minibatches(self, num_minibatches, batches_per_learning_phase, generator=None):
        batch_size = self.logprobs.shape[0]
        returns = self.returns()
        minibatches = []
        for _ in range(batches_per_learning_phase):
            for indices in self.order(batch_size, generator).reshape(num_minibatches, -1):
                minibatches.append(self.minibatch(indices, returns))
        return minibatches

    def minibatch(self, indices, returns):
        return ReplayMinibatch(self.sample_ids[indices], self.attention_mask[indices],
                               self.logprobs[indices], self.advantages[indices],
                               returns[indices], {"reference": self.kept["reference"][indices]})


@wrong("ReplayMemory", "index every tensor with the same indices")
class MisalignedRows(_Memory):
    def minibatch(self, indices, returns):
        other = indices.sort().values  # the same samples, in another order
        return ReplayMinibatch(self.sample_ids[indices], self.attention_mask[indices],
                               self.logprobs[other], self.advantages[indices],
                               returns[indices], {"reference": self.kept["reference"][indices]})


@wrong("ReplayMemory", "you stored the advantages as returns")
class AdvantagesAsReturns(_Memory):
    def returns(self):
        return self.advantages


@wrong("ReplayMemory", "returns are the value head's targets")
class ValuesAsReturns(_Memory):
    def returns(self):
        return self.values


@wrong("ReplayMemory", "use a permutation")
class WithReplacement(_Memory):
    def order(self, batch_size, generator):
        return torch.randint(0, batch_size, (batch_size,), generator=generator)


@wrong("ReplayMemory", "you did not shuffle")
class NoShuffle(_Memory):
    def order(self, batch_size, generator):
        return torch.arange(batch_size)


@wrong("ReplayMemory", "you shuffled once and reused the order")
class OneShuffle(_Memory):
    def get_minibatches(self, num_minibatches, batches_per_learning_phase, generator=None):
        order = torch.randperm(self.logprobs.shape[0], generator=generator)
        returns = self.returns()
        return [self.minibatch(indices, returns)
                for _ in range(batches_per_learning_phase)
                for indices in order.reshape(num_minibatches, -1)]


@wrong("ReplayMemory", "pass the generator to torch.randperm")
class IgnoresGenerator(_Memory):
    def order(self, batch_size, generator):
        return torch.randperm(batch_size)


@wrong("ReplayMemory", "(num_minibatches * batches_per_learning_phase)")
class OnePass(_Memory):
    def get_minibatches(self, num_minibatches, batches_per_learning_phase, generator=None):
        return super().get_minibatches(num_minibatches, 1, generator)


# ---------------------------------------------------------------- log-probs


@wrong("get_logprobs", "add a trailing axis, tokens[..., None]")
def logprobs_gather_without_axis(logits, tokens, prefix_len):
    logprobs = logits[:, prefix_len - 1 : -1].log_softmax(-1)
    return logprobs.gather(-1, tokens[:, prefix_len:])


# ---------------------------------------------------------------- KL penalty


def _kl_per_position(logits, ref_logits):
    logprobs, ref_logprobs = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)


@wrong("calc_kl_penalty", "did you call .item()")
def kl_as_float(logits, ref_logits, kl_coef):
    return kl_coef * _kl_per_position(logits, ref_logits).mean().item()


# ---------------------------------------------------------------- entropy bonus


def _entropy_per_position(logits, dim=-1):
    logprobs = logits.log_softmax(dim)
    return -(logprobs.exp() * logprobs).sum(dim)


@wrong("calc_entropy_bonus", "Your result has no gradient")
def entropy_detached(logits, ent_coef):
    return ent_coef * _entropy_per_position(logits.detach()).mean()


# ---------------------------------------------------------------- value-function loss


@wrong("calc_value_function_loss", "Your result has no gradient")
def value_loss_rebuilt_from_float(values, mb_returns, vf_coef):
    return torch.tensor(0.5 * vf_coef * ((values - mb_returns) ** 2).mean().item())


@wrong("calc_value_function_loss", "is the length of axis 1 of `values`")
def value_loss_summed_over_positions(values, mb_returns, vf_coef):
    """A sum over positions, a mean over samples: off by gen_len, a mistake with no name."""
    return 0.5 * vf_coef * ((values - mb_returns) ** 2).sum(-1).mean()


# ---------------------------------------------------------------- issue 27: values right,
# gradients wrong; results that once collided with another mistake's


@wrong("calc_kl_penalty", "the probabilities that weight the log-ratio are detached")
def kl_with_detached_weights(logits, ref_logits, kl_coef):
    """Right value, gradient 4e-9: training then behaves as with no KL at all."""
    logprobs, ref_logprobs = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    return kl_coef * (logprobs.exp().detach() * (logprobs - ref_logprobs)).sum(-1).mean()


@wrong("calc_kl_penalty", "this is a numerical-stability case")
def kl_by_torch_distributions_in_float32(logits, ref_logits, kl_coef):
    """Right in exact arithmetic; inf where the reference's probability underflows to 0."""
    from torch.distributions import Categorical, kl_divergence

    return kl_coef * kl_divergence(Categorical(logits=logits),
                                   Categorical(logits=ref_logits)).mean()


@wrong("calc_kl_penalty", "log(softmax) is -inf")
def kl_with_log_of_softmax(logits, ref_logits, kl_coef):
    probs, ref_probs = logits.softmax(-1), ref_logits.softmax(-1)
    return kl_coef * (probs * (probs.log() - ref_probs.log())).sum(-1).mean()


@wrong("calc_entropy_bonus", "p.log() is -inf and 0 * -inf is NaN")
def entropy_of_p_log_p(logits, ent_coef):
    probs = logits.softmax(-1)
    return ent_coef * -(probs * probs.log()).sum(-1).mean()


@wrong("calc_entropy_bonus", "the probabilities p in -sum(p log p) are detached")
def entropy_with_detached_probs(logits, ent_coef):
    logprobs = logits.log_softmax(-1)
    return -ent_coef * (logprobs.detach().exp() * logprobs).sum(-1).mean()


@wrong("calc_rlhf_objective", "the signs of entropy_bonus and kl_penalty are both flipped")
def objective_two_signs_flipped(clipped_surrogate, value_loss, entropy_bonus, kl_penalty):
    """Once named "you left out kl_penalty": 1 - 2 - 4 + 8 = 1 - 2 + 4."""
    return clipped_surrogate - value_loss - entropy_bonus + kl_penalty


@wrong("whiten", "did you forget eps?")
def whiten_without_eps(advantages, eps=1e-8):
    """Once named "sample std": both give NaN on a minibatch of one token."""
    return (advantages - advantages.mean()) / advantages.std(correction=0)


@wrong("calc_clipped_surrogate_objective", "the ratio is upside down")
def surrogate_old_and_new_swapped(logprobs, mb_logprobs, mb_advantages, clip_coef):
    ratio = (mb_logprobs - logprobs).exp()
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef)
    return torch.minimum(ratio * mb_advantages, clipped * mb_advantages).mean()
