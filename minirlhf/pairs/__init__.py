"""Learning from pairs of answers, beside the PPO pipeline: preference records and AI-judged
pairs (preferences), a reward model trained on them (reward_model, reward_training), or the
policy trained on them directly (dpo, dpo_training)."""
