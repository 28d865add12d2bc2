"""Sampling parameters through a live `nl serve` on a tiny random Llama (float32).

Stop strings end generation in the engine at the token where they appear (trimmed, or kept with
no_stop_trim); stop_token_ids and a generation_config EOS list report the matched id; seeds give
the same sample alone and inside a concurrent batch (sample i of n uses seed + i); top_k=1 and a
tiny top_p equal greedy; penalties match a transformers greedy loop with the same formulas;
min_new_tokens holds stop ids back; a custom logit processor forces its own request's tokens
only; max_new_tokens 0 only scores. The module ends with the runtime
checks: an idle engine does not burn CPU, and Ctrl-C exits 0 without a traceback.
"""

import asyncio
import json
import os
import random
import signal
import time

import httpx
import pytest
import torch

from tests.test_custom_logit_processor import force_token_str
from tests.test_scheduler_fakes import LiveServer
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow  # one server start per module

EOS_PROMPT = "The generation config lists a second end-of-sequence token"


def hf_greedy(model, ids, n, freq=0.0, pres=0.0, rep=1.0):
    """Greedy decoding with transformers, applying the penalties by their formulas."""
    ids, out = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        if rep != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / rep, vals * rep)
        if out and (freq or pres):
            counts = torch.bincount(torch.tensor(out), minlength=logits.shape[0]).float()
            logits -= counts * freq + (counts > 0).float() * pres
        tok = int(logits.argmax())
        out.append(tok)
        ids.append(tok)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, its reference, and the second EOS id written into generation_config.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model("llama", str(tmp_path_factory.mktemp("tiny_sp")), seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    greedy = hf_greedy(model, tok.encode(EOS_PROMPT), 12)
    j = next(i for i in range(2, 12) if greedy[i] not in greedy[:i] and greedy[i] != 2)
    with open(os.path.join(path, "generation_config.json")) as f:
        gen_cfg = json.load(f)
    gen_cfg["eos_token_id"] = [2, greedy[j]]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen_cfg, f)
    return dict(path=path, model=model, tok=tok, eos_greedy=greedy, eos_index=j)


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    srv = LiveServer(str(tmp_path_factory.mktemp("srv_sp")), [
        "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "8192",
        "--context-length", "512", "--enable-custom-logit-processor"], model_path=setup["path"])
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


def gen(server, body):
    r = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def greedy_ids(server, prompt, n, **sp):
    body = {"text": prompt, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True, **sp}}
    return [e[1] for e in gen(server, body)["meta_info"]["output_token_logprobs"]]


def test_generation_config_eos_list_stops(server, setup):
    out = gen(server, {"text": EOS_PROMPT, "sampling_params": {"temperature": 0,
                                                               "max_new_tokens": 12}})
    j, ref = setup["eos_index"], setup["eos_greedy"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ref[j]}
    assert out["meta_info"]["completion_tokens"] == j + 1
    assert out["text"] == setup["tok"].decode(ref[:j])  # the stop token is trimmed


def test_stop_string_ends_generation_in_the_engine(server, setup):
    tok, prompt = setup["tok"], "Once upon a time"
    ids = greedy_ids(server, prompt, 24)
    full = tok.decode(ids)
    # A stop string spanning several tokens, well inside the output.
    texts = [tok.decode(ids[:m]) for m in range(len(ids) + 1)]
    m = next(m for m in range(6, len(ids)) if len(texts[m]) - len(texts[m - 3]) >= 3
             and "\ufffd" not in texts[m])
    stop = texts[m][len(texts[m - 3]) + 1:]
    first = next(k for k in range(len(ids) + 1) if stop in texts[k])
    sp = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "stop": [stop]}
    out = gen(server, {"text": prompt, "sampling_params": sp})
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "stop", "matched": stop}
    assert meta["completion_tokens"] == first < 24
    assert out["text"] == full[:full.index(stop)]
    kept = gen(server, {"text": prompt, "sampling_params": {**sp, "no_stop_trim": True}})
    assert kept["text"] == full[:full.index(stop) + len(stop)]
    with httpx.stream("POST", server.url + "/generate", timeout=120,
                      json={"text": prompt, "stream": True, "sampling_params": sp}) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert all(stop not in ev["text"] for ev in events)
    assert events[-1]["text"] == out["text"] and events[-1]["meta_info"]["completion_tokens"] == first


def test_stop_token_ids_report_the_matched_id(server, setup):
    ids = greedy_ids(server, "A list of colours:", 16)
    k = next(i for i in range(1, 16) if ids[i] not in ids[:i])
    out = gen(server, {"text": "A list of colours:", "sampling_params": {
        "temperature": 0, "max_new_tokens": 16, "stop_token_ids": [ids[k]]}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert out["meta_info"]["completion_tokens"] == k + 1
    assert out["text"] == setup["tok"].decode(ids[:k])
    # min_new_tokens holds the stop id back until it is reached.
    held = gen(server, {"text": "A list of colours:", "return_logprob": True, "sampling_params": {
        "temperature": 0, "max_new_tokens": 16, "min_new_tokens": k + 2,
        "stop_token_ids": [ids[k]]}})["meta_info"]
    got = [e[1] for e in held["output_token_logprobs"]]
    assert ids[k] not in got[:k + 2] and held["completion_tokens"] >= k + 2


def test_top_k_1_and_tiny_top_p_equal_greedy(server):
    prompt = "Greedy is the same as"
    ref = greedy_ids(server, prompt, 10)
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        body = {"text": prompt, "return_logprob": True, "sampling_params": {
            "temperature": 1.0, "max_new_tokens": 10, "ignore_eos": True, **extra}}
        assert [e[1] for e in gen(server, body)["meta_info"]["output_token_logprobs"]] == ref


# Negative / below-one values reward repeats, so a random model that never repeats shows an effect.
@pytest.mark.parametrize("penalty", [dict(frequency_penalty=-1.5), dict(presence_penalty=-2.0),
                                     dict(repetition_penalty=0.5), dict(frequency_penalty=1.0,
                                                                         repetition_penalty=0.6)])
def test_penalties_match_their_formulas(server, setup, penalty):
    prompt = "repeat repeat repeat repeat"
    ids = setup["tok"].encode(prompt)
    freq, pres = penalty.get("frequency_penalty", 0.0), penalty.get("presence_penalty", 0.0)
    want = hf_greedy(setup["model"], ids, 12, freq, pres, penalty.get("repetition_penalty", 1.0))
    assert want != hf_greedy(setup["model"], ids, 12)  # the penalty has an effect here
    assert greedy_ids(server, prompt, 12, **penalty) == want


def test_seeded_samples_are_reproducible_alone_and_in_a_batch(server):
    prompt = "Sampling with a seed"
    # A top-k cut keeps the CDF's steps far apart: a random model's near-flat distribution over
    # 49k tokens would let float noise between batch shapes (1e-7) move a draw across a step.
    sp = {"temperature": 0.8, "top_k": 40, "max_new_tokens": 12, "ignore_eos": True, "seed": 1234}
    alone = gen(server, {"text": prompt, "sampling_params": sp})["text"]
    other = gen(server, {"text": prompt, "sampling_params": {**sp, "seed": 99}})["text"]
    assert alone != other

    async def batch():
        rng = random.Random(0)
        async with httpx.AsyncClient(timeout=120) as client:
            bodies = [{"text": prompt, "sampling_params": sp}] + [
                {"text": f"{prompt} {rng.random()}", "sampling_params": {
                    **sp, "seed": rng.randrange(10**6), "max_new_tokens": rng.randint(4, 20)}}
                for _ in range(15)]
            rs = await asyncio.gather(*(client.post(server.url + "/generate", json=b)
                                        for b in bodies))
            return [r.json()["text"] for r in rs]

    assert asyncio.run(batch())[0] == alone
    # Sample i of a seeded n > 1 request draws with seed + i.
    pair = gen(server, {"text": prompt, "sampling_params": {**sp, "n": 2}})
    assert pair[0]["text"] == alone
    assert pair[1]["text"] == gen(server, {"text": prompt,
                                           "sampling_params": {**sp, "seed": 1235}})["text"]


def test_custom_logit_processor_forces_its_request_only(server, setup):
    """A batch of two prompts, the first carrying a processor that forces one token id: it emits
    exactly that id; the second's greedy output equals transformers' and its own run alone."""
    forced, prompts = 4321, ["Forced tokens here", "An ordinary greedy request"]
    body = {"text": prompts, "return_logprob": True,
            "custom_logit_processor": [force_token_str(), None],
            "sampling_params": [
                {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True,
                 "custom_params": {"token_id": forced}},
                {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}]}
    outs = gen(server, body)
    ids = [[e[1] for e in o["meta_info"]["output_token_logprobs"]] for o in outs]
    assert ids[0] == [forced] * 6
    want = hf_greedy(setup["model"], setup["tok"].encode(prompts[1]), 6)
    assert ids[1] == want == greedy_ids(server, prompts[1], 6)
    assert forced not in want  # the processor's row did not leak into the other


def test_max_new_tokens_zero_only_scores(server):
    out = gen(server, {"text": "Just score this", "sampling_params": {"max_new_tokens": 0}})
    assert out["text"] == "" and out["meta_info"]["completion_tokens"] == 0
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_idle_engine_does_not_spin(server):
    pid = server.engine_pid()

    def cpu_ticks():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    time.sleep(1.0)
    before = cpu_ticks()
    time.sleep(3.0)
    assert cpu_ticks() - before < 0.3 * os.sysconf("SC_CLK_TCK")  # < 10% of a core


def test_ctrl_c_exits_cleanly(server):
    """Last in the module: Ctrl-C signals the whole process group, engine included."""
    engine = server.engine_pid()
    os.kill(server.proc.pid, signal.SIGINT)
    os.kill(engine, signal.SIGINT)
    assert server.proc.wait(60) == 0
    log = server.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert not os.path.exists(f"/proc/{engine}") or _is_zombie(engine)


def _is_zombie(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"
