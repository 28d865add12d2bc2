"""CUDA-graph runner on the CPU: bucketing, padding and replay with a stand-in graph.

`FakeGraph` stands for torch.cuda.CUDAGraph: its replay runs the captured callable again, eagerly,
and writes the result into the tensors the capture returned, as a real replay rewrites them. The
callable reads the runner's static buffers, so a replay sees exactly what a real graph would: the
batch copied in and the padding rows. The model runs the Triton backend's code path with each
kernel's torch reference; its padded outputs must equal the unpadded eager torch-backend forward.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nlcli.engine.args import ServerArgs
from nlcli.engine.layers.triton_attention import TritonAttentionBackend, TritonKernels, reference_kernels
from nlcli.engine.model_executor.cuda_graph_runner import (
    CudaGraphRunner,
    bucket_for,
    capture_batch_sizes,
    create_cuda_graph_runner,
)
from tests.host_sync import allow_host_sync, no_host_sync
from tests.kernel_harness import load_kernels
from tests.tiny_models import EngineDriver, make_runner

load_kernels(["nlcli.kernels.decode_attention", "nlcli.kernels.extend_attention",
              "nlcli.kernels.kv_store"])


class FakeGraph:
    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.replays += 1
        with no_host_sync():  # a real graph cannot read the host: neither may its stand-in
            fresh = self.fn()
        self.out.next_token_logits.copy_(fresh.next_token_logits)


def fake_capture(fn):
    out = fn()
    return FakeGraph(fn, out), out


def test_capture_batch_sizes():
    assert capture_batch_sizes(160) == [1, 2, 4, 8] + list(range(16, 161, 8))
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16]
    assert capture_batch_sizes(3) == [1, 2]
    sizes = capture_batch_sizes(40)
    expected = {1: 1, 2: 2, 3: 4, 5: 8, 8: 8, 9: 16, 17: 24, 40: 40, 41: None}
    assert {bs: bucket_for(bs, sizes) for bs in expected} == expected


def test_never_on_cpu_or_when_disabled():
    args = ServerArgs()
    assert create_cuda_graph_runner(args, None, object(), torch.device("cpu"), 32) is None
    backend = TritonAttentionBackend.__new__(TritonAttentionBackend)
    disabled = args.replace(disable_cuda_graph=True)
    assert create_cuda_graph_runner(disabled, None, backend, torch.device("cuda"), 32) is None


@pytest.fixture(scope="module")
def runners(tiny_model_dir):
    path = tiny_model_dir("llama")
    eager, graphed = make_runner(path), make_runner(path)
    refs = TritonKernels(*(allow_host_sync(f) for f in dataclasses.astuple(reference_kernels())))
    backend = TritonAttentionBackend(graphed.req_to_token_pool, graphed.token_to_kv_pool, refs, num_sms=4)
    graphed.attn_backend = backend
    graphed.cuda_graph_runner = CudaGraphRunner(graphed.model, backend, 8, graphed.device, fake_capture)
    graphed.cuda_graph_runner.capture_all()
    return eager, graphed


def test_padded_replay_equals_unpadded_eager_forward(runners):
    eager, graphed = runners
    graph_runner = graphed.cuda_graph_runner
    assert sorted(graph_runner.graphs) == [1, 2, 4, 8]
    ref, ours = EngineDriver(eager), EngineDriver(graphed)
    prompts = [[1, 504, 3575], [9690, 198, 7, 8, 9], list(range(300, 320)), [42], [5, 6], [77] * 9]
    # Decode batches of 3 (padded to 4), 5 and 6 (padded to 8), 1 (exact), and 6 again.
    schedule = [[0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [3], [0, 1, 2, 3, 4, 5]]
    rids = [ref.new_request() for _ in prompts]
    ours_rids = [ours.new_request() for _ in prompts]
    first = ref.forward(rids, prompts).next_token_logits
    torch.testing.assert_close(ours.forward(ours_rids, prompts).next_token_logits, first,
                               rtol=1e-5, atol=1e-5)
    tokens = first.argmax(-1).tolist()
    for step in schedule:
        replays_before = {bs: g.replays for bs, g in graph_runner.graphs.items()}
        new_ids = [[tokens[i]] for i in step]
        expected = ref.forward([rids[i] for i in step], new_ids).next_token_logits
        got = ours.forward([ours_rids[i] for i in step], new_ids).next_token_logits
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        bucket = bucket_for(len(step), graph_runner.sizes)
        assert graph_runner.graphs[bucket].replays == replays_before[bucket] + 1
        for i, t in zip(step, expected.argmax(-1).tolist()):
            tokens[i] = t
    # Padding rows wrote only the dummy slot: no slot a request owns was touched (same KV as eager).
    for layer in range(len(eager.token_to_kv_pool.k_buffer)):
        for rid, ours_rid in zip(rids, ours_rids):
            n = ref.lens[rid]
            a = eager.token_to_kv_pool.k_buffer[layer][eager.req_to_token_pool.req_to_token[ref.rows[rid], :n]]
            b = graphed.token_to_kv_pool.k_buffer[layer][
                graphed.req_to_token_pool.req_to_token[ours.rows[ours_rid], :n]]
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    ref.free_all()
    ours.free_all()


def test_extend_and_all_logits_batches_stay_eager(runners):
    _, graphed = runners
    graph_runner = graphed.cuda_graph_runner
    driver = EngineDriver(graphed)
    rid = driver.new_request()
    before = sum(g.replays for g in graph_runner.graphs.values())
    driver.forward([rid], [[1, 2, 3]])
    driver.forward([rid], [[4]], return_all_logits=True)
    assert sum(g.replays for g in graph_runner.graphs.values()) == before
    driver.free_all()


def _random_llama(out_dir) -> str:
    """A small random Llama saved without a tokenizer (the engine needs none), for GPU machines
    that lack the embedded tokenizer's package."""
    import transformers

    from tests.tiny_models import randomize_weights

    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    randomize_weights(model)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_equal_eager_on_gpu(tmp_path):
    path = _random_llama(tmp_path)
    kw = dict(device="cuda", dtype="float32", cuda_graph_max_bs=16)
    graphed, eager = make_runner(path, **kw), make_runner(path, disable_cuda_graph=True, **kw)
    assert graphed.cuda_graph_runner is not None and eager.cuda_graph_runner is None
    assert graphed.cuda_graph_runner.sizes == [1, 2, 4, 8, 16]
    prompts = [[1 + 13 * i + j for j in range(3 + 7 * i)] for i in range(5)]  # 5: padded to 8
    for n in (1, 5):
        want = EngineDriver(eager).generate_greedy(prompts[:n], 16)
        replays = [0]
        original = graphed.cuda_graph_runner.replay
        graphed.cuda_graph_runner.replay = lambda b: (replays.__setitem__(0, replays[0] + 1), original(b))[1]
        assert EngineDriver(graphed).generate_greedy(prompts[:n], 16) == want
        graphed.cuda_graph_runner.replay = original
        assert replays[0] == 15  # every decode step came from a graph
