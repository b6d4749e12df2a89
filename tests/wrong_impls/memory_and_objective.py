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
                               returns[indices], self.ref_outputs[indices])


@wrong("ReplayMemory", "index every tensor with the same indices")
class MisalignedRows(_Memory):
    def minibatch(self, indices, returns):
        other = indices.sort().values  # the same samples, in another order
        return ReplayMinibatch(self.sample_ids[indices], self.attention_mask[indices],
                               self.logprobs[other], self.advantages[indices],
                               returns[indices], self.ref_outputs[indices])


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


@wrong("get_logprobs", "the logits at position s predict the token at s + 1")
def logprobs_same_position(logits, tokens, prefix_len):
    logprobs = logits[:, prefix_len:].log_softmax(-1)
    return logprobs.gather(-1, tokens[:, prefix_len:, None]).squeeze(-1)


@wrong("get_logprobs", "did you forget log_softmax")
def logprobs_raw_logits(logits, tokens, prefix_len):
    return logits[:, prefix_len - 1 : -1].gather(-1, tokens[:, prefix_len:, None]).squeeze(-1)


@wrong("get_logprobs", "you returned probabilities")
def logprobs_are_probs(logits, tokens, prefix_len):
    probs = logits[:, prefix_len - 1 : -1].softmax(-1)
    return probs.gather(-1, tokens[:, prefix_len:, None]).squeeze(-1)


@wrong("get_logprobs", "did you ignore prefix_len")
def logprobs_every_token(logits, tokens, prefix_len):
    return logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


# ---------------------------------------------------------------- KL penalty


def _kl_per_position(logits, ref_logits):
    logprobs, ref_logprobs = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)


@wrong("calc_kl_penalty", "did you forget kl_coef")
def kl_without_coef(logits, ref_logits, kl_coef):
    return _kl_per_position(logits, ref_logits).mean()


@wrong("calc_kl_penalty", "you computed KL(reference || policy)")
def kl_reversed(logits, ref_logits, kl_coef):
    return kl_coef * _kl_per_position(ref_logits, logits).mean()


@wrong("calc_kl_penalty", "you summed the KL over positions")
def kl_summed(logits, ref_logits, kl_coef):
    return kl_coef * _kl_per_position(logits, ref_logits).sum()


@wrong("calc_kl_penalty", "the sign is flipped")
def kl_negative(logits, ref_logits, kl_coef):
    return -kl_coef * _kl_per_position(logits, ref_logits).mean()


@wrong("calc_kl_penalty", "did you use the raw logits as log-probs")
def kl_of_raw_logits(logits, ref_logits, kl_coef):
    return kl_coef * (logits.softmax(-1) * (logits - ref_logits)).sum(-1).mean()


@wrong("calc_kl_penalty", "use log_softmax")
def kl_log_of_softmax(logits, ref_logits, kl_coef):
    probs, ref_probs = logits.softmax(-1), ref_logits.softmax(-1)
    return kl_coef * (probs * (probs.log() - ref_probs.log())).sum(-1).mean()


@wrong("calc_kl_penalty", "did you call .item()")
def kl_as_float(logits, ref_logits, kl_coef):
    return kl_coef * _kl_per_position(logits, ref_logits).mean().item()


# ---------------------------------------------------------------- entropy bonus


def _entropy_per_position(logits, dim=-1):
    logprobs = logits.log_softmax(dim)
    return -(logprobs.exp() * logprobs).sum(dim)


@wrong("calc_entropy_bonus", "did you forget ent_coef")
def entropy_without_coef(logits, ent_coef):
    return _entropy_per_position(logits).mean()


@wrong("calc_entropy_bonus", "the sign is flipped")
def negative_entropy(logits, ent_coef):
    return -ent_coef * _entropy_per_position(logits).mean()


@wrong("calc_entropy_bonus", "you summed over positions")
def entropy_summed(logits, ent_coef):
    return ent_coef * _entropy_per_position(logits).sum()


@wrong("calc_entropy_bonus", "softmax over the wrong dimension")
def entropy_wrong_dim(logits, ent_coef):
    return ent_coef * _entropy_per_position(logits, dim=1).mean()


@wrong("calc_entropy_bonus", "Your result has no gradient")
def entropy_detached(logits, ent_coef):
    return ent_coef * _entropy_per_position(logits.detach()).mean()


# ---------------------------------------------------------------- value-function loss


@wrong("calc_value_function_loss", "did you forget the 1/2")
def value_loss_without_half(values, mb_returns, vf_coef):
    return vf_coef * ((values - mb_returns) ** 2).mean()


@wrong("calc_value_function_loss", "did you forget vf_coef")
def value_loss_without_coef(values, mb_returns, vf_coef):
    return 0.5 * ((values - mb_returns) ** 2).mean()


@wrong("calc_value_function_loss", "you summed the squared errors")
def value_loss_summed(values, mb_returns, vf_coef):
    return 0.5 * vf_coef * ((values - mb_returns) ** 2).sum()


@wrong("calc_value_function_loss", "return the positive loss")
def value_loss_negative(values, mb_returns, vf_coef):
    return -0.5 * vf_coef * ((values - mb_returns) ** 2).mean()


@wrong("calc_value_function_loss", "you used the absolute error")
def value_loss_absolute(values, mb_returns, vf_coef):
    return 0.5 * vf_coef * (values - mb_returns).abs().mean()


@wrong("calc_value_function_loss", "Your result has no gradient")
def value_loss_rebuilt_from_float(values, mb_returns, vf_coef):
    return torch.tensor(0.5 * vf_coef * ((values - mb_returns) ** 2).mean().item())


# ---------------------------------------------------------------- clipped surrogate objective


def _normalized(advantages, correction=0, eps=1e-8):
    return (advantages - advantages.mean()) / (advantages.std(correction=correction) + eps)


@wrong("calc_clipped_surrogate_objective", "you maximised instead of minimised")
def surrogate_maximum(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8):
    ratio, advantages = (logprobs - mb_logprobs).exp(), _normalized(mb_advantages, eps=eps)
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages
    return torch.maximum(ratio * advantages, clipped).mean()


@wrong("calc_clipped_surrogate_objective", "did you forget to normalise the advantages")
def surrogate_unnormalised(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8):
    ratio = (logprobs - mb_logprobs).exp()
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * mb_advantages
    return torch.minimum(ratio * mb_advantages, clipped).mean()


@wrong("calc_clipped_surrogate_objective", "you normalised with the sample std")
def surrogate_sample_std(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8):
    """The seed's version: .std() is the sample std, NaN on a minibatch of one token."""
    ratio, advantages = (logprobs - mb_logprobs).exp(), _normalized(mb_advantages, 1, eps)
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages
    return torch.minimum(ratio * advantages, clipped).mean()


@wrong("calc_clipped_surrogate_objective", "the ratio is upside down")
def surrogate_inverted_ratio(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8):
    ratio, advantages = (mb_logprobs - logprobs).exp(), _normalized(mb_advantages, eps=eps)
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages
    return torch.minimum(ratio * advantages, clipped).mean()


@wrong("calc_clipped_surrogate_objective", "not logprobs / mb_logprobs")
def surrogate_ratio_of_logprobs(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8):
    ratio, advantages = logprobs / mb_logprobs, _normalized(mb_advantages, eps=eps)
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages
    return torch.minimum(ratio * advantages, clipped).mean()


@wrong("calc_clipped_surrogate_objective", "you clipped the advantages")
def surrogate_clips_advantages(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8):
    ratio, advantages = (logprobs - mb_logprobs).exp(), _normalized(mb_advantages, eps=eps)
    clipped = ratio * advantages.clamp(1 - clip_coef, 1 + clip_coef)
    return torch.minimum(ratio * advantages, clipped).mean()


@wrong("calc_clipped_surrogate_objective", "did you forget the clipped term")
def surrogate_unclipped(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8):
    ratio, advantages = (logprobs - mb_logprobs).exp(), _normalized(mb_advantages, eps=eps)
    return (ratio * advantages).mean()
