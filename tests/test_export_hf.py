"""`vitune export --format hf`: the exported folder loads in transformers (`LlavaForConditionalGeneration`
+ `AutoProcessor`) and, for an image and a question, gives vitune's prompt ids, pixels, logits
(fp32, <= 1e-4) and greedy answer. Tiny random models, hermetic. Unsupported parts are refused
with a message that says why."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_hf import write_tiny_llama

from vitune.checkpoints.export_hf import ExportError, check_exportable
from vitune.checkpoints.model_folder import save_pretrained
from vitune.cli import main
from vitune.config import apply_overrides
from vitune.data.chat import stop_token_id
from vitune.inference.assistant import Assistant, Request, user_turn
from vitune.inference.generate import GenerationConfig, generate
from vitune.model.lora import LoRALinear
from vitune.presets import tiny
from vitune.training.train import build_model, build_tokenizer

transformers = pytest.importorskip("transformers")
TOL = 1e-4
QUESTION = "what shape is it?"

CASES = {  # vitune overrides -> what the export must map
    "clip_llama_lora_pad": ["model.vision.act=quick_gelu", "model.vision.feature_layer=-2",
                            "model.lora.rank=4", "model.system_prompt=You are a helpful assistant."],
    "siglip_qwen2_squash": ["model.vision.class_token=false", "model.vision.pre_norm=false",
                            "model.vision.resize=squash", "model.vision.act=gelu_tanh"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _jitter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    lm_extra = {"attention_bias": False} if "llama" in request.param else {}
    if "qwen2" in request.param:
        base = _write_tiny_qwen2(root / "base")
    else:
        base = write_tiny_llama(root / "base", **lm_extra)
    cfg = apply_overrides(tiny(), [f"model.lm_pretrained={base}", *CASES[request.param]])
    tok = build_tokenizer(cfg, [])
    model = _jitter(build_model(cfg, tok)).eval()  # also perturbs LoRA's B: the merge must matter
    src = save_pretrained(model, tok, root / "vitune")
    assert main(["export", "--format", "hf", str(src), str(root / "hf")]) == 0
    return src, root / "hf"


def _write_tiny_qwen2(folder):
    from tiny_hf import write_bpe_tokenizer
    folder.mkdir(parents=True)
    vocab = write_bpe_tokenizer(folder)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    _jitter(transformers.Qwen2ForCausalLM(cfg)).save_pretrained(folder)
    return folder


def _image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 28, 3), dtype=np.uint8))


def test_transformers_llava_matches_vitune(exported):
    src, out = exported
    assistant = Assistant.load(src, fuse=False)  # the adapters unmerged: the reference the export is checked against
    assert assistant.model.cfg.lora.rank == 0 or any(isinstance(m, LoRALinear) for m in assistant.model.modules())
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    image, gen = _image(), GenerationConfig(max_new_tokens=10)
    req = Request([image], [user_turn(QUESTION, 1)])
    ids = assistant.prompt_ids(req, gen.max_new_tokens)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    pixels = assistant.transform([image])
    assert (inputs["pixel_values"] - pixels).abs().max() <= 1e-5
    model = assistant.model
    with torch.inference_mode():
        ref = hf(**inputs).logits[0, :, :model.cfg.lm.vocab_size]
        x = torch.tensor([ids])
        ours = model.lm.logits(model.lm(model.embed_inputs(x, pixels), torch.arange(len(ids))[None]))[0]
        assert (ref - ours).abs().max() <= TOL
        hf_new = hf.generate(**inputs, max_new_tokens=gen.max_new_tokens, do_sample=False)[0, len(ids):].tolist()
    stops = set(hf.generation_config.eos_token_id)
    hf_new = hf_new[:next((i for i, t in enumerate(hf_new) if t in stops), len(hf_new))]
    tok = assistant.tok
    ours = generate(model, [ids], pixels, gen, stops, tok.decode, tok.special.eos).token_ids[0]
    assert ours == hf_new and len(ours) > 0
    assert stops == {stop_token_id(tok, model.cfg.chat_template), tok.special.eos}


def _cfg(*overrides):
    return apply_overrides(tiny(), list(overrides)).model


@pytest.mark.parametrize("overrides, reason", [
    (["model.vision.kind=cnn"], "not a CNN"),
    (["model.connector.reduce=pool2x2"], "no token pooling"),
    (["model.connector.reduce=pixel_shuffle2x2"], "no token pooling or pixel shuffle"),
    (["model.vision.pre_norm=false"], "neither CLIP's layout"),
    (["model.connector.hidden_dim=96"], "projector hidden width"),
    (["model.connector.slot_embedding=true"], "no per-slot position embedding"),
    (["model.connector.coords=true"], "reads no \\(x, y\\) channels"),
    (["model.fusion.kind=film"], "fusion.kind=film: LLaVA has image tokens in the sequence that depend on neither"),
    (["model.fusion.kind=qformer"], "fusion.kind=qformer"),
    (["model.fusion.kind=xattn"], "fusion.kind=xattn"),
    (["model.contrastive.dim=8"], "no alignment head"),
])
def test_unsupported_parts_are_refused_with_the_reason(overrides, reason):
    with pytest.raises(ExportError, match=reason):
        check_exportable(_cfg(*overrides))


def test_export_of_efficientnet_tower_is_refused(tmp_path, capsys):
    cfg = apply_overrides(tiny(), ["model.vision.kind=cnn", "model.connector.reduce=pool2x2"])
    tok = build_tokenizer(cfg, [])
    src = save_pretrained(build_model(cfg, tok), tok, tmp_path / "m")
    assert main(["export", "--format", "hf", str(src), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "not a CNN" in err and "no token pooling" in err and not (tmp_path / "hf").exists()
    efficientnet = _cfg("model.vision.kind=efficientnet_lite0", "model.vision.image_size=224",
                        "model.vision.patch_size=32", "model.vision.width=1280")
    with pytest.raises(ExportError, match="'efficientnet_lite0'"):
        check_exportable(efficientnet)
