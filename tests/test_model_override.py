"""--json-model-override-args: parsing (a bad value stops `nl serve` at start, naming the flag),
SGLang's merge rules, and the engine on a tiny Llama whose config is overridden, compared with
transformers loading a config.json edited the same way (logits, and the context length the
overridden max_position_embeddings gives)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from nlcli.engine.args import ServerArgs
from nlcli.engine.configs.config_overrides import apply_config_overrides, parse_model_overrides
from tests.tiny_models import EngineDriver, make_runner

OVERRIDES = {"rope_parameters": {"rope_theta": 321.0}, "rms_norm_eps": 0.25,
             "max_position_embeddings": 96}
PROMPT = [1, 504, 3575, 282, 4649, 314, 9690, 198, 42]


@pytest.mark.parametrize("text,what", [("{bad", "is not valid JSON"), ("[1, 2]", "got list"),
                                       ("3", "got int"), ('"x"', "got str")])
def test_bad_values_are_refused_naming_the_flag(text, what):
    with pytest.raises(ValueError, match="--json-model-override-args") as e:
        parse_model_overrides(text)
    assert what in str(e.value)
    assert parse_model_overrides("{}") == {} and parse_model_overrides('{"a": 1}') == {"a": 1}


def test_launch_stops_with_the_message(capfd):
    from nlcli.engine.launch import launch_server

    assert launch_server(ServerArgs(json_model_override_args="[1]")) == 1
    assert "--json-model-override-args must be a JSON object" in capfd.readouterr().err


def test_merge_rules_are_sglangs():
    import transformers

    cfg = transformers.LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    apply_config_overrides(cfg, {"rope_parameters": {"rope_theta": 5.0}, "hidden_act": "gelu"})
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 5.0}  # merged, not replaced
    assert cfg.hidden_act == "gelu"
    llava = transformers.LlavaConfig()
    vocab = llava.text_config.vocab_size
    apply_config_overrides(llava, {"text_config": {"rms_norm_eps": 0.5}})
    assert isinstance(llava.text_config, transformers.PretrainedConfig)  # updated in place
    assert llava.text_config.rms_norm_eps == 0.5 and llava.text_config.vocab_size == vocab


@pytest.fixture(scope="module")
def edited(tiny_model_dir, tmp_path_factory):
    """(original dir, a copy whose config.json carries OVERRIDES)."""
    src = tiny_model_dir("llama")
    dst = str(tmp_path_factory.mktemp("override"))
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["rope_parameters"] = {**cfg["rope_parameters"], **OVERRIDES["rope_parameters"]}
    cfg.update({k: v for k, v in OVERRIDES.items() if k != "rope_parameters"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return src, dst


def _hf_logits(path: str) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].float()


def test_engine_matches_transformers_on_the_overridden_config(edited):
    src, dst = edited
    runner = make_runner(src, json_model_override_args=json.dumps(OVERRIDES))
    assert runner.model_config.context_len == 96  # from the overridden max_position_embeddings
    driver = EngineDriver(runner)
    rid = driver.new_request()
    got = driver.forward([rid], [PROMPT], return_all_logits=True).all_logits.float()
    driver.free_all()
    want, plain = _hf_logits(dst), _hf_logits(src)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert float((plain - want).abs().max() / want.abs().max()) > 1e-2  # the override mattered
