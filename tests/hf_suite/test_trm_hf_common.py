"""transformers' own common model + generation tests, run against TRMForCausalLM.

The upstream mixins (ModelTesterMixin from tests/test_modeling_common.py, GenerationTesterMixin from
tests/generation/test_utils.py) are NOT part of this project: lay them out first with

    python tests/hf_suite/layout_upstream.py --upstream-repo DIR     # DIR: a huggingface/transformers checkout
    python -m pytest tests/hf_suite -p no:cacheprovider

Without that layout this module skips itself, so the project's normal test run is unaffected.
Written in the style of transformers' tests/models/llama/test_modeling_llama.py (a ModelTester that
builds a tiny config + inputs, and a unittest.TestCase mixing in the upstream testers), with two configs:

  A  ACT off: halt_threshold=None, every token runs every supervision step.
  B  ACT on:  halt_threshold=0.5 and a halt head with std-2 random weights (zero bias), so that some
     tokens halt after the first supervision step and others do not.
"""

import sys
import unittest
from pathlib import Path

import pytest

UPSTREAM_ROOT = Path(__file__).resolve().parents[2] / "build" / "hf-upstream"
LAYOUT_COMMAND = "python tests/hf_suite/layout_upstream.py --upstream-repo DIR"

if not (UPSTREAM_ROOT / "tests" / "test_modeling_common.py").is_file():
    pytest.skip(f"upstream transformers common tests are not laid out in {UPSTREAM_ROOT}: run `{LAYOUT_COMMAND}` "
                "(DIR = a huggingface/transformers checkout) first", allow_module_level=True)
if str(UPSTREAM_ROOT) not in sys.path:  # conftest.py normally did this already
    sys.path.insert(0, str(UPSTREAM_ROOT))

import torch  # noqa: E402
from tests.generation.test_utils import GenerationTesterMixin  # noqa: E402  (upstream, laid out)
from tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402
from transformers import GenerationMixin  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES  # noqa: E402
from transformers.testing_utils import torch_device  # noqa: E402

from trm_lm import TRMConfig, TRMForCausalLM  # noqa: E402
from trm_lm.modeling_trm import TRMModel  # noqa: E402

SKIP_NUM_LAYERS = ("TRM's num_hidden_layers counts virtual layers: N_sup*T*(n+1)*net_layers block applications "
                   "of ONE shared network")
SKIP_INIT_BUFFERS = "y_init/z_init are fixed random buffers drawn at init, as in the official TRM code"
SKIP_RETAIN_GRAD = ("the first T-1 cycles of every supervision step run under no_grad (the paper's 1-step gradient), "
                    "so their hidden states and attention weights are not on the graph and cannot retain grad")


def make_halting_mixed(model, seed=1):
    """Halt head with std-2 random weights and zero bias: halts some positions after step 1, not others."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = model.model.core.halt_head
        if head.weight.device.type == "meta":
            return
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 2.0)
        head.bias.fill_(0.0)


class TRMForCausalLMHaltMixed(TRMForCausalLM, GenerationMixin):  # GenerationMixin listed: test_inherits_generation_mixin
    """TRMForCausalLM whose freshly built halt head halts some tokens and not others (config B).

    Only fresh construction is affected: from_pretrained loads the saved head over this."""

    def post_init(self):
        super().post_init()
        make_halting_mixed(self)


class TRMModelTester:
    def __init__(self, parent, batch_size=13, seq_length=7, is_training=True, use_input_mask=True,
                 use_labels=True, vocab_size=99, hidden_size=32, num_attention_heads=2, net_layers=2,
                 latent_steps=1, cycles=2, supervision_steps=2, halt_threshold=None, max_position_embeddings=512,
                 pad_token_id=0, scope=None):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.net_layers = net_layers
        self.latent_steps = latent_steps
        self.cycles = cycles
        self.supervision_steps = supervision_steps
        self.halt_threshold = halt_threshold
        self.max_position_embeddings = max_position_embeddings
        self.pad_token_id = pad_token_id
        self.scope = scope
        # derived by TRMConfig (never passed): 2 * 2 * (1 + 1) * 2 = 16 virtual layers
        self.num_hidden_layers = supervision_steps * cycles * (latent_steps + 1) * net_layers

    def get_config(self):
        return TRMConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                         num_attention_heads=self.num_attention_heads, net_layers=self.net_layers,
                         latent_steps=self.latent_steps, cycles=self.cycles,
                         supervision_steps=self.supervision_steps, halt_threshold=self.halt_threshold,
                         max_position_embeddings=self.max_position_embeddings, pad_token_id=self.pad_token_id)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size) if self.use_labels else None
        config = self.get_config()
        self.parent.assertEqual(config.num_hidden_layers, self.num_hidden_layers)
        return config, input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, model_class=TRMForCausalLM):
        model = model_class(config).to(torch_device).eval()
        with torch.no_grad():
            out = model(input_ids, attention_mask=input_mask)
        self.parent.assertEqual(out.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        return out


class _TRMCommonTests(ModelTesterMixin, GenerationTesterMixin):
    """Shared body of the two configurations (not collected itself: not a TestCase)."""

    test_pruning = False
    test_head_masking = False
    test_missing_keys = False
    fx_compatible = False
    halt_threshold = None

    def setUp(self):
        self.model_tester = TRMModelTester(self, halt_threshold=self.halt_threshold)
        # An in-tree model is listed in transformers' static auto-mapping name tables; the upstream tests read
        # those to add labels (_prepare_for_class), to leave base models out of training tests, and to find the
        # base model for the RoPE tests. List TRM there for the duration of each test only.
        for table, name in ((MODEL_MAPPING_NAMES, "TRMModel"),
                            (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, self.all_model_classes[-1].__name__)):
            key = f"trm_lm_hf_suite_{name}"
            table[key] = name
            self.addCleanup(table.pop, key, None)

    def test_model(self):
        config, input_ids, input_mask, _ = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_model(config, input_ids, input_mask, self.all_model_classes[-1])

    @unittest.skip(reason=SKIP_NUM_LAYERS)
    def test_num_layers_is_small(self):
        pass

    @unittest.skip(reason=SKIP_INIT_BUFFERS)
    def test_init_weights_can_init_buffers(self):
        pass

    @unittest.skip(reason=SKIP_RETAIN_GRAD)
    def test_retain_grad_hidden_states_attentions(self):
        pass


class TRMActOffHFCommonTest(_TRMCommonTests, unittest.TestCase):
    """Config A: ACT off (halt_threshold None)."""

    all_model_classes = (TRMModel, TRMForCausalLM)
    halt_threshold = None


class TRMActOnHFCommonTest(_TRMCommonTests, unittest.TestCase):
    """Config B: ACT on (halt_threshold 0.5, halt head that halts some tokens and not others)."""

    all_model_classes = (TRMForCausalLMHaltMixed,)
    halt_threshold = 0.5

    def test_halting_is_mixed(self):
        """Guard for config B itself: the tiny model really halts some positions early and not others."""
        config, input_ids, input_mask, _ = self.model_tester.prepare_config_and_inputs()
        model = TRMForCausalLMHaltMixed(config).to(torch_device).eval()
        with torch.no_grad():
            steps = model(input_ids, attention_mask=input_mask).steps_used
        self.assertIsNotNone(steps)
        self.assertTrue(bool((steps < config.supervision_steps).any()), f"no token halted early: {steps}")
        self.assertTrue(bool((steps == config.supervision_steps).any()), f"every token halted early: {steps}")
