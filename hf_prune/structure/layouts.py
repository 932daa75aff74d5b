"""The built-in family table: one `register_layout` per layer layout, tried in this order.

A layout matches by the module paths it names (and, where two families share paths but differ in behaviour, by the
layer's class name), never by `config.model_type`, so every family that builds its layers the same way is covered
by one entry: the `bert` layout covers BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT and more; `llama` covers Llama,
Mistral, Qwen2, Qwen3 (per-head q/k norms act on `head_dim` and are shared by the heads) and their relatives.
To reach a family this table does not know, register a `Layout` of its own (see README, "Every architecture").
"""

from __future__ import annotations

from torch import nn

from .spec import AttentionLayout, HiddenLayout, Layout, MlpLayout, MoeLayout, register_layout
from .standins import TRANSFORMERS_MAJOR

_LLAMA_ATTENTION = AttentionLayout(
    owner="self_attn", core="self_attn", output="self_attn.o_proj",
    query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
)
_LLAMA_HIDDEN = HiddenLayout(
    embeddings=("embed_tokens",),
    norms=("norm",),
    layer_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    layer_size_attrs=(".hidden_size", "mlp.hidden_size"),
    # hidden_size // num_attention_heads no longer gives the head size once the hidden size changes.
    config_changes=("head_dim",),
)
_BART_ATTENTION = AttentionLayout(
    owner="self_attn", core="self_attn", output="self_attn.out_proj",
    query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
    width_attrs=("all_head_size", "inner_dim", "embed_dim"),
)
_BART_CROSS_ATTENTION = AttentionLayout(
    owner="encoder_attn", core="encoder_attn", output="encoder_attn.out_proj",
    query="encoder_attn.q_proj", key="encoder_attn.k_proj", value="encoder_attn.v_proj",
    width_attrs=("all_head_size", "inner_dim", "embed_dim"), optional=True, cross=True,
)
_VIT_HIDDEN = HiddenLayout(
    embeddings=(),
    parameters=("embeddings.cls_token", "embeddings.position_embeddings", "embeddings.mask_token"),
    writers=("embeddings.patch_embeddings.projection",),  # a convolution: one output channel per hidden channel
    norms=("layernorm",),
    layer_norms=("layernorm_before", "layernorm_after"),
)
_BERT_MLP = MlpLayout(owner="intermediate", inputs=("intermediate.dense",), output="output.dense",
                      activation="intermediate.intermediate_act_fn")


_HEAD_SIZE_FROM_HIDDEN = (
    "its config has no head_dim field: the model derives the head size from hidden_size // num_attention_heads, so "
    "a narrower hidden size would rebuild narrower heads at load; heads, key/value groups, neurons and layers are "
    "supported"
)


_MOE_NEURONS = (
    "neurons inside experts are removed by prune_ffn_neurons and whole experts by prune_experts (scored with "
    "compute_expert_importance); importance scoring and gradual pruning of neurons inside experts are not supported"
)
def _falcon_packing(core: nn.Module) -> str:
    # Falcon's multi-query layout is [queries | one key | one value]; the others group each key/value head with
    # its queries ([q..., k, v] per group, single heads when there is no grouping).
    if getattr(core, "new_decoder_architecture", False) or not getattr(core, "multi_query", False):
        return "per_group"
    return "blocks"


LAYOUTS = (
    Layout(
        name="bert",
        families="BERT, RoBERTa, XLM-RoBERTa, ELECTRA, CamemBERT",
        attentions=(AttentionLayout(
            owner="attention", core="attention.self", output="attention.output.dense",
            query="attention.self.query", key="attention.self.key", value="attention.self.value",
        ),),
        mlp=_BERT_MLP,
        hidden=HiddenLayout(
            embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings",
                        "embeddings.token_type_embeddings"),
            writers=("embeddings_project",),  # ELECTRA with embedding_size != hidden_size
            norms=("embeddings.LayerNorm",),
            layer_norms=("attention.output.LayerNorm", "output.LayerNorm"),
        ),
        native_capable=True,
    ),
    Layout(
        name="deberta",
        families="DeBERTa-v2, DeBERTa-v3",
        attentions=(AttentionLayout(
            owner="attention", core="attention.self", output="attention.output.dense",
            query="attention.self.query_proj", key="attention.self.key_proj", value="attention.self.value_proj",
            # Disentangled attention without shared keys projects the relative embeddings per head too.
            extra_heads=("attention.self.pos_key_proj", "attention.self.pos_query_proj"),
        ),),
        mlp=_BERT_MLP,
        hidden=HiddenLayout(
            embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings",
                        "embeddings.token_type_embeddings", "encoder.rel_embeddings"),
            writers=("embeddings.embed_proj",),
            norms=("embeddings.LayerNorm", "encoder.LayerNorm"),
            layer_norms=("attention.output.LayerNorm", "output.LayerNorm"),
        ),
    ),
    Layout(
        name="vit",
        families="ViT, DeiT (Transformers 4.x module names)",
        attentions=(AttentionLayout(
            owner="attention", core="attention.attention", output="attention.output.dense",
            query="attention.attention.query", key="attention.attention.key", value="attention.attention.value",
        ),),
        mlp=_BERT_MLP,
        hidden=_VIT_HIDDEN,
    ),
    Layout(
        name="vit-proj",
        families="ViT (Transformers 5.x module names)",
        attentions=(AttentionLayout(
            owner="attention", core="attention", output="attention.o_proj",
            query="attention.q_proj", key="attention.k_proj", value="attention.v_proj",
        ),),
        mlp=MlpLayout(owner="mlp", inputs=("mlp.fc1",), output="mlp.fc2", activation="mlp.activation_fn"),
        hidden=_VIT_HIDDEN,
    ),
    Layout(
        name="mpnet",
        families="MPNet",
        attentions=(AttentionLayout(
            owner="attention", core="attention.attn", output="attention.attn.o",
            query="attention.attn.q", key="attention.attn.k", value="attention.attn.v",
            head_inputs=("position_bias",),
        ),),
        mlp=_BERT_MLP,
        hidden=HiddenLayout(
            untouched=("encoder.relative_attention_bias",),  # buckets x heads
            embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings"),
            norms=("embeddings.LayerNorm",),
            layer_norms=("attention.LayerNorm", "output.LayerNorm"),
        ),
    ),
    Layout(
        name="distilbert",
        families="DistilBERT",
        attentions=(AttentionLayout(
            owner="attention", core="attention", output="attention.out_lin",
            query="attention.q_lin", key="attention.k_lin", value="attention.v_lin",
            width_attrs=("dim",),
        ),),
        mlp=MlpLayout(owner="ffn", inputs=("ffn.lin1",), output="ffn.lin2", activation="ffn.activation"),
        hidden=HiddenLayout(
            embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings"),
            norms=("embeddings.LayerNorm",),
            layer_norms=("sa_layer_norm", "output_layer_norm"),
        ),
        native_capable=True,
    ),
    Layout(
        name="albert",
        families="ALBERT",
        attentions=(AttentionLayout(
            owner="attention", core="attention", output="attention.dense",
            query="attention.query", key="attention.key", value="attention.value",
        ),),
        mlp=MlpLayout(owner="", inputs=("ffn",), output="ffn_output", activation="activation"),
        refuse=("ALBERT shares one layer's weights across all its layers (albert_layer_groups), so removing a head "
                "or neuron would remove it from every layer at once, and its per-layer numbering does not exist; "
                "prune it with unstructured or N:M patterns (PruningConfig) instead."),
    ),
    Layout(
        name="modernbert",
        families="ModernBERT",
        attentions=(AttentionLayout(owner="attn", core="attn", output="attn.Wo", qkv="attn.Wqkv"),),
        mlp=MlpLayout(owner="mlp", fused="mlp.Wi", output="mlp.Wo", activation="mlp.act", gated=True),
        hidden=HiddenLayout(
            embeddings=("embeddings.tok_embeddings",),
            norms=("embeddings.norm", "final_norm"),
            layer_norms=("attn_norm", "mlp_norm"),
        ),
    ),
    Layout(
        name="gpt2",
        families="GPT-2",
        attentions=(AttentionLayout(
            owner="attn", core="attn", output="attn.c_proj", qkv="attn.c_attn", width_attrs=("split_size",),
        ),),
        mlp=MlpLayout(owner="mlp", inputs=("mlp.c_fc",), output="mlp.c_proj", activation="mlp.act"),
        hidden=HiddenLayout(
            embeddings=("wte", "wpe"), norms=("ln_f",), layer_norms=("ln_1", "ln_2"),
            size_attrs=(".embed_dim",), layer_size_attrs=("attn.embed_dim",),
        ),
        native_capable=True,
    ),
    Layout(
        name="gemma",
        families="Gemma, Gemma-2",
        layer_class=r"Gemma\d*DecoderLayer",
        attentions=(_LLAMA_ATTENTION,),
        mlp=MlpLayout(owner="mlp", inputs=("mlp.gate_proj", "mlp.up_proj"), output="mlp.down_proj",
                      activation="mlp.act_fn", gated=True),
        hidden=HiddenLayout(
            embeddings=("embed_tokens",),
            refuse=("Gemma multiplies the embeddings by sqrt(config.hidden_size) in its forward, so a narrower hidden "
                    "size would rescale every token; heads, key/value groups, neurons and layers are supported"),
        ),
    ),
    Layout(
        name="llama",
        families="Llama, Mistral, Qwen2, Qwen3, SmolLM",
        attentions=(_LLAMA_ATTENTION,),
        mlp=MlpLayout(owner="mlp", inputs=("mlp.gate_proj", "mlp.up_proj"), output="mlp.down_proj",
                      activation="mlp.act_fn", gated=True),
        hidden=_LLAMA_HIDDEN,
    ),
    Layout(
        name="phi3",
        families="Phi-3, Phi-4",
        attentions=(AttentionLayout(
            owner="self_attn", core="self_attn", output="self_attn.o_proj", qkv="self_attn.qkv_proj",
            config_counts=(("num_attention_heads", "heads"), ("num_key_value_heads", "kv")),
        ),),
        mlp=MlpLayout(owner="mlp", fused="mlp.gate_up_proj", output="mlp.down_proj", activation="mlp.activation_fn",
                      gated=True),
        hidden=_LLAMA_HIDDEN,
    ),
    Layout(
        name="gpt_neox",
        families="GPT-NeoX, Pythia",
        attentions=(AttentionLayout(
            owner="attention", core="attention", output="attention.dense", qkv="attention.query_key_value",
            qkv_packing="per_group",
        ),),
        mlp=MlpLayout(owner="mlp", inputs=("mlp.dense_h_to_4h",), output="mlp.dense_4h_to_h", activation="mlp.act"),
        hidden=HiddenLayout(
            embeddings=("embed_in",),
            refuse=_HEAD_SIZE_FROM_HIDDEN,
        ),
    ),
    Layout(
        name="falcon",
        families="Falcon",
        attentions=(AttentionLayout(
            owner="self_attention", core="self_attention", output="self_attention.dense",
            qkv="self_attention.query_key_value", qkv_packing=_falcon_packing, width_attrs=("split_size",),
        ),),
        mlp=MlpLayout(owner="mlp", inputs=("mlp.dense_h_to_4h",), output="mlp.dense_4h_to_h", activation="mlp.act"),
        hidden=HiddenLayout(embeddings=("word_embeddings",), refuse=_HEAD_SIZE_FROM_HIDDEN),
    ),
    Layout(
        name="bart",
        families="BART, mBART, Marian, Pegasus, Whisper, OPT",
        attentions=(_BART_ATTENTION, _BART_CROSS_ATTENTION),
        mlp=MlpLayout(owner="", inputs=("fc1",), output="fc2", activation="activation_fn"),
        hidden=HiddenLayout(
            # BART-style models (their `shared` table is also each stack's embed_tokens) and OPT (one decoder).
            embeddings=("shared", "encoder.embed_tokens", "encoder.embed_positions", "decoder.embed_tokens",
                        "decoder.embed_positions"),
            writers=("decoder.project_in", "encoder.conv1", "encoder.conv2"),  # Whisper's audio convolutions
            readers=("encoder.conv2",),
            norms=("encoder.layernorm_embedding", "decoder.layernorm_embedding", "encoder.layer_norm",
                   "decoder.layer_norm", "decoder.final_layer_norm"),
            layer_norms=("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
            layer_size_attrs=(".embed_dim",),
            refuse_when=((("scale_embedding",), "the embeddings are multiplied by sqrt(d_model) (scale_embedding=True), "
                                             "which a narrower width would change"),),
        ),
    ),
    *(
        Layout(
            name=f"t5-{stack}{'-gated' if gated else ''}",
            families="T5, mT5, Flan-T5, UMT5" if gated else "T5",
            attentions=tuple(
                AttentionLayout(
                    owner=f"layer.{i}.{name}", core=f"layer.{i}.{name}", output=f"layer.{i}.{name}.o",
                    query=f"layer.{i}.{name}.q", key=f"layer.{i}.{name}.k", value=f"layer.{i}.{name}.v",
                    cross=name == "EncDecAttention", shared_position_bias=True,
                )
                for i, name in enumerate(("SelfAttention", "EncDecAttention")[: 2 if stack == "decoder" else 1])
            ),
            mlp=MlpLayout(
                owner=f"layer.{ff}.DenseReluDense",
                inputs=(f"layer.{ff}.DenseReluDense.wi_0", f"layer.{ff}.DenseReluDense.wi_1") if gated
                else (f"layer.{ff}.DenseReluDense.wi",),
                output=f"layer.{ff}.DenseReluDense.wo", activation=f"layer.{ff}.DenseReluDense.act", gated=gated,
            ),
            hidden=HiddenLayout(
                layer_untouched=tuple(f"layer.{i}.{name}.relative_attention_bias" for i, name in
                                      ((0, "SelfAttention"), (1, "EncDecAttention"))),  # buckets x heads
                embeddings=("shared", "encoder.embed_tokens", "decoder.embed_tokens"),
                norms=("encoder.final_layer_norm", "decoder.final_layer_norm"),
                layer_norms=("layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm"),
                # Transformers 5 names the switch scale_decoder_outputs; 4.x reads tie_word_embeddings.
                refuse_when=((("scale_decoder_outputs", "tie_word_embeddings"),
                              "this T5 scales its decoder output by d_model ** -0.5 (original T5 with tied "
                              "embeddings), which a narrower width would change; T5 v1.1 / Flan-T5 checkpoints "
                              "(tie_word_embeddings=False) are supported"),),
            ),
        )
        for stack, ff in (("decoder", 2), ("encoder", 1))
        for gated in (False, True)
    ),
    Layout(
        name="wav2vec2",
        families="wav2vec2, HuBERT",
        attentions=(AttentionLayout(
            owner="attention", core="attention", output="attention.out_proj",
            query="attention.q_proj", key="attention.k_proj", value="attention.v_proj",
            width_attrs=("all_head_size", "inner_dim", "embed_dim"),
            outputs=3 if TRANSFORMERS_MAJOR < 5 else 2,  # 4.x returns (output, weights, cache)
        ),),
        mlp=MlpLayout(owner="feed_forward", inputs=("feed_forward.intermediate_dense",),
                      output="feed_forward.output_dense", activation="feed_forward.intermediate_act_fn"),
        hidden=HiddenLayout(
            embeddings=(),
            refuse="its positional convolution mixes the hidden channels in groups (num_conv_pos_embedding_groups), "
                   "which removing single channels would break",
        ),
    ),
    Layout(
        name="moe",
        families="Mixtral (5.x), Qwen2-MoE, Qwen3-MoE",
        requires=("mlp.experts",),
        # Qwen2-MoE under 4.x reshapes the heads' output with the attention's own `hidden_size`.
        attentions=(AttentionLayout(
            owner="self_attn", core="self_attn", output="self_attn.o_proj", query="self_attn.q_proj",
            key="self_attn.k_proj", value="self_attn.v_proj", width_attrs=("all_head_size", "hidden_size"),
        ),),
        mlp=None,
        moe=MoeLayout(
            block="mlp", router="mlp.gate", experts="mlp.experts",
            expert_mlp=MlpLayout(owner="", inputs=("gate_proj", "up_proj"), output="down_proj", activation="act_fn",
                                 gated=True),
            shared=MlpLayout(owner="mlp.shared_expert",
                             inputs=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                             output="mlp.shared_expert.down_proj", activation="mlp.shared_expert.act_fn", gated=True),
            shared_gate="mlp.shared_expert_gate",
        ),
        mlp_note=_MOE_NEURONS,
        hidden=_LLAMA_HIDDEN,
    ),
    Layout(
        name="mixtral",
        families="Mixtral (Transformers 4.x expert modules)",
        requires=("block_sparse_moe.experts",),
        attentions=(_LLAMA_ATTENTION,),
        mlp=None,
        moe=MoeLayout(
            block="block_sparse_moe", router="block_sparse_moe.gate", experts="block_sparse_moe.experts",
            expert_mlp=MlpLayout(owner="", inputs=("w1", "w3"), output="w2", activation="act_fn", gated=True),
        ),
        mlp_note=_MOE_NEURONS,
        hidden=_LLAMA_HIDDEN,
    ),
)

for _layout in LAYOUTS:
    register_layout(_layout)
