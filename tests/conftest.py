"""The fast suite's budget: `make test` (everything not marked slow) must stay under ten minutes on
a 2-core CPU. The tests below check, in more cases (another length, dtype, kernel or preset) or more
slowly, what a fast test next to them checks too; they are marked slow here, in one place, and run
in `make test-slow` (CI runs both). Node ids, matched as prefixes (a parametrized case by the start
of its id in brackets). Measured with `pytest -m "not slow" --durations=0`; a new test that takes
more than a few seconds belongs here or gets `@pytest.mark.slow` where it is written."""

import pytest

SLOW_ON_CPU = (
    # training, notebooks, tokenizers, settings
    "tests/train/test_sharding.py::test_one_sharded_step_equals_one_device[gla]",
    "tests/experiments/test_notebooks.py::test_scaling_recovers_a_known_law",
    "tests/train/test_tokenizer.py::test_bits_per_byte_count_every_byte_of_the_evaluated_text_once[bpe]",
    "tests/train/test_tokenizer.py::test_the_shipped_bpe_round_trips_every_play_and_was_trained_on_the_training_plays",
    "tests/train/test_settings.py::test_a_layer_key_reaches_the_built_layer[mamba2]",
    "tests/train/test_settings.py::test_a_layer_key_reaches_the_built_layer[moe]",
    # the model
    "tests/arch/test_mixture_of_depths.py::test_a_routed_block_is_its_formula",   # eager per-row reference
    "tests/arch/test_mixture_of_depths.py::test_parameter_and_flop_counts",
    "tests/arch/test_causal_lm.py::test_cached_decoding_matches_full_forward[hybrid_gla]",
    "tests/arch/test_causal_lm.py::test_cached_decoding_matches_full_forward[moe]",
    "tests/arch/test_causal_lm.py::test_remat_gives_same_gradients",
    "tests/arch/test_causal_lm.py::test_flops_per_token_matches_xla_cost_analysis[config3-1024]",
    "tests/arch/test_causal_lm.py::test_flops_per_token_matches_xla_cost_analysis[config1-256]",
    "tests/arch/test_causal_lm.py::test_num_params_matches_model[sparse_mixers]",
    "tests/arch/test_causal_lm.py::test_num_params_matches_model[hybrid_gla]",
    # layers (the conformance suite's jit == eager check: attention and gla stay fast)
    "tests/layers/test_ring_attention.py::test_ring_attention_equals_dense_attention",
    "tests/layers/test_moe.py::test_dropless_equals_every_expert_reference[kw1]",
    "tests/layers/test_moe.py::test_dropless_equals_every_expert_reference[kw2]",
    "tests/layers/test_moe.py::test_dropless_equals_every_expert_reference[kw3]",
    "tests/layers/test_sparse_prefill.py::test_xattention_on_some_query_blocks_gives_their_rows",
    "tests/layers/test_sparse_prefill.py::test_keep_everything_budget_is_dense[flexprefill]",
    "tests/layers/test_routing_attention.py::test_commitment_loss_reaches_the_gradient",
    *(f"tests/layers/test_conformance.py::test_mixer_conforms[{name}-jit_equals_eager]" for name in (
        "linear_attention", "mamba2", "mlstm", "slstm", "gated_deltanet", "moba", "nsa", "bilevel_routing_attention",
        "routing_attention", "mla", "cca")),
    # dot-product and flash attention
    "tests/pallas_kernels/test_dot_product_attention.py::test_decode_mask_against_longer_keys[xla]",
    "tests/pallas_kernels/test_dot_product_attention.py::test_causal_matches_reference[1-xla]",
    "tests/pallas_kernels/test_dot_product_attention.py::test_causal_matches_reference[63-xla]",
    "tests/pallas_kernels/test_dot_product_attention.py::test_causal_matches_reference[257-xla]",
    "tests/pallas_kernels/test_flash_attention.py::test_fused_matches_reference[splash-T1-",
    "tests/pallas_kernels/test_flash_attention.py::test_fused_matches_reference[splash-T63-",
    "tests/pallas_kernels/test_flash_attention.py::test_fused_matches_reference[pallas_gpu-T1-",
    "tests/pallas_kernels/test_flash_attention.py::test_fused_matches_reference[pallas_gpu-T63-",
    # linear attention (the kernels keep their own fast tests in test_linear_attention_pallas.py)
    "tests/pallas_kernels/test_linear_attention.py::test_matches_float64_reference[xla-T65-decay=channel-C64-bfloat16",
    "tests/pallas_kernels/test_linear_attention.py::test_matches_float64_reference[xla-T100-",
    "tests/pallas_kernels/test_linear_attention.py::test_matches_float64_reference[xla-T257-decay=channel",
    "tests/pallas_kernels/test_linear_attention.py::test_matches_float64_reference[pallas_tpu-",
    "tests/pallas_kernels/test_linear_attention.py::test_matches_float64_reference[pallas_gpu-",
    "tests/pallas_kernels/test_linear_attention.py::test_xla_factored_and_exact_per_channel_scores_agree[64]",
    "tests/pallas_kernels/test_linear_attention.py::test_defaults_jit_and_no_final_state",
    "tests/pallas_kernels/test_linear_attention.py::test_xla_blocks_match_reference[channel]",
    "tests/pallas_kernels/test_linear_attention_pallas.py::test_segment_on_chunk_boundary_and_extreme_decays",
    "tests/pallas_kernels/test_linear_attention_pallas.py::test_unaligned_head_dims_match_reference[channel-",
    "tests/pallas_kernels/test_linear_attention_pallas.py::test_tpu_aot_compile_forward_and_backward"
    "[channel-bfloat16-True]",
    # mlstm
    "tests/pallas_kernels/test_mlstm.py::test_matches_float64_reference[pallas_tpu-",
    "tests/pallas_kernels/test_mlstm.py::test_matches_float64_reference[pallas_gpu-",
    "tests/pallas_kernels/test_mlstm.py::test_matches_float64_reference[xla-T65-extreme-C64-bfloat16",
    "tests/pallas_kernels/test_mlstm.py::test_xla_blocks_match_reference",
    "tests/pallas_kernels/test_mlstm.py::test_packed_segments_equal_separate_runs",
    "tests/pallas_kernels/test_mlstm.py::test_xla_chunk_size_invariance",
    "tests/pallas_kernels/test_mlstm.py::test_no_inf_or_nan_at_the_extremes",
    "tests/pallas_kernels/test_mlstm_pallas.py::test_unaligned_head_dims_match_reference[pallas_tpu]",
    # slstm
    "tests/pallas_kernels/test_slstm.py::test_matches_float64_reference[pallas_gpu-",
    "tests/pallas_kernels/test_slstm.py::test_matches_float64_reference[xla-T65-bfloat16",
    "tests/pallas_kernels/test_slstm.py::test_matches_float64_reference[xla-T257-float32-segments-init-i=uniform30",
    "tests/pallas_kernels/test_slstm.py::test_matches_float64_reference[xla-T64-",
    "tests/pallas_kernels/test_slstm.py::test_matches_float64_reference[xla-T63-",
    "tests/pallas_kernels/test_slstm.py::test_matches_float64_reference[xla-T1-",
    "tests/pallas_kernels/test_slstm.py::test_causal_by_gradient[True]",
    "tests/pallas_kernels/test_slstm.py::test_underflow_guard",
    "tests/pallas_kernels/test_slstm.py::test_defaults_jit_and_no_final_state",
    "tests/pallas_kernels/test_slstm_pallas.py::test_tpu_aot_compile_forward_and_backward[128-float32-True]",
    "tests/pallas_kernels/test_slstm_pallas.py::test_unaligned_dim_and_batch_blocks_match_reference[pallas_tpu]",
    # delta rule
    "tests/pallas_kernels/test_delta_rule.py::test_xla_blocks_match_reference",
    "tests/pallas_kernels/test_delta_rule.py::test_matches_float64_reference[xla-T257-",
    "tests/pallas_kernels/test_delta_rule.py::test_matches_float64_reference[xla-T64-",
    # block-sparse attention
    "tests/pallas_kernels/test_block_sparse_attention.py::test_query_blocks_give_the_rows_of_the_full_sequence",
    "tests/pallas_kernels/test_block_sparse_attention.py::test_xla_matches_reference[T257-",
    "tests/pallas_kernels/test_block_sparse_attention.py::test_xla_matches_reference[T100-",
    "tests/pallas_kernels/test_block_sparse_attention_pallas.py::test_tpu_semantics_interpreter_matches_reference[T33-",
    "tests/pallas_kernels/test_block_sparse_attention_pallas.py::test_matches_reference[T257-",
    # grouped matmul
    "tests/pallas_kernels/test_grouped_matmul.py::test_matches_reference[xla-M_is_257-",
    "tests/pallas_kernels/test_grouped_matmul.py::test_matches_reference[pallas_tpu-rows_after_last_group-bf16]",
    "tests/pallas_kernels/test_grouped_matmul.py::test_matches_reference[xla-empty_groups-",
    "tests/pallas_kernels/test_grouped_matmul.py::test_matches_reference[xla-one_group_holds_all-",
    *(f"tests/pallas_kernels/test_grouped_matmul.py::test_matches_reference[{case}" for case in (
        "xla-uneven-bf16", "xla-balanced-bf16", "xla-rows_after_last_group-bf16",
        "xla-rows_after_last_group_tile_path-",
        "xla-all_groups_empty-bf16", "xla-M_is_1-bf16", "xla-G_is_1-bf16", "pallas_tpu-one_group_holds_all",
        "pallas_tpu-rows_after_last_group", "pallas_tpu-M_is_1", "pallas_tpu-uneven-bf16")),
    *(f"tests/pallas_kernels/test_block_sparse_attention.py::test_xla_matches_reference[{case}" for case in (
        "T96-", "T48-", "T1-")),
    "tests/pallas_kernels/test_block_sparse_attention.py::test_a_block_listed_twice_counts_once[reference]",
    *(f"tests/pallas_kernels/test_block_sparse_attention_pallas.py::test_matches_reference[{case}" for case in (
        "T100-", "T96-", "T65-S65-bq16-bk16-full", "T48-", "T63-", "T1-")),
    *(f"tests/pallas_kernels/test_block_sparse_attention_gpu.py::test_interpret_mode_matches_reference[{case}"
      for case in ("T1-", "T96-", "T100-", "T65-S65-bq16-bk16-causal", "T48-", "T257-", "T63-")),
    *(f"tests/pallas_kernels/test_flash_attention.py::test_fused_matches_reference[{case}" for case in (
        "splash-T65-Hkv2-float32-noseg-full", "pallas_gpu-T65-Hkv2-float32-noseg-full", "pallas_gpu-T65-Hkv2-bfloat16",
        "splash-T65-Hkv2-bfloat16")),
    "tests/pallas_kernels/test_flash_attention.py::test_splash_aot_compiles_forward_and_backward_for_v5e[512-",
    "tests/pallas_kernels/test_linear_attention.py::test_xla_chunk_size_invariance[channel]",
    "tests/pallas_kernels/test_linear_attention.py::test_xla_chunk_size_invariance[scalar]",
    "tests/pallas_kernels/test_linear_attention.py::test_matches_float64_reference[xla-T64-decay=channel",
    "tests/pallas_kernels/test_linear_attention.py::test_matches_float64_reference[xla-T257-decay=scalar",
    # the conformance suite's FLOP check: attention, gla, mlstm and gated_deltanet stay fast
    *(f"tests/layers/test_conformance.py::test_mixer_conforms[{name}-flops]" for name in (
        "linear_attention", "mamba2", "slstm", "moba", "nsa", "bilevel_routing_attention", "routing_attention",
        "uoe_attention", "mla", "cca")),   # mla and cca: within 5% in tests/layers/test_latent_attention_flops.py
    "tests/train/test_convert_to_mla.py::test_the_converted_model_computes_the_same_logits[1-24-8]",
    # a fresh clone's make test took 9:42, 10:23 and 9:58 here with issue 19's tests: more cases to slow
    "tests/layers/test_sparse_prefill.py::test_lists_are_valid_causal_with_diagonal[flexprefill]",
    "tests/pallas_kernels/test_dot_product_attention.py::test_packed_segments_match_reference[63-xla]",
    "tests/experiments/test_notebooks.py::test_scaling_reads_the_committed_sweep_from_its_folder",
    "tests/layers/test_routing_attention.py::test_train_step_updates_and_checkpoints_the_centroids",
    "tests/layers/test_routing_attention.py::test_centroids_follow_the_kmeans_law_in_training_mode_only",
    "tests/arch/test_mixture_of_depths.py::test_evaluation_is_causal_by_perturbation_and_training_is_not",
    "tests/layers/test_moe.py::test_capacity_equals_dropless_when_nothing_overflows",
    "tests/train/test_convert_to_mla.py::test_adam_moments_follow_the_parameters",
    # mla and cca: the tiny configs' decoding is also the conformance suite's check; their other variant stays
    "tests/layers/test_mla.py::test_absorbed_decoding_equals_the_expanded_forward[tiny]",
    "tests/layers/test_mla.py::test_the_absorbed_form_equals_the_expanded_one_with_every_gradient[tiny]",
    "tests/layers/test_cca.py::test_without_compression_convolutions_mean_shift_and_norm_it_is_attention[2]",
    "tests/layers/test_cca.py::test_decoding_token_by_token_and_in_chunks_equals_the_parallel_form[1]",
    "tests/train/test_convert_to_mla.py::test_the_converted_model_computes_the_same_logits[4-0-4]",
    "tests/layers/test_conformance.py::test_mixer_conforms[uoe_attention-jit_equals_eager]",
    # room for the optimizers' fast tests: another dtype or case of a test that stays fast
    "tests/pallas_kernels/test_block_sparse_attention_pallas.py::test_matches_reference[T65-S65-bq16-bk16-random-n3-"
    "H4/2-bfloat16-segments]",
    "tests/pallas_kernels/test_block_sparse_attention_pallas.py::test_tpu_aot_compile_forward_and_backward"
    "[dense-bfloat16]",
    "tests/pallas_kernels/test_block_sparse_attention_pallas.py::test_tpu_aot_compile_forward_and_backward"
    "[segments-bfloat16]",
    "tests/layers/test_linear_mixer_formulas.py::test_lightning_attention_formula[False]",
    "tests/layers/test_linear_mixer_formulas.py::test_bfloat16_compute_tracks_float32[mamba2]",
    "tests/layers/test_linear_mixer_formulas.py::test_bfloat16_compute_tracks_float32[gla]",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_ON_CPU):
            item.add_marker(pytest.mark.slow)
