"""Adaptation methods on tiny encoder and decoder LMs: they learn, touch only their own tensors, round-trip, export, serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from fsserve.config import PromptConfig, TrainingArguments
from fsserve.data import Example
from fsserve.exporters import onnx as ox
from fsserve.methods import MethodConfig, adapt
from fsserve.methods.probe import pool
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor
from fsserve.training import Trainer
from test_training import toy_examples

PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)
TEXTS = ["the film was wonderful", "what a dreadful mess of a movie, far too long", "Great!", "boring"]
METHODS = ("probe", "prompt-tuning", "prefix-tuning", "lora")
CONFIGS = {
    "probe": {"pooling": "mean"},
    "prompt-tuning": {"num_virtual_tokens": 4},
    "prefix-tuning": {"num_virtual_tokens": 4, "prefix_hidden": 17},
    "lora": {"lora_r": 4, "lora_dropout": 0.0},
}
RATES = {"probe": 3e-2, "prompt-tuning": 3e-2, "prefix-tuning": 2e-2, "lora": 2e-2}
TRAIN = toy_examples(32, seed=1)
# Attention in a random 2-layer LM barely routes the polar word to the answer position, so a few soft
# tokens in front cannot learn the polarity task there (on the real LM they do: docs/methods.md). Their
# toy task is the one a soft prompt can learn in front of any LM: steer the answer to one label word.
TOY = {method: TRAIN for method in METHODS} | {"prompt-tuning": [Example(ex.text, label="1") for ex in TRAIN]}


def _mean_loss(model: PromptModel, examples: list[Any]) -> float:
    """Cross-entropy over a whole set, in eval mode (no dropout): a steadier signal than batch losses."""
    targets = torch.tensor([int(ex.label) for ex in examples])
    return float(F.cross_entropy(model.predict_logits(examples), targets))


@pytest.fixture(scope="module")
def trained(tiny_lm: Any) -> Any:
    """Factory: (model, LM tensors before training, loss before, loss after) per (arch, method), trained once."""
    cache: dict[tuple[str, str], Any] = {}

    def build(arch: str, method: str) -> Any:
        if (arch, method) not in cache:
            lm, tokenizer = tiny_lm(arch)
            torch.manual_seed(0)
            model = adapt(lm, tokenizer, PROMPT, method, config=CONFIGS[method])
            frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not model.is_method_parameter(n)}
            own = {n: p.detach().clone() for n, p in model.method_state().items()}
            before = _mean_loss(model, TOY[method])
            args = TrainingArguments(method=method, learning_rate=RATES[method], max_steps=40, eval_steps=100, progress=False, seed=7)
            result = Trainer(model, args, TOY[method]).train()
            cache[(arch, method)] = (model, frozen, own, before, _mean_loss(model, TOY[method]), result)
        return cache[(arch, method)]

    return build


@pytest.mark.parametrize("arch", ["bert", "gemma"])
@pytest.mark.parametrize("method", METHODS)
def test_method_learns_and_changes_only_its_own_tensors(trained: Any, arch: str, method: str) -> None:
    model, frozen, own, before, after, result = trained(arch, method)
    # In the tiny random BERT the answer state hardly depends on the other tokens (attention outputs are
    # small against the residual), so extra keys and soft tokens barely move it: there we ask only that
    # the loss falls; on the tiny Gemma and on the real model (docs/methods.md) they learn properly.
    factor = 1.0 if arch == "bert" and method in ("prompt-tuning", "prefix-tuning") else 0.95
    assert after < factor * before, f"{method} on {arch}: loss {before:.4f} -> {after:.4f}"
    assert result.trainable_parameters == model.trainable_parameters() > 0
    params = dict(model.named_parameters())
    assert set(frozen) | set(own) == set(params)
    for name, tensor in frozen.items():  # the LM, and a label-word head's rows of it, byte for byte
        assert torch.equal(params[name], tensor), f"{name} changed but belongs to the frozen LM"
        assert not params[name].requires_grad
    assert any(not torch.equal(params[name], tensor) for name, tensor in own.items())
    assert sum(p.numel() for p in own.values()) < 0.05 * sum(p.numel() for p in frozen.values())


# Every method on the encoder; on the decoder LoRA, whose saved base must lose PEFT's wrappers and keep Gemma's tied embedding.
@pytest.mark.parametrize(("arch", "method"), [("bert", m) for m in METHODS] + [("gemma", "lora")])
def test_save_load_round_trip(trained: Any, tmp_path: Path, arch: str, method: str) -> None:
    model = trained(arch, method)[0]
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "method.safetensors").is_file()
    loaded = PromptModel.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.metadata()["method"] == method
    assert loaded.method_config == model.method_config
    torch.testing.assert_close(loaded.predict_logits(TEXTS), model.predict_logits(TEXTS), atol=1e-6, rtol=0)
    # The saved LM is the untouched base: plain HF names, no adapter tensors.
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "m" / "lm").glob("*.safetensors"))), "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k]


EXPORTS = [("bert", "probe"), ("bert", "prefix-tuning"), ("gemma", "prompt-tuning"), ("gemma", "lora")]


@pytest.mark.parametrize(("arch", "method"), EXPORTS)
def test_export_matches_torch_and_serves_through_the_predictor(trained: Any, tmp_path: Path, arch: str, method: str) -> None:
    model = trained(arch, method)[0].eval()
    bundle = model.export(tmp_path / "bundle", torch_weights=False, validate=False, optimize=False)
    sess = ox.session(bundle / "model.onnx")
    for case in ox.shape_grid(model, batch_sizes=(1, 3), lengths=(6, 23)):  # both padding sides
        expected = ox.torch_label_logits(model, case.batch)  # for LoRA: the unmerged model
        np.testing.assert_allclose(sess.run(None, case.batch)[0], expected, atol=1e-4, rtol=0, err_msg=case.label)
    graph = onnx.load(str(bundle / "model.onnx"))
    assert [i.name for i in graph.graph.input][:3] == ["input_ids", "attention_mask", "answer_pos"]
    (output,) = graph.graph.output
    assert output.name == "label_logits"
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch_size", 2]
    names = [i.name for i in graph.graph.initializer] + [n.name for n in graph.graph.node]
    assert not [n for n in names if "lora" in n.lower()]  # merged: no adapter ops at run time
    served = Predictor.from_pretrained(bundle, backend="onnx").predict_proba(TEXTS)
    np.testing.assert_allclose(served, Predictor.from_model(model).predict_proba(TEXTS), atol=1e-5)


def test_prefix_export_holds_the_prefixes_not_the_mlp(trained: Any, tmp_path: Path) -> None:
    model = trained("bert", "prefix-tuning")[0].eval()
    bundle = model.export(tmp_path / "bundle", torch_weights=False, validate=False, optimize=False)
    shapes = [list(i.dims) for i in onnx.load(str(bundle / "model.onnx")).graph.initializer]
    assert not [s for s in shapes if 17 in s], "the reparameterisation MLP (width 17) leaked into the graph"
    model.train()
    torch.testing.assert_close(model.prefixes(), model.eval().prefixes())  # the folded constant is the MLP's output


def test_lora_merged_graph_is_the_base_graph(tiny_lm: Any, tmp_path: Path) -> None:
    lm, tok = tiny_lm("bert")
    plain = PromptModel(lm, tok, PROMPT)
    lora = adapt(*tiny_lm("bert"), PROMPT, "lora")
    merged = lora.merged()
    assert type(merged.lm) is type(plain.lm)
    assert sorted(merged.lm.state_dict()) == sorted(plain.lm.state_dict())
    assert not [n for n, _ in lora.lm.named_parameters() if "lora_" in n and _.requires_grad is False]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_reads_only_real_tokens_on_either_padding_side(side: str) -> None:
    states = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    if side == "left":
        mask = mask.flip(-1)
    real = [torch.nonzero(m).flatten() for m in mask]
    for pooling, expect in (("cls", lambda r, i: states[i, r[0]]), ("last", lambda r, i: states[i, r[-1]]), ("mean", lambda r, i: states[i, r].mean(0))):
        got = pool(states, mask, pooling)
        for i, r in enumerate(real):
            torch.testing.assert_close(got[i], expect(r, i), msg=f"{pooling} {side}")


def test_probe_layer_and_pooling_choices(tiny_lm: Any) -> None:
    encoder = adapt(*tiny_lm("bert"), PROMPT, "probe")
    decoder = adapt(*tiny_lm("gemma"), PROMPT, "probe", config={"layer": 1})
    assert (encoder.pooling, encoder.layer, decoder.pooling, decoder.layer) == ("cls", 2, "last", 1)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        adapt(*tiny_lm("bert"), PROMPT, "probe", config={"layer": 7})
    batch = encoder.collate(encoder.encode(TEXTS))
    states = encoder.layer_states(batch["input_ids"], batch["attention_mask"])
    assert len(states) == 3 and torch.equal(states[-1], encoder.hidden_states(batch["input_ids"], batch["attention_mask"]))


def test_probe_layers_report_and_best_layer(tiny_lm: Any) -> None:
    from fsserve.methods.probe_layers import LayerScore, best_layer, probe_layers

    model = adapt(*tiny_lm("bert"), PROMPT, "probe", config={"pooling": "mean"})
    args = TrainingArguments(method="probe", learning_rate=3e-2, max_steps=30, eval_steps=10, progress=False)
    scores = probe_layers(model, TRAIN, toy_examples(16, seed=3), args, test=toy_examples(16, seed=4))
    assert [s.layer for s in scores] == [0, 1, 2] and all(0 <= s.dev <= 1 and 0 <= s.test <= 1 for s in scores)
    assert best_layer([LayerScore(0, 0.7, 0.1), LayerScore(1, 0.9, 0.0), LayerScore(2, 0.9, 0.0)]) == 2


def test_bad_method_settings_are_refused(tiny_lm: Any) -> None:
    with pytest.raises(ValueError, match="pooling must be one of"):
        MethodConfig(pooling="max")
    with pytest.raises(ValueError, match="bad method option"):
        MethodConfig.from_options(["rank=4"])
    assert MethodConfig.from_options(["lora_r=4", "head=classifier"]).lora_r == 4
    with pytest.raises(ValueError, match="label-word head"):
        adapt(*tiny_lm("bert"), PROMPT, "lora", config={"head": "classifier"})
    with pytest.raises(ValueError, match="virtual tokens exceeds"):
        adapt(*tiny_lm("bert"), PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=250), "prompt-tuning")
    lm, tok = tiny_lm("bert")
    with pytest.raises(ValueError, match="built for 'prompt'"):
        Trainer(PromptModel(lm, tok, PROMPT), TrainingArguments(method="lora"), TRAIN)
    with pytest.raises(ValueError, match="built for 'probe'"):
        Trainer(adapt(lm, tok, PROMPT, "probe"), TrainingArguments(method="prompt"), TRAIN)


def test_from_pretrained_builds_each_method(tiny_lm_dir: Any) -> None:
    model = PromptModel.from_pretrained(tiny_lm_dir("gpt2"), prompt=PROMPT, method="prefix-tuning", method_config={"num_virtual_tokens": 3})
    assert model.adaptation == "prefix-tuning" and model.eval().prefixes().shape == (2, 2, 2, 3, 16)
    assert model.predict_logits(TEXTS).shape == (len(TEXTS), 2)


def test_cli_parsers_and_method_specs() -> None:
    import argparse

    from fsserve.cli.methods import add_methods_parsers
    from fsserve.methods.compare import MethodRow, format_table, parse_spec

    parser = argparse.ArgumentParser()
    add_methods_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--task", "SST-2", "--methods", "zero-shot/probe:layer=best,pooling=mean lora", "--lr", "lora=1e-4"])
    assert args.model == "embedded" and args.func.__name__ == "cmd_compare"
    assert parse_spec("probe:layer=best,pooling=mean") == ("probe", ["layer=best", "pooling=mean"])
    with pytest.raises(ValueError, match="unknown method"):
        parse_spec("adapters")
    with pytest.raises(ValueError, match="takes no options"):
        parse_spec("prompt:layer=3")
    table = format_table([MethodRow("lora", 1234, None, 0.81, 12.0, 5e-4)])
    assert "| lora | 1,234 | n/a | 0.8100 | 12 | 0.0005 |" in table
    assert parser.parse_args(["probe-layers", "tiny", "--task", "SST-2", "--method-option", "pooling=mean"]).method_option == ["pooling=mean"]
