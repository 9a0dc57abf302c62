"""The arms of the studies in sail_study.py and the config of each: every arm differs from its
contrast partner in one setting (ARMS), at an online fraction p and β named in the arm's name
(``arm_name``: ``sail_pr@p0.3@beta0.05``). Module level, so worker processes can unpickle
``make_config``."""

from __future__ import annotations

import os

from sail_jax.configs import MAIN_JOB_REVKL, VARIANTS, XPO_ALPHA, apply_overrides, ifeval_config, sail_config

# arm -> (route probability key, overrides of config.sail); p is set per study cell.
ARMS = {
    "offline_dpo": (None, {}),
    "online_dpo": ("p_pr", {"gamma": 0.0}),
    "sail_pr": ("p_pr", {"gamma": 0.3}),
    "sail_pr_released": ("p_pr", {"gamma": 0.3, "score_term": "released_code"}),
    # Their DPO runs: 4 rows per GPU x 2 accumulation steps (configs/devices.yaml, pipelines/dpo.py).
    "sail_pr_released_bg8": ("p_pr", {"gamma": 0.3, "score_term": "released_code", "released_code_scale": 8.0}),
    "self_labelled_dpo": ("p_pp", {"lam": 0.0}),
    "sail_pp": ("p_pp", {"lam": 0.2}),
    "sail_pp_revkl": ("p_pp", {"lam": 0.2, "revkl": MAIN_JOB_REVKL}),
    "online_ipo": ("p_pr", {"gamma": 0.0, "online_loss_type": "ipo"}),
    "online_dpo_k2": ("p_pr", {"gamma": 0.0, "num_samples": 2, "pair_selection": "first_two"}),
    "online_dpo_vs_reference": ("p_pr", {"gamma": 0.0, "opponent": "reference", "num_samples": 2,
                                         "pair_selection": "first_two"}),
    "xpo": ("p_pr", {"gamma": 0.0, "opponent": "reference", "num_samples": 2, "pair_selection": "first_two",
                     "xpo_alpha": XPO_ALPHA}),
    # XPO with an exploration term large enough to matter: 1e-2·logπ(y_ref) against a DPO term of ~0.05 a row.
    "xpo_alpha_0.01": ("p_pr", {"gamma": 0.0, "opponent": "reference", "num_samples": 2,
                                "pair_selection": "first_two", "xpo_alpha": 0.01}),
    "spin": ("p_pr", {"gamma": 0.0, "opponent": "data", "num_samples": 1, "interval": 10, "sync_every": 10}),
    "nash_md": ("p_pr", {"gamma": 0.0, "opponent": "mixture", "num_samples": 2, "pair_selection": "first_two"}),
    # The baselines at SAIL's sampling budget: 4 samples per prompt for every arm; the pair-based arms
    # train on the best and the worst of the 4 (max_min), the group methods on all 4 (their configs/).
    "online_dpo_k4": ("p_pr", {"gamma": 0.0, "num_samples": 4, "pair_selection": "max_min"}),
    "sail_pr_k4": ("p_pr", {"gamma": 0.3, "num_samples": 4, "pair_selection": "max_min"}),
    **{name: ("p_pr", {k: v for k, v in VARIANTS[name].items() if k != "p_pr"}) for name in ("grpo", "dr_grpo", "rloo")},
}
FAMILY_CONTRASTS = (
    ("online IPO (loss: sigmoid → IPO)", "online_dpo", "online_ipo"),
    ("XPO's sampling (opponent: policy → reference, α = 0)", "online_dpo", "online_dpo_vs_reference"),
    (f"XPO's term (α 0 → {XPO_ALPHA:g})", "online_dpo_vs_reference", "xpo"),
    ("SPIN vs online DPO (method comparison)", "online_dpo", "spin"),
    ("Nash-MD vs online DPO (method comparison)", "online_dpo", "nash_md"),
    ("XPO's term at a larger α (α 0 → 0.01)", "online_dpo_vs_reference", "xpo_alpha_0.01"),
)
# Picked after the β sweep (FAMILY_FRONTIER_ARMS): Nash-MD's best β against the online points of nearest KL.
FAMILY_MATCHED_KL = (
    ("Nash-MD at β 0.01 vs online DPO at β 0.3 (nearest KL)", "online_dpo@beta0.3", "nash_md@beta0.01"),
    ("Nash-MD at β 0.01 vs online IPO at β 0.1 (nearest KL)", "online_ipo", "nash_md@beta0.01"),
)
# SAIL against the group-relative policy gradients at p = 1 and equal sampling budget (``--baselines``).
BASELINE_CONTRASTS = (
    ("SAIL-PR's score term, 4 samples (γ 0 → 0.3)", "online_dpo_k4", "sail_pr_k4"),
    ("GRPO vs online DPO (method comparison)", "online_dpo_k4", "grpo"),
    ("SAIL-PR vs GRPO (method comparison)", "grpo", "sail_pr_k4"),
    ("Dr. GRPO vs GRPO (no std scaling, constant normaliser, β 0.04 → 0)", "grpo", "dr_grpo"),
    ("RLOO vs GRPO (method comparison)", "grpo", "rloo"),
)
PROXY_ARMS = ("online_dpo", "sail_pr")  # also run as "<arm>_rm": labels from the proxy reward model
CONTRASTS = (
    ("SAIL-PR's score term (γ 0 → 0.3)", "online_dpo", "sail_pr"),
    ("SAIL-PR's score term, proxy RM labels", "online_dpo_rm", "sail_pr_rm"),
    ("SAIL-PP's terms (λ 0 → 0.2)", "self_labelled_dpo", "sail_pp"),
    (f"RevKL on SAIL-PP (α 0 → {MAIN_JOB_REVKL})", "sail_pp", "sail_pp_revkl"),
    ("released-code S on SAIL-PR (scale: 32 rows per device)", "sail_pr", "sail_pr_released"),
    ("released-code S on SAIL-PR (their scale B·G = 8)", "sail_pr", "sail_pr_released_bg8"),
)
# SmolLM2 on the IFEval-style task: every arm at p = 1, in phases that run one after the other (all
# seeds of SAIL's terms first, then the online family, then the references).
IFEVAL_PHASES = (("online_dpo", "sail_pr", "self_labelled_dpo", "sail_pp", "sail_pp_revkl"),
                 ("online_ipo", "online_dpo_k2", "online_dpo_vs_reference", "xpo", "spin"),
                 ("offline_dpo", "nash_md"))
IFEVAL_CONTRASTS = (
    CONTRASTS[0], CONTRASTS[2], CONTRASTS[3], FAMILY_CONTRASTS[0],
    ("XPO's sampling (opponent: policy → reference, α = 0; 2 samples)", "online_dpo_k2", "online_dpo_vs_reference"),
    FAMILY_CONTRASTS[2], FAMILY_CONTRASTS[3],
    ("online vs offline DPO (method comparison)", "offline_dpo", "online_dpo"),
    ("Nash-MD vs online DPO with 2 samples (method comparison)", "online_dpo_k2", "nash_md"),
)
METRICS = (("reward", True), ("kl", False), ("win_rate", True), ("distinct_2", True))
BASELINE_METRICS = METRICS + (("seconds_per_update", False),)
IFEVAL_METRICS = (("score", True), ("finished", True)) + METRICS
FRONTIER_ARMS = ("offline_dpo", "online_dpo", "sail_pr", "self_labelled_dpo", "sail_pp_revkl")
DEFAULT_BETA = float(sail_config("offline_dpo").loss.beta)  # every arm's β unless its name says otherwise
# The family's reward-KL frontier at p = 1: Nash-MD moves less per update than online DPO at equal β, so
# only a β sweep says whether it is more conservative or worse (DEFAULT_BETA is the family's own arms).
FAMILY_FRONTIER_ARMS = ("online_dpo", "nash_md")
FAMILY_BETAS = "0.01,0.03,0.1,0.3"


def arm_name(arm: str, p: float | None, beta: float | None = None) -> str:
    """``arm`` at online fraction p (and β): e.g. ``sail_pr@p0.3@beta0.05``; ``arm`` may carry its β. At
    DEFAULT_BETA the name has no β, so a β sweep's default point is the arm itself."""
    if "@beta" in arm:
        arm, beta = arm.split("@beta")[0], float(arm.split("@beta")[1])
    name = arm if p is None or ARMS[arm.removesuffix("_rm")][0] is None else f"{arm}@p{p:g}"
    return name if beta is None or beta == DEFAULT_BETA else f"{name}@beta{beta:g}"


def make_config(name: str, *, steps: int, out: str, task: str, gguf: str = "", reduced: bool = False):
    """The config of an arm name as written by ``arm_name`` (module level: picklable for worker processes)."""
    arm, *parts = name.split("@")
    if task == "ifeval":
        c = ifeval_config("offline_dpo", reduced=reduced)
        c.task.gguf = gguf
        if not reduced:
            # Fewer updates than the preset's 200 (every arm runs 5 seeds on one GPU) at twice its learning
            # rate: about the same distance travelled under RMSprop, whose step size is set by the rate.
            c.optim.learning_rate = 2e-5
    else:
        c = sail_config("offline_dpo")
        c.task.name = task
    if arm.endswith("_rm"):
        arm = arm[:-3]
        c.reward.update(kind="model", path=reward_model_path(out), eval_kind=task)
    route, sail = ARMS[arm]
    for part in parts:
        if part.startswith("beta"):
            c.loss.beta = float(part[4:])
        elif part.startswith("p"):
            c.sail[route] = float(part[1:])
    apply_overrides(c, sail)
    c.variant = name
    c.steps, c.eval_every, c.checkpoint.every = steps, max(steps // (2 if task == "ifeval" else 3), 1), 0
    c.export = c.checkpoint.final = False  # a study keeps metrics and summaries, not model copies
    return c


def reward_model_path(out: str) -> str:
    return os.path.join(out, "reward_model", "export")
