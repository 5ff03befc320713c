"""TRMConfig / AutoConfig loading against bad values and files that are not configs: ValueErrors that name
the field, or transformers' own errors that name the file.
"""

import json
import math
import re

import pytest
from transformers import AutoConfig

from trm_lm import TRMConfig


# ----------------------------------------------------------------------------------------------------
# config loading


def config_dict(**overrides) -> dict:
    values = dict(vocab_size=61, hidden_size=32, num_attention_heads=2, net_layers=1, latent_steps=1, cycles=1,
                  supervision_steps=1, max_position_embeddings=16)
    return {**values, **overrides}


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size="32"), "TRMConfig.hidden_size must be a positive integer, got '32'"),
    (dict(vocab_size=61.0), "TRMConfig.vocab_size must be a positive integer, got 61.0"),
    (dict(vocab_size=None), "TRMConfig.vocab_size must be a positive integer, got None"),
    (dict(max_position_embeddings=-16), "TRMConfig.max_position_embeddings must be a positive integer"),
    (dict(cycles=True), "TRMConfig.cycles must be a positive integer, got True"),
    (dict(num_attention_heads=0), "TRMConfig.num_attention_heads must be a positive integer, got 0"),
    (dict(hidden_size=32, num_attention_heads=3), "must be divisible by num_attention_heads (3)"),
    (dict(hidden_size=6, num_attention_heads=2), "rotary position encoding needs an even head_dim, got 3"),
    (dict(intermediate_size=64.5), "TRMConfig.intermediate_size must be a positive integer or None"),
    (dict(norm_position="Post"), "TRMConfig.norm_position must be one of ('post', 'pre'), got 'Post'"),
    (dict(mixer=["attention"]), "TRMConfig.mixer must be one of ('attention', 'mlp')"),
    (dict(position_encoding="alibi"), "TRMConfig.position_encoding must be one of"),
    (dict(halt_threshold=math.nan), "TRMConfig.halt_threshold must be in (0, 1], or 0 / None = off, got nan"),
    (dict(halt_threshold=1.5), "TRMConfig.halt_threshold must be in (0, 1], or 0 / None = off, got 1.5"),
    (dict(embedding_dropout=1.0), "TRMConfig.embedding_dropout must be in [0, 1)"),
    (dict(halt_loss_weight=-1.0), "TRMConfig.halt_loss_weight must be >= 0"),
    pytest.param(dict(halt_threshold="abc"), "halt_threshold", id="halt_threshold-str"),
    pytest.param(dict(halt_threshold="0.5"), "halt_threshold", id="halt_threshold-numeric-str"),
    pytest.param(dict(embedding_dropout="0.1"), "embedding_dropout", id="embedding_dropout-str"),
    pytest.param(dict(embedding_dropout=None), "embedding_dropout", id="embedding_dropout-None"),
    pytest.param(dict(halt_loss_weight="x"), "halt_loss_weight", id="halt_loss_weight-str"),
    pytest.param(dict(halt_loss_weight=math.nan), "halt_loss_weight", id="halt_loss_weight-nan"),
    pytest.param(dict(rope_theta="big"), "rope_theta", id="rope_theta-str"),
    pytest.param(dict(rope_theta=-1.0), "rope_theta", id="rope_theta-negative"),
    pytest.param(dict(rms_norm_eps=-1.0), "rms_norm_eps", id="rms_norm_eps-negative"),
    pytest.param(dict(initializer_range=-0.1), "initializer_range", id="initializer_range-negative"),
    pytest.param(dict(pad_token_id=61), "pad_token_id", id="pad_token_id-out-of-vocab"),
    pytest.param(dict(bos_token_id="x"), "bos_token_id", id="bos_token_id-str"),
    pytest.param(dict(tie_word_embeddings="no"), "tie_word_embeddings", id="tie_word_embeddings-str"),
    pytest.param(dict(causal="yes"), "causal", id="causal-str"),
])
def test_config_from_dict_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError) as raised:
        TRMConfig.from_dict(config_dict(**overrides))
    assert message in str(raised.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size="32"), "TRMConfig.hidden_size must be a positive integer"),
    (dict(latent_steps=0), "TRMConfig.latent_steps must be a positive integer, got 0"),
    (dict(input_injection="multiply"), "TRMConfig.input_injection must be one of"),
])
def test_auto_config_from_pretrained_rejects_bad_values(tmp_path, overrides, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "trm_lm", **config_dict(**overrides)}))
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '"trm_lm"'])
def test_auto_config_from_pretrained_on_non_config_json(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises((OSError, ValueError)) as raised:  # transformers' own errors, both name the folder or file
        AutoConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(raised.value)


