"""Adapters for transformer and modern CNN blocks: timm ViT and ConvNeXt, Hugging Face GPT-2,
the Llama family and BERT. One residual unit per residual addition.

Each adapter rewrites the block's ``forward`` with the block's own submodules in
the block's own order (see :mod:`gradflow.tracing.adapters` for the interface),
passing every extra argument the block was called with (masks, caches, rotary
embeddings) on to the submodule that takes it, and returning what the block
returns. The tracer checks each against the block's own forward on its first
traced call, so a library version whose forward differs is refused with a
message rather than mis-traced.

============================================  ==========================  ==========================
block (class)                                  units                        unit's parts
============================================  ==========================  ==========================
timm ``vision_transformer.Block``              ``attn``, ``mlp``            preact = norm1 / norm2 (pre-LN)
timm ``vision_transformer.ResPostBlock``       ``attn``, ``mlp``            F ends with norm1 / norm2
timm ``vision_transformer.ParallelThingsBlock`` ``attn``, ``mlp``           F = sum of the parallel branches
timm ``vision_transformer.ParallelScalingBlock`` one unit (said once)       attention and MLP share one addition
timm ``convnext.ConvNeXtBlock``                one unit                     h = shortcut, F = dw conv, norm, MLP, gamma
HF ``GPT2Block``                               ``attn``, ``mlp``            preact = ln_1 / ln_2 (pre-LN)
HF ``LlamaDecoderLayer`` and its family         ``attn``, ``mlp``            preact = input / post_attention RMSNorm
HF ``BertLayer`` and its family                 ``attention``, ``output``    post = LayerNorm: LN(F(x) + x), post-LN
============================================  ==========================  ==========================

"Family" means the classes whose ``forward`` is, in transformers 5.24, the
same code as Llama's decoder layer or BERT's layer (Mistral, Qwen2/3, Gemma,
OLMo, DeepSeek-V2/V3, ... ; RoBERTa, ELECTRA, XLM-R, ...): see ``LLAMA_LIKE`` and
``BERT_LIKE``. For BERT the addition sits inside ``LayerNorm(h + x)``, so that
LayerNorm is the after-addition function f and the direct term passes through
its Jacobian. Cross-attention units (GPT-2 and BERT decoders given
``encoder_hidden_states``) are a third unit between the two.
"""
from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F

from gradflow.tracing.parts import Block, Parts, as_fn
from gradflow.tracing.adapters import register_adapter

# --- timm ---------------------------------------------------------------------------------


def _timm_vit_block(m) -> Block:
    """``x + drop_path1(ls1(attn(norm1(x))))``, then the same with norm2 and mlp."""
    def forward(run, x, attn_mask=None, is_causal=False):
        def attn(z):
            return m.drop_path1(m.ls1(m.attn(z, attn_mask=attn_mask, is_causal=is_causal)))
        x = run.unit(0, Parts(branch=attn, preact=m.norm1), x)
        return run.unit(1, Parts(branch=lambda z: m.drop_path2(m.ls2(m.mlp(z))), preact=m.norm2), x)
    return Block(("attn", "mlp"), forward,
                 unit_modules=((m.norm1, m.attn, m.ls1), (m.norm2, m.mlp, m.ls2)))


def _timm_res_post_block(m) -> Block:
    """``x + drop_path1(norm1(attn(x)))``: the norm ends the branch; nothing after the addition."""
    def forward(run, x, attn_mask=None, is_causal=False):
        def attn(z):
            return m.drop_path1(m.norm1(m.attn(z, attn_mask=attn_mask, is_causal=is_causal)))
        x = run.unit(0, Parts(branch=attn), x)
        return run.unit(1, Parts(branch=lambda z: m.drop_path2(m.norm2(m.mlp(z)))), x)
    return Block(("attn", "mlp"), forward, unit_modules=((m.attn, m.norm1), (m.mlp, m.norm2)))


def _timm_parallel_things_block(m) -> Block:
    """``x + sum_i attns[i](x)``, then ``x + sum_i ffns[i](x)`` (each branch: norm, layer, ls, drop path)."""
    def forward(run, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            def attn(z):
                outs = [a.drop_path(a.ls(a.attn(a.norm(z), attn_mask=attn_mask, is_causal=is_causal)))
                        for a in m.attns]
                return torch.stack(outs).sum(dim=0)
        else:
            def attn(z):
                return torch.stack([a(z) for a in m.attns]).sum(dim=0)
        x = run.unit(0, Parts(branch=attn), x)
        return run.unit(1, Parts(branch=lambda z: torch.stack([f(z) for f in m.ffns]).sum(dim=0)), x)
    return Block(("attn", "mlp"), forward, unit_modules=(tuple(m.attns), tuple(m.ffns)))


_SAID: set = set()


def _say_once(key: str, text: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        warnings.warn(text, stacklevel=3)


def _timm_parallel_scaling_block(m) -> Parts:
    """ViT-22B's parallel block: ``x + drop_path(ls(attn_out + mlp_out))`` from one in_norm/in_proj."""
    _say_once("ParallelScalingBlock",
              "gradflow: timm ParallelScalingBlock adds attention and MLP to x in ONE residual addition, "
              "so each such block is traced as one unit (attention and MLP cannot be told apart)")

    def branch(z, attn_mask=None, is_causal=False):
        B, N, C = z.shape
        x_mlp, q, k, v = torch.split(m.in_proj(z), m.in_split, dim=-1)
        if m.mlp_bias is not None:
            x_mlp = x_mlp + m.mlp_bias
        q = m.q_norm(q.view(B, N, m.num_heads, m.head_dim)).transpose(1, 2)
        k = m.k_norm(k.view(B, N, m.num_heads, m.head_dim)).transpose(1, 2)
        v = v.view(B, N, m.num_heads, m.head_dim).transpose(1, 2)
        if m.fused_attn:
            x_attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                    dropout_p=m.attn_drop.p if m.training else 0.,
                                                    is_causal=is_causal)
        else:
            lib = sys.modules[type(m).__module__]
            attn = (q * m.scale) @ k.transpose(-2, -1)
            attn = lib.maybe_add_mask(attn, lib.resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
            x_attn = m.attn_drop(attn.softmax(dim=-1)) @ v
        x_attn = x_attn.transpose(1, 2).reshape(B, N, C)
        x_mlp = m.mlp_drop(m.mlp_act(x_mlp))
        if m.out_proj is not None:
            y = m.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = m.attn_out_proj(x_attn) + m.mlp_out_proj(x_mlp)
        return m.drop_path(m.ls(y))
    return Parts(branch=branch, preact=m.in_norm)


def _timm_convnext_block(m) -> Parts:
    """``drop_path(gamma * mlp(norm(conv_dw(x)))) + shortcut(x)``; downsampling sits between stages."""
    def branch(x):
        x = m.conv_dw(x)
        if m.use_conv_mlp:
            x = m.mlp(m.norm(x))
        else:
            x = m.mlp(m.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if m.gamma is not None:
            x = x.mul(m.gamma.reshape(1, -1, 1, 1))
        return m.drop_path(x)
    return Parts(branch=branch, shortcut=as_fn(m.shortcut))


# --- Hugging Face transformers -------------------------------------------------------------


def _hf_gpt2_block(m) -> Block:
    """GPT-2: ``residual + attn(ln_1(h))``, [cross-attention], ``residual + mlp(ln_2(h))``."""
    cross = hasattr(m, "crossattention")

    def forward(run, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=False, **kwargs):
        def attn(z):
            return m.attn(z, cache=cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs)[0]
        x = run.unit(0, Parts(branch=attn, preact=m.ln_1), hidden_states)
        if encoder_hidden_states is not None:
            if not cross:
                raise ValueError(f"If `encoder_hidden_states` are passed, {m} has to be instantiated with "
                                 "cross-attention layers by setting `config.add_cross_attention=True`")

            def xattn(z):
                return m.crossattention(z, cache=cache, attention_mask=attention_mask,
                                        encoder_hidden_states=encoder_hidden_states,
                                        encoder_attention_mask=encoder_attention_mask)[0]
            x = run.unit(1, Parts(branch=xattn, preact=m.ln_cross_attn), x)
        return run.unit(2 if cross else 1, Parts(branch=m.mlp, preact=m.ln_2), x)
    if cross:
        return Block(("attn", "crossattention", "mlp"), forward,
                     unit_modules=((m.ln_1, m.attn), (m.ln_cross_attn, m.crossattention), (m.ln_2, m.mlp)))
    return Block(("attn", "mlp"), forward, unit_modules=((m.ln_1, m.attn), (m.ln_2, m.mlp)))


def _hf_llama_layer(m) -> Block:
    """Llama: ``residual + self_attn(input_layernorm(h))``, ``residual + mlp(post_attention_layernorm(h))``."""
    def forward(run, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        def attn(z):
            return m.self_attn(hidden_states=z, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                               **kwargs)[0]
        x = run.unit(0, Parts(branch=attn, preact=m.input_layernorm), hidden_states)
        return run.unit(1, Parts(branch=m.mlp, preact=m.post_attention_layernorm), x)
    return Block(("attn", "mlp"), forward,
                 unit_modules=((m.input_layernorm, m.self_attn), (m.post_attention_layernorm, m.mlp)))


def _bert_attention_unit(a, mask, encoder_hidden_states, cache, kwargs) -> Parts:
    """BertAttention: ``LayerNorm(dropout(dense(self(x))) + x)``: the LayerNorm is f."""
    def branch(z):
        out = a.self(z, encoder_hidden_states=encoder_hidden_states, attention_mask=mask, cache=cache,
                     **kwargs)[0]
        return a.output.dropout(a.output.dense(out))
    return Parts(branch=branch, post=a.output.LayerNorm)


def _hf_bert_layer(m) -> Block:
    """BERT (post-LN): attention unit, [cross-attention unit], feed-forward unit, each ``LN(F(x) + x)``."""
    cross = hasattr(m, "crossattention")

    def forward(run, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, cache=None, **kwargs):
        a = m.attention
        mask = attention_mask if not a.is_cross_attention else encoder_attention_mask
        x = run.unit(0, _bert_attention_unit(a, mask, None, cache, kwargs), hidden_states)
        if m.is_decoder and encoder_hidden_states is not None:
            if not cross:
                raise ValueError(f"If `encoder_hidden_states` are passed, {m} has to be instantiated with "
                                 "cross-attention layers by setting `config.add_cross_attention=True`")
            x = run.unit(1, _bert_attention_unit(m.crossattention, encoder_attention_mask,
                                                 encoder_hidden_states, cache, kwargs), x)

        def ffn(z):
            return m.output.dropout(m.output.dense(m.intermediate(z)))

        def chunked(z):   # BertLayer's apply_chunking_to_forward over the sequence
            from transformers.pytorch_utils import apply_chunking_to_forward
            return apply_chunking_to_forward(ffn, m.chunk_size_feed_forward, m.seq_len_dim, z)
        branch = chunked if m.chunk_size_feed_forward > 0 else ffn
        return run.unit(2 if cross else 1, Parts(branch=branch, post=m.output.LayerNorm), x)
    if cross:
        return Block(("attention", "crossattention", "output"), forward,
                     unit_modules=((m.attention,), (m.crossattention,), (m.intermediate, m.output)))
    return Block(("attention", "output"), forward,
                 unit_modules=((m.attention,), (m.intermediate, m.output)))


# Decoder layers whose forward is the same code as LlamaDecoderLayer's (transformers 5.24):
# found by comparing the parsed source of every ``*DecoderLayer.forward`` with Llama's (65 classes).
LLAMA_LIKE = (
    "arcee:ArceeDecoderLayer", "aria:AriaTextDecoderLayer", "axk1:AXK1DecoderLayer",
    "axk2:AXK2DecoderLayer", "bitnet:BitNetDecoderLayer", "cosmos3_edge:Cosmos3EdgeTextDecoderLayer",
    "csm:CsmDecoderLayer", "cwm:CwmDecoderLayer", "deepseek_ocr2:DeepseekOcr2TextDecoderLayer",
    "deepseek_v2:DeepseekV2DecoderLayer", "deepseek_v3:DeepseekV3DecoderLayer",
    "deepseek_v32:DeepseekV32DecoderLayer", "diffllama:DiffLlamaDecoderLayer",
    "dots1:Dots1DecoderLayer", "dots3_note:Dots3NoteTextDecoderLayer", "ernie4_5:Ernie4_5DecoderLayer",
    "ernie4_5_moe:Ernie4_5_MoeDecoderLayer", "eurobert:EuroBertDecoderLayer",
    "exaone_moe:ExaoneMoeDecoderLayer", "flint:FlintDecoderLayer", "gemma:GemmaDecoderLayer",
    "glm:GlmDecoderLayer", "glm4_moe:Glm4MoeDecoderLayer", "glm4_moe_lite:Glm4MoeLiteDecoderLayer",
    "glm4v_moe:Glm4vMoeTextDecoderLayer", "gradium_phonon_tts:GradiumPhononTTSDecoderLayer",
    "helium:HeliumDecoderLayer", "hrm_text:HrmTextDecoderLayer",
    "hunyuan_v1_dense:HunYuanDenseV1DecoderLayer", "hunyuan_v1_moe:HunYuanMoEV1DecoderLayer",
    "hunyuan_vl:HunYuanVLDenseV1DecoderLayer", "hy_v3:HYV3DecoderLayer", "jais2:Jais2DecoderLayer",
    "laguna:LagunaDecoderLayer", "llama:LlamaDecoderLayer", "mellum:MellumDecoderLayer",
    "mimo_v2_flash:MiMoV2FlashDecoderLayer", "ministral:MinistralDecoderLayer",
    "ministral3:Ministral3DecoderLayer", "mistral:MistralDecoderLayer",
    "mistral4:Mistral4DecoderLayer", "nanochat:NanoChatDecoderLayer", "neucodec:NeuCodecDecoderLayer",
    "olmo:OlmoDecoderLayer", "olmoe:OlmoeDecoderLayer", "paddleocr_vl:PaddleOCRDecoderLayer",
    "pocket_tts:PocketTTSDecoderLayer", "qwen2:Qwen2DecoderLayer", "qwen2_moe:Qwen2MoeDecoderLayer",
    "qwen3:Qwen3DecoderLayer", "qwen3_moe:Qwen3MoeDecoderLayer",
    "qwen3_omni_moe:Qwen3OmniMoeThinkerTextDecoderLayer",
    "qwen3_omni_moe:Qwen3OmniMoeTalkerCodePredictorDecoderLayer",
    "qwen3_omni_moe:Qwen3OmniMoeTalkerDecoderLayer", "qwen3_vl:Qwen3VLTextDecoderLayer",
    "qwen3_vl_moe:Qwen3VLMoeTextDecoderLayer", "seed_oss:SeedOssDecoderLayer",
    "smollm3:SmolLM3DecoderLayer", "solar_open:SolarOpenDecoderLayer",
    "starcoder2:Starcoder2DecoderLayer", "step3p7:Step3p7DecoderLayer",
    "ultrabert:UltrabertDecoderLayer", "unlimited_ocr:UnlimitedOcrTextDecoderLayer",
    "xcodec2:Xcodec2DecoderLayer", "youtu:YoutuDecoderLayer",
)
# Layers whose forward, attention, self-output and output are BERT's code (transformers 5.24).
BERT_LIKE = (
    "bert:BertLayer", "bert_generation:BertGenerationLayer", "camembert:CamembertLayer",
    "data2vec_text:Data2VecTextLayer", "electra:ElectraLayer", "ernie:ErnieLayer",
    "roberta:RobertaLayer", "roc_bert:RoCBertLayer", "xlm_roberta:XLMRobertaLayer",
)


def _hf(spec: str) -> tuple[str, str]:
    model, cls = spec.split(":")
    return f"transformers.models.{model}.modeling_{model}", cls


for _spec in ("gpt2:GPT2Block", "decision_transformer:DecisionTransformerGPT2Block"):
    register_adapter(*_hf(_spec), _hf_gpt2_block)
for _spec in LLAMA_LIKE:
    register_adapter(*_hf(_spec), _hf_llama_layer)
for _spec in BERT_LIKE:
    register_adapter(*_hf(_spec), _hf_bert_layer)

_VIT = "timm.models.vision_transformer"
register_adapter(_VIT, "Block", _timm_vit_block)
register_adapter(_VIT, "ResPostBlock", _timm_res_post_block)
register_adapter(_VIT, "ParallelThingsBlock", _timm_parallel_things_block)
register_adapter(_VIT, "ParallelScalingBlock", _timm_parallel_scaling_block)
register_adapter("timm.models.convnext", "ConvNeXtBlock", _timm_convnext_block)
