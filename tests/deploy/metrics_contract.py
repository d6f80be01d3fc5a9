"""The Prometheus metric names of the platform's metrics contract (every service exports exactly these).

Counters appear in Prometheus with ``_total``; histograms as ``_bucket``/``_sum``/``_count``.
"""

GRPC = {
    "rlhf_grpc_server_requests_total": "counter",
    "rlhf_grpc_server_request_duration_seconds": "histogram",
    "rlhf_grpc_server_in_flight_requests": "gauge",
    "rlhf_server_ready": "gauge",
}
GENERATION = {
    "rlhf_generation_request_duration_seconds": "histogram",
    "rlhf_generation_time_to_first_token_seconds": "histogram",
    "rlhf_generation_prompt_tokens_total": "counter",
    "rlhf_generation_generation_tokens_total": "counter",
    "rlhf_generation_batch_size": "histogram",
    "rlhf_generation_num_requests_waiting": "gauge",
    "rlhf_generation_num_requests_running": "gauge",
    "rlhf_generation_policy_version": "gauge",
    "rlhf_generation_weight_update_duration_seconds": "histogram",
    "rlhf_generation_weight_updates_total": "counter",
    "rlhf_generation_requests_rejected_total": "counter",
}
REWARD = {
    "rlhf_reward_pairs_scored_total": "counter",
    "rlhf_reward_request_duration_seconds": "histogram",
    "rlhf_reward_batch_size": "histogram",
    "rlhf_reward_queue_depth": "gauge",
    "rlhf_reward_model_info": "gauge",
    "rlhf_reward_model_loads_total": "counter",
    "rlhf_reward_score": "histogram",
    "rlhf_reward_requests_rejected_total": "counter",
}
FEEDBACK = {
    "rlhf_feedback_records_written_total": "counter",
    "rlhf_feedback_records_rejected_total": "counter",
    "rlhf_feedback_write_duration_seconds": "histogram",
    "rlhf_feedback_read_duration_seconds": "histogram",
    "rlhf_feedback_store_size_bytes": "gauge",
    "rlhf_feedback_records": "gauge",
}
LABELING = {
    "rlhf_labeling_judgments_total": "counter",
    "rlhf_labeling_judgment_seconds": "histogram",
    "rlhf_labeling_queue_depth": "gauge",
}
TRAINER = {
    "rlhf_trainer_step": "gauge",
    "rlhf_trainer_loss": "gauge",
    "rlhf_trainer_tokens_per_second": "gauge",
    "rlhf_trainer_phase_seconds": "gauge",
    "rlhf_rm_eval_accuracy": "gauge",
    **{
        f"rlhf_ppo_{k}": "gauge"
        for k in (
            "reward_mean",
            "reward_std",
            "kl",
            "entropy",
            "policy_loss",
            "value_loss",
            "clipfrac",
            "approx_kl",
            "response_length",
            "kl_coef",
        )
    },
}
ALL = {**GRPC, **GENERATION, **REWARD, **FEEDBACK, **LABELING, **TRAINER}


def series_names() -> set[str]:
    """Every name a query may use: counters as *_total, histograms as *_bucket/_sum/_count, gauges as is."""
    names = {"up"}
    for name, kind in ALL.items():
        if kind == "histogram":
            names.update(f"{name}_{s}" for s in ("bucket", "sum", "count"))
        else:
            names.add(name)
    return names
