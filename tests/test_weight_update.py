"""Hot weight updates on a live ModelRunner (tiny random Llama, float32): a perturbed copy changes
the output exactly as a fresh load of that copy would, updating back restores bit-identical logits,
and every refused update (shape mismatch, missing path or tensors, other architecture, path outside
--weights-root, Hub id without --allow-remote-weights, failed copy) leaves the weights untouched
and answers with SGLang's exact message."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nlcli.engine.model_loader.weight_update import update_weights_from_disk
from tests.tiny_models import (
    EngineDriver,
    copy_model_with,
    make_runner,
    perturbed_copy,
    tiny_config,
)

PROMPTS = [[5, 17, 301, 44, 9, 1200, 77], [400, 3, 3, 81]]
ROLLBACK = "\nRolling back to original weights."


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama")
    perturbed = perturbed_copy(base, str(tmp_path_factory.mktemp("perturbed")))
    return {"base": base, "perturbed": perturbed}


@pytest.fixture(scope="module")
def live(dirs):
    return make_runner(dirs["base"])


@pytest.fixture
def runner(live, dirs):
    """The module's runner, put back on the base weights after each test."""
    yield live
    if live.server_args.model_path != dirs["base"]:
        assert update_weights_from_disk(live, dirs["base"]).success


def logits_of(runner) -> torch.Tensor:
    driver = EngineDriver(runner)
    rids = [driver.new_request() for _ in PROMPTS]
    try:
        return driver.forward(rids, PROMPTS, return_all_logits=True).all_logits.clone()
    finally:
        driver.free_all()


def greedy(runner) -> list[list[int]]:
    return EngineDriver(runner).generate_greedy(PROMPTS, 6)


def _assert_refused(runner, path, expected_message, **kw):
    before, model_path = logits_of(runner), runner.server_args.model_path
    success, message = update_weights_from_disk(runner, path, **kw)
    assert not success
    assert message == expected_message
    assert runner.server_args.model_path == model_path
    assert torch.equal(logits_of(runner), before)


def test_update_to_perturbed_copy_and_back(runner, dirs):
    base_logits, base_tokens = logits_of(runner), greedy(runner)
    assert tuple(update_weights_from_disk(runner, dirs["perturbed"])) == (True, "Succeeded to update model weights.")
    assert runner.server_args.model_path == dirs["perturbed"]
    # The reference: a server started on the perturbed copy.
    fresh = make_runner(dirs["perturbed"])
    assert torch.equal(logits_of(runner), logits_of(fresh))
    assert greedy(runner) == greedy(fresh) != base_tokens

    assert update_weights_from_disk(runner, dirs["base"]).success
    assert runner.server_args.model_path == dirs["base"]
    assert torch.equal(logits_of(runner), base_logits)
    assert greedy(runner) == base_tokens


def _tensor_shapes(path: str) -> list[tuple[str, tuple]]:
    with safe_open(path, framework="pt") as f:
        return [(n, tuple(f.get_slice(n).get_shape())) for n in f.keys()]


@pytest.mark.parametrize("field, size", [("intermediate_size", 96), ("intermediate_size", 256), ("hidden_size", 96)])
def test_size_mismatch_is_refused_with_torch_wording(runner, dirs, tmp_path, field, size):
    import transformers

    base_cfg = transformers.AutoConfig.from_pretrained(dirs["base"])
    cfg = tiny_config("llama", base_cfg.vocab_size)
    setattr(cfg, field, size)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    # The first tensor (in checkpoint order) whose shape differs decides the message, in the
    # words torch's copy_ uses for "live parameter (a) <- checkpoint tensor (b)".
    old = dict(_tensor_shapes(os.path.join(dirs["base"], "model.safetensors")))
    name, new_shape = next((n, s) for n, s in _tensor_shapes(str(tmp_path / "model.safetensors")) if s != old[n])
    with pytest.raises(RuntimeError) as torch_err:
        torch.empty(old[name]).copy_(torch.empty(new_shape))
    expected = f"Failed to update weights: {torch_err.value}.{ROLLBACK}"
    # The spec's own form, with this change's real sizes.
    assert expected == (
        f"Failed to update weights: The size of tensor a ({getattr(base_cfg, field)}) must match the "
        f"size of tensor b ({size}) at non-singleton dimension 1.{ROLLBACK}"
    )
    _assert_refused(runner, str(tmp_path), expected)


def test_missing_path_is_refused(runner, tmp_path):
    path = str(tmp_path / "no-such-checkpoint")
    _assert_refused(runner, path, f"Failed to get weights iterator: {path} does not exist.")


def test_missing_tensor_is_refused_and_named(runner, dirs, tmp_path):
    dropped = "model.layers.1.mlp.up_proj.weight"
    path = copy_model_with(dirs["perturbed"], str(tmp_path / "partial"), lambda n, t: None if n == dropped else t)
    # up_proj is half of our fused gate_up_proj, which gate_proj alone would mark as loaded.
    _assert_refused(runner, path, f"Failed to update weights: the checkpoint lacks 1 weight(s): {dropped}.{ROLLBACK}")


def test_other_architecture_is_refused(runner, tiny_model_dir):
    _, message = update_weights_from_disk(runner, tiny_model_dir("qwen2"))
    assert message.startswith("Failed to update weights: ") and "Qwen2ForCausalLM" in message
    _assert_refused(runner, tiny_model_dir("qwen2"), message)


def test_same_shapes_other_head_count_is_refused(runner, dirs, tmp_path):
    path = copy_model_with(dirs["perturbed"], str(tmp_path / "heads"), lambda n, t: t)
    cfg = json.load(open(os.path.join(path, "config.json")))
    # 2 heads of 32 instead of 4 of 16: every shape equal, the attention math different.
    cfg.update(num_attention_heads=cfg["num_attention_heads"] // 2, num_key_value_heads=1, head_dim=32)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    _, message = update_weights_from_disk(runner, path)
    assert message.startswith("Failed to update weights: ") and "num_attention_heads" in message
    _assert_refused(runner, path, message)


def test_weights_root_confines_paths(runner, dirs, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(dirs["perturbed"], root / "ckpt")
    shutil.copytree(dirs["perturbed"], outside)
    os.symlink(outside, root / "link-out")
    (root / "file-link").mkdir()
    for name in os.listdir(root / "ckpt"):
        target = outside / name if name == "model.safetensors" else root / "ckpt" / name
        os.symlink(target, root / "file-link" / name)
    args = runner.server_args.replace(weights_root=str(root))
    for path in (str(root / ".." / "outside"), "../outside", str(root / "link-out"), str(root / "file-link")):
        _assert_refused(runner, path, f"Failed to get weights iterator: {path} is outside --weights-root.",
                        server_args=args)
    # Relative paths are taken under the root; inside it, the update goes through.
    assert update_weights_from_disk(runner, "ckpt", server_args=args).success
    assert runner.server_args.model_path == "ckpt"


def test_hub_ids_need_allow_remote_weights(runner):
    _assert_refused(runner, "no-such-org/no-such-model",
                    "Failed to get weights iterator: no-such-org/no-such-model does not exist locally; "
                    "Hub repo ids need --allow-remote-weights.")


def test_unsupported_load_format_and_pickles_are_refused(runner, dirs, tmp_path):
    _, message = update_weights_from_disk(runner, dirs["perturbed"], load_format="pt")
    assert message.startswith("Failed to get model loader: ")
    pickle = tmp_path / "pytorch_model.bin"
    torch.save({"x": torch.zeros(1)}, pickle)
    _, message = update_weights_from_disk(runner, str(pickle))
    assert message.startswith("Failed to get weights iterator: ") and "pickled" in message


def test_single_safetensors_file_is_accepted(runner, dirs, tmp_path):
    reference = make_runner(dirs["perturbed"])
    lone = tmp_path / "weights.safetensors"  # no config.json beside it: names and shapes decide
    shutil.copy(os.path.join(dirs["perturbed"], "model.safetensors"), lone)
    assert update_weights_from_disk(runner, str(lone)).success
    assert torch.equal(logits_of(runner), logits_of(reference))


def _write_gguf(hf_dir: str, path: str) -> None:
    """F32 GGUF of an HF Llama checkpoint, laid out as llama.cpp's converter does (q/k rows
    permuted for its rotary layout), so the update exercises the GGUF reader's inverse."""
    import gguf

    from nlcli.engine.model_loader.gguf import hf_name

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(cfg["num_hidden_layers"]):
        names |= {f"blk.{i}.{p}.weight" for p in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    for name in sorted(names):
        w = tensors[hf_name(name)].numpy()
        if ".attn_q." in name or ".attn_k." in name:
            n = n_head if ".attn_q." in name else n_kv
            w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        writer.add_tensor(name, w.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_is_accepted(runner, dirs, tmp_path):
    reference = make_runner(dirs["perturbed"])
    path = str(tmp_path / "perturbed.gguf")
    _write_gguf(dirs["perturbed"], path)
    assert tuple(update_weights_from_disk(runner, path)) == (True, "Succeeded to update model weights.")
    assert runner.server_args.model_path == path
    assert torch.equal(logits_of(runner), logits_of(reference))


def test_failed_copy_restores_the_original_weights(runner, dirs, monkeypatch):
    before = logits_of(runner)
    real_load = type(runner.model).load_weights

    calls = []

    def half_then_fail(self, weights):
        calls.append(1)
        if len(calls) > 1:  # the restore from the original checkpoint
            return real_load(self, weights)
        weights = list(weights)
        real_load(self, weights[: len(weights) // 2])
        raise RuntimeError("device lost mid-copy")

    # Only the live model's first copy fails; validation on the meta twin uses the class's method.
    monkeypatch.setattr(runner.model, "load_weights", half_then_fail.__get__(runner.model))
    success, message = update_weights_from_disk(runner, dirs["perturbed"])
    monkeypatch.undo()
    assert (success, message) == (False, f"Failed to update weights: device lost mid-copy.{ROLLBACK}")
    assert len(calls) == 2 and runner.server_args.model_path == dirs["base"]
    assert torch.equal(logits_of(runner), before)
