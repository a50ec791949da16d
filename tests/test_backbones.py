"""Backbones: the real EfficientNet-Lite0, tiny open_clip / transformers CLIP / DINOv2 models built from configs with
random weights and loaded through the real loading paths, and the generic module wrapper."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from nacosae.backbones import TOKEN_CHOICES, imagenet_class_names, load_backbone, mha_autocast_layout
from nacosae.images import SkimageSource

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian Mau


@pytest.fixture(scope="module")
def photos():
    return [img for _, img in SkimageSource(["chelsea", "coffee", "rocket"])]


def _check_edits(bb, pixels, layer):
    """Identity edit reproduces output(); zeroing the layer changes it."""
    out = bb.output(pixels)
    same = bb.forward_with_edit(pixels, layer, lambda a: a)
    assert torch.allclose(same, out, atol=1e-5)
    zeroed = bb.forward_with_edit(pixels, layer, torch.zeros_like)
    assert (zeroed - out).abs().max() > 1e-3


# -- EfficientNet-Lite0 (real weights) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet():
    return load_backbone("efficientnet-lite0")


def test_effnet_layers_and_last_192_block(effnet):
    assert effnet.layers() == [f"blocks.{i}" for i in range(16)] + ["features", "pooled"]
    channels = effnet.block_channels()
    assert channels == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    last_192 = max(i for i, c in enumerate(channels) if c == 192)
    assert last_192 == 14 and effnet.d("blocks.14") == 192 and effnet.n_tokens("blocks.14", "spatial") == 49


def test_effnet_classifies_chelsea_as_a_cat(effnet, photos):
    logits = effnet.output(effnet.preprocess(photos[0])[None])
    assert logits.shape == (1, 1000)
    assert CAT_CLASSES & set(logits[0].topk(5).indices.tolist())
    assert effnet.class_names == list(imagenet_class_names()) and effnet.class_names[281] == "tabby cat"
    assert len(set(effnet.class_names)) == 1000


def test_effnet_activations_match_the_model(effnet, photos):
    x = effnet.preprocess_batch(photos)
    feats = effnet.activations(x, "features", "spatial")
    assert feats.shape == (3, 49, 1280) and feats.dtype == torch.float32 and not feats.requires_grad
    with torch.no_grad():
        ref = effnet.model.extract_features(x)  # (B, 1280, 7, 7), after the final ReLU6
    assert torch.allclose(feats, ref.flatten(2).transpose(1, 2), atol=1e-5)
    assert feats.max() <= 6.0 and feats.min() >= 0.0
    assert torch.allclose(effnet.activations(x, "features", "mean")[:, 0], ref.mean((2, 3)), atol=1e-5)
    assert torch.allclose(effnet.activations(x, "pooled")[:, 0], ref.mean((2, 3)), atol=1e-5)
    assert effnet.activations(x, "blocks.0", "all").shape == (3, 112 * 112, 16)


def test_effnet_stops_after_the_layer(effnet, photos):
    calls = []
    h = effnet.model._blocks[15].register_forward_hook(lambda *a: calls.append(1))
    try:
        effnet.activations(effnet.preprocess_batch(photos[:1]), "blocks.3")
        assert calls == []
        effnet.output(effnet.preprocess_batch(photos[:1]))
        assert calls == [1]
    finally:
        h.remove()


def test_effnet_forward_with_edit(effnet, photos):
    x = effnet.preprocess_batch(photos[:2])
    _check_edits(effnet, x, "blocks.14")
    # features all zero → average pool is zero → the logits are exactly the classifier's bias
    logits = effnet.forward_with_edit(x, "features", torch.zeros_like)
    assert torch.allclose(logits, effnet.model._fc.bias.expand(2, -1), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        effnet.forward_with_edit(x, "features", lambda a: a[:, :10])


def test_effnet_preprocess_pads_to_white_square(effnet):
    img = Image.new("RGBA", (300, 100), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 300, 100))
    x = effnet.preprocess(img)
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 5, 112], torch.full((3,), 1.0))  # padding: (255 − 127) / 128
    assert torch.allclose(x[:, 112, 5], torch.tensor([1.0, -127 / 128, -127 / 128]))  # red kept edge to edge


def test_effnet_provenance_and_token_errors(effnet):
    p = effnet.provenance("features", "spatial")
    assert p["backbone"] == "efficientnet-lite0" and p["layer"] == "features" and p["tokens"] == "spatial"
    assert p["d"] == 1280 and p["n_tokens"] == 49 and p["output"] == "imagenet-1k logits"
    assert p["preprocessing"]["mean"] == [127.0] * 3 and p["preprocessing"]["std"] == [128.0] * 3
    assert p["preprocessing"]["size"] == [224, 224] and p["preprocessing"]["pad"] == "white square"
    assert "imagenet" in p["weights"]
    json.dumps(p)
    with pytest.raises(ValueError, match="spatial"):
        effnet.activations(torch.zeros(1, 3, 224, 224), "features", "cls")
    with pytest.raises(ValueError, match="blocks.14"):
        effnet.activations(torch.zeros(1, 3, 224, 224), "block14")
    with pytest.raises(ValueError, match="choose one of"):
        effnet.n_tokens("features", "everything")


@pytest.mark.slow
def test_effnet_extraction_overhead_under_10_percent(effnet):
    import time

    x = torch.randn(16, 3, 224, 224)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bare, hooked = [], []
        with torch.no_grad():
            effnet.model(x)
            for _ in range(5):  # interleaved, and CPU time not wall time: other processes on the machine hit both alike
                t = time.process_time()
                effnet.model(x)
                bare.append(time.process_time() - t)
                t = time.process_time()
                effnet.activations(x, "features", "spatial")
                hooked.append(time.process_time() - t)
    finally:
        torch.set_num_threads(threads)
    assert min(hooked) <= 1.10 * min(bare)


# -- open_clip (tiny config, random weights, loaded from a local dir) ------------------------------------------


@pytest.fixture(scope="module")
def open_clip_bb(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oc_tiny")
    cfg = {
        "model_cfg": {
            "embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    return load_backbone(f"open_clip:local-dir:{folder}")


def test_open_clip_shapes_and_tokens(open_clip_bb, photos):
    bb = open_clip_bb
    assert bb.layers() == ["resblocks.0", "resblocks.1", "embedding"]
    x = bb.preprocess_batch(photos)
    assert x.shape == (3, 3, 32, 32)
    expected = {"cls": 1, "patches": 16, "all": 17, "mean": 1}
    for tokens, n in expected.items():
        acts = bb.activations(x, "resblocks.1", tokens)
        assert acts.shape == (3, n, 64) and bb.n_tokens("resblocks.1", tokens) == n
    all_ = bb.activations(x, "resblocks.1", "all")
    assert torch.allclose(bb.activations(x, "resblocks.1", "mean")[:, 0], all_[:, 1:].mean(1), atol=1e-6)
    # the same tensors as open_clip's own forward_intermediates
    with torch.no_grad():
        ref = bb.model.visual.forward_intermediates(x, indices=[1], output_fmt="NLC", output_extra_tokens=True)
    ref_all = torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], dim=1)
    assert torch.allclose(all_, ref_all, atol=1e-5)
    emb = bb.activations(x, "embedding", "all")
    assert emb.shape == (3, 1, 32) and torch.allclose(emb[:, 0], bb.output(x), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(bb.output(x), bb.model.encode_image(x), atol=1e-5)
    with pytest.raises(ValueError, match="patches"):
        bb.activations(x, "resblocks.0", "spatial")


def test_open_clip_attention_layout_hook_keeps_results(open_clip_bb, photos):
    """The bf16-autocast attention layout fix (backbones.mha_autocast_layout) is on in every open_clip backbone: float32
    results are bit for bit those without it, and bf16 results are the same values up to bf16 rounding."""
    bb = open_clip_bb
    assert len(bb.mha_hooks) == 2  # one per resblock
    x = bb.preprocess_batch(photos)

    def run(autocast: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return bb.model.visual(x).float()

    fixed_fp32, fixed_bf16 = run(False), run(True)
    for hook in bb.mha_hooks:
        hook.remove()
    try:
        plain_fp32, plain_bf16 = run(False), run(True)
    finally:
        bb.mha_hooks = mha_autocast_layout(bb.model.visual)
    assert torch.equal(fixed_fp32, plain_fp32)
    assert (fixed_bf16 - plain_bf16).norm() / plain_bf16.norm() < 2e-2
    assert (fixed_bf16 - fixed_fp32).norm() / fixed_fp32.norm() < 5e-2


def test_open_clip_edits_provenance_text(open_clip_bb, photos):
    bb = open_clip_bb
    x = bb.preprocess_batch(photos)
    _check_edits(bb, x, "resblocks.0")
    p = bb.provenance("resblocks.1", "patches")
    assert p["backbone"].startswith("open_clip:local-dir:") and p["weights"].startswith("random init")
    assert p["d"] == 64 and p["n_tokens"] == 16 and p["n_prefix_tokens"] == 1
    pp = p["preprocessing"]
    assert pp["mean"] == [0.5] * 3 and pp["std"] == [0.25] * 3 and pp["size"] == [32, 32] and pp["quick_gelu"] is True
    json.dumps(p)
    text = bb.encode_text(["a cat", "a dog", "a rocket"])
    assert text.shape == (3, 32) and torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert bb.tokenizer(["a cat"]).shape == (1, 16)


def test_open_clip_errors():
    with pytest.raises(ValueError, match="list_models"):
        load_backbone("open_clip:ViT-Nope-99")
    with pytest.raises(ValueError, match="valid tags"):
        load_backbone("open_clip:ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(FileNotFoundError):
        load_backbone("open_clip:local-dir:/no/such/folder")


# -- transformers CLIP and DINOv2 (tiny configs saved to disk, loaded by path) ----------------------------------


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("hf_clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(letters)})
    vocab.update({c + "</w>": i + 28 for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf_clip(hf_clip_dir, photos):
    bb = load_backbone(f"hf:{hf_clip_dir}")
    assert bb.kind == "hf_clip" and bb.layers() == ["encoder.layers.0", "encoder.layers.1", "encoder.layers.2", "embedding"]
    x = bb.preprocess_batch(photos)
    assert x.shape == (3, 3, 32, 32)
    for tokens, n in {"cls": 1, "patches": 16, "all": 17, "mean": 1}.items():
        assert bb.activations(x, "encoder.layers.1", tokens).shape == (3, n, 32)
    with torch.no_grad():
        hidden = bb.model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        image_embeds = bb.model.visual_projection(bb.model.vision_model(pixel_values=x).pooler_output)
    assert torch.allclose(bb.activations(x, "encoder.layers.1", "all"), hidden[2], atol=1e-5)
    assert torch.allclose(bb.output(x), image_embeds, atol=1e-5)
    assert torch.allclose(bb.activations(x, "embedding")[:, 0], image_embeds, atol=1e-5)
    _check_edits(bb, x, "encoder.layers.0")
    p = bb.provenance("encoder.layers.2", "cls")
    assert p["d"] == 32 and p["n_tokens"] == 1 and p["preprocessing"]["size"] == [32, 32]
    assert "CLIPImageProcessor" in p["preprocessing"]["source"] and p["preprocessing"]["resample"] == "bicubic"
    text = bb.encode_text(["a cat", "dog"])
    assert text.shape == (2, 16) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_hf_clip_vision_only(tmp_path, photos):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=8)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path)
    bb = load_backbone(f"hf:{tmp_path}")
    x = bb.preprocess_batch(photos[:2])
    assert bb.activations(x, "encoder.layers.1", "patches").shape == (2, 4, 32)
    assert bb.output(x).shape == (2, 8) and bb.provenance("embedding")["preprocessing"]["source"].startswith("config")
    with pytest.raises(AttributeError, match="text tower"):
        bb.encode_text(["a cat"])


@pytest.mark.parametrize("registers", [0, 2])
def test_hf_dinov2(tmp_path, photos, registers):
    from transformers import AutoModel

    if registers:
        from transformers import Dinov2WithRegistersConfig as Config
    else:
        from transformers import Dinov2Config as Config
    kw = {"num_register_tokens": registers} if registers else {}
    cfg = Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                 patch_size=7, **kw)
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(tmp_path)
    bb = load_backbone(f"hf:{tmp_path}")
    assert bb.kind == "hf_dinov2" and bb.layers() == ["encoder.layer.0", "encoder.layer.1", "embedding"]
    x = bb.preprocess_batch(photos)
    assert x.shape == (3, 3, 28, 28)
    n_prefix = 1 + registers
    for tokens, n in {"cls": 1, "patches": 16, "all": 16 + n_prefix, "mean": 1}.items():
        assert bb.activations(x, "encoder.layer.1", tokens).shape == (3, n, 32)
    with torch.no_grad():
        ref = bb.model(pixel_values=x, output_hidden_states=True)
    assert torch.allclose(bb.activations(x, "encoder.layer.0", "all"), ref.hidden_states[1], atol=1e-5)
    assert torch.allclose(bb.output(x), ref.pooler_output, atol=1e-5)
    assert torch.allclose(bb.activations(x, "embedding", "cls")[:, 0], ref.pooler_output, atol=1e-5)
    _check_edits(bb, x, "encoder.layer.0")
    doubled = bb.forward_with_edit(x, "embedding", lambda a: 2 * a)
    assert torch.allclose(doubled, 2 * ref.pooler_output, atol=1e-5)
    p = bb.provenance("encoder.layer.1", "patches")
    assert p["n_prefix_tokens"] == n_prefix and p["n_tokens"] == 16
    assert p["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and p["preprocessing"]["size"] == [28, 28]


def test_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no local folder"):
        load_backbone(f"hf:{tmp_path}/missing")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub"):
        load_backbone("hf:not a valid repo id!!")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                         vocab_size=10)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_backbone(f"hf:{tmp_path / 'bert'}")


# -- generic module --------------------------------------------------------------------------------------------


class _Seq(nn.Module):
    """(B, C, H, W) → (B, H·W, C): a 3-D token output."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 × 14 × 14
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),  # 16 × 4 × 4
        nn.Sequential(_Seq(), nn.Flatten()), nn.Linear(256, 10),
    )


def test_module_backbone():
    net = _small_cnn()
    bb = load_backbone("module", model=net, name="fmnist-cnn", input_shape=(1, 28, 28), class_names=list("abcdefghij"))
    assert "0" in bb.layers() and "6.0" in bb.layers() and "" not in bb.layers()
    x = torch.randn(4, 1, 28, 28)
    assert bb.activations(x, "4", "spatial").shape == (4, 196, 16)
    assert bb.activations(x, "4", "mean").shape == (4, 1, 16)
    assert bb.activations(x, "6.0", "all").shape == (4, 16, 16)  # 3-D output kept as (B, T, D)
    assert bb.activations(x, "7").shape == (4, 1, 10)
    with torch.no_grad():
        maps = net[:5](x)
    assert torch.allclose(bb.activations(x, "4", "spatial"), maps.flatten(2).transpose(1, 2))
    _check_edits(bb, x, "4")
    with pytest.raises(ValueError, match="spatial"):
        bb.activations(x, "4", "cls")
    with pytest.raises(ValueError, match="'all', 'mean'"):
        bb.activations(x, "6.0", "patches")
    p = bb.provenance("1", "spatial")  # probed from input_shape, before any call on that layer
    assert p["backbone"] == "fmnist-cnn" and p["d"] == 8 and p["n_tokens"] == 784
    assert bb.class_names[0] == "a"


def test_module_backbone_default_preprocess_and_unknown_shape():
    bb = load_backbone("module", model=_small_cnn(), name="cnn")
    x = bb.preprocess(Image.new("L", (28, 28), 255))
    assert x.shape == (1, 28, 28) and x.max() == 1.0
    assert bb.preprocess(Image.new("RGB", (5, 5))).shape == (3, 5, 5)
    with pytest.raises(ValueError, match="input_shape"):
        bb.provenance("0")
    bb.activations(x[None], "0")
    assert bb.provenance("0", "spatial")["n_tokens"] == 784


def test_load_backbone_errors():
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        load_backbone("resnet50")
    with pytest.raises(ValueError, match="model="):
        load_backbone("module")
    with pytest.raises(TypeError):
        load_backbone("module", model="not a module")
    assert set(TOKEN_CHOICES) == {"cls", "patches", "all", "spatial", "mean"}


# -- concurrency: one backbone shared by the app's request threads ---------------------------------------------


def _distinct_images(n: int, size=(160, 120)) -> list[Image.Image]:
    """n different generated images (seeded noise blobs on coloured grounds): no two give the same activations."""
    import numpy as np

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        arr = np.empty((size[1], size[0], 3), np.uint8)
        arr[:] = rng.integers(0, 256, 3)
        for _ in range(4):
            x, y = rng.integers(0, size[0] - 30), rng.integers(0, size[1] - 30)
            arr[y:y + 30, x:x + 30] = rng.integers(0, 256, (30, 30, 3))
        out.append(Image.fromarray(arr))
    return out


def _run_concurrently(jobs, n_threads: int):
    """Run the zero-argument callables `jobs` on `n_threads` threads that start together; results in job order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(n_threads)

    def start(job):
        try:
            barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        return job()

    with ThreadPoolExecutor(n_threads) as pool:
        futures = [pool.submit(start if i < n_threads else (lambda j: j()), job) for i, job in enumerate(jobs)]
        return [f.result(timeout=300) for f in futures]


def test_concurrent_calls_on_one_backbone_each_get_their_own_result(effnet):
    """The app's request threads share one backbone: activations, an edited forward and the plain output, called
    from 8 threads at once on 6 different images, each equal the call made alone (issue 9: the per-call forward hook
    on the shared layer made calls fail with "did not run" or return another image's activations)."""
    images = _distinct_images(6)
    pixels = [effnet.preprocess_batch([im]) for im in images]
    half = lambda a: 0.5 * a  # noqa: E731
    with torch.no_grad():
        alone = [(effnet.activations(x, "blocks.14", "spatial"), effnet.forward_with_edit(x, "blocks.14", half),
                  effnet.activations(x, "features", "mean")) for x in pixels]
    assert all((alone[i][0] - alone[0][0]).abs().max() > 1e-3 for i in range(1, 6))  # the images really differ

    def job(k):
        i, what = k % 6, (k // 6) % 4
        x = pixels[i]
        with torch.no_grad():
            if what == 0:
                return i, what, effnet.activations(x, "blocks.14", "spatial")
            if what == 1:
                return i, what, effnet.forward_with_edit(x, "blocks.14", half)
            if what == 2:
                return i, what, effnet.activations(x, "features", "mean")
            return i, what, effnet.activations_multi(x, [("blocks.14", "spatial"), ("features", "mean")])

    results = _run_concurrently([lambda k=k: job(k) for k in range(48)], n_threads=8)
    for i, what, got in results:
        if what == 3:
            got, want = torch.cat([got[0].flatten(), got[1].flatten()]), torch.cat([alone[i][0].flatten(), alone[i][2].flatten()])
        else:
            want = alone[i][what]
        assert torch.allclose(got, want, atol=1e-4), (i, what, float((got - want).abs().max()))


# -- geometry: which original pixels the tokens saw ------------------------------------------------------------


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    import numpy as np

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _assert_box_is_what_the_model_sees(bb, img, box):
    """The preprocessed image equals the preprocessed box: a crop box cut out of the image, or the image pasted on
    the white padding of a box that reaches outside it."""
    left, top, right, bottom = (int(v) for v in box)
    assert (left, top, right, bottom) == box
    if left >= 0 and top >= 0 and right <= img.width and bottom <= img.height:
        seen = img.crop(box)
    else:
        seen = Image.new("RGB", (right - left, bottom - top), (255, 255, 255))
        seen.paste(img, (-left, -top))
    assert torch.allclose(bb.preprocess(img), bb.preprocess(seen), atol=1e-5)


def test_token_box_of_crop_backbones_is_the_centre_crop(hf_clip_dir, open_clip_bb, tmp_path):
    """Issue 9: CLIP-style preprocessing sees a centre crop, so a 96×32 image's tokens cover its middle 32×32."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from nacosae.backbones import token_box

    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(tmp_path)
    backbones = {"hf processor": load_backbone(f"hf:{hf_clip_dir}"), "hf config": load_backbone(f"hf:{tmp_path}"),
                 "open_clip": open_clip_bb}
    for what, bb in backbones.items():
        img = _noise(96, 32)
        assert bb.token_box(img.size) == (32.0, 0.0, 64.0, 32.0), what
        _assert_box_is_what_the_model_sees(bb, img, (32, 0, 64, 32))
        tall = _noise(32, 99, seed=1)  # an odd margin: transformers floors the offset, torchvision rounds it
        box = bb.token_box(tall.size)
        assert box == ((0.0, 33.0, 32.0, 65.0) if what.startswith("hf") else (0.0, 34.0, 32.0, 66.0)), what
        _assert_box_is_what_the_model_sees(bb, tall, tuple(int(v) for v in box))
        # a resize too: 150×50 → 96×32 (short side 32), crop 32 from x = 32, i.e. original x 50..100
        assert bb.token_box((150, 50)) == pytest.approx((50.0, 0.0, 100.0, 50.0)), what
        # the same answer from the provenance alone (what the app has without loading the model)
        assert token_box(bb.provenance(bb.layers()[0], "all"), (150, 50)) == bb.token_box((150, 50))
    assert backbones["hf processor"].token_grid("encoder.layers.1") == (4, 4)
    assert open_clip_bb.token_grid("resblocks.1") == (4, 4) and open_clip_bb.token_grid("embedding") is None


def test_token_box_of_effnet_is_the_padded_square(effnet):
    img = _noise(96, 32)
    assert effnet.token_box(img.size) == (0.0, -32.0, 96.0, 64.0)
    _assert_box_is_what_the_model_sees(effnet, img, (0, -32, 96, 64))
    assert effnet.token_box((33, 40)) == (-3.0, 0.0, 37.0, 40.0)  # pad_to_square puts the odd pixel on the right
    _assert_box_is_what_the_model_sees(effnet, _noise(33, 40), (-3, 0, 37, 40))
    assert effnet.token_grid("blocks.14") == (7, 7) and effnet.token_grid("pooled") == (1, 1)
    bb = load_backbone("module", model=_small_cnn(), name="cnn", input_shape=(1, 28, 28))
    assert bb.token_box((50, 20)) == (0.0, 0.0, 50.0, 20.0) and bb.token_grid("5") == (4, 4)
    assert bb.token_grid("7") is None
    from nacosae.backbones import token_box

    with pytest.raises(ValueError, match="no token geometry"):
        token_box({"backbone_kind": "resnet"}, (10, 10))
    assert token_box({"backbone": "efficientnet-lite0"}, (96, 32)) == (0.0, -32.0, 96.0, 64.0)  # older provenance


def test_heatmaps_land_on_the_pixels_the_tokens_saw(hf_clip_dir, effnet):
    """A heat map whose only hot token is the top-left patch colours the top-left of the crop (CLIP) or of the
    padded square (EfficientNet), not the top-left of the image."""
    import numpy as np

    from nacosae.features import heatmap_overlay

    img = Image.new("RGB", (96, 32), (255, 255, 255))
    clip = load_backbone(f"hf:{hf_clip_dir}")
    heat = torch.zeros(16)
    heat[0] = 1.0  # row 0, col 0 of the 4×4 patch grid: pixels x 32..40, y 0..8 of the original image
    out = np.asarray(heatmap_overlay(img, heat, clip.token_grid("encoder.layers.1"), box=clip.token_box(img.size)))
    assert out.shape == (32, 96, 3)
    coloured = (np.abs(out.astype(int) - 255).sum(-1) > 30) & ~_dimmed(out)
    ys, xs = coloured.nonzero()
    assert xs.min() >= 32 and xs.max() < 44 and ys.max() < 12  # bilinear spill stays within half a patch
    assert _dimmed(out)[:, :32].all() and _dimmed(out)[:, 64:].all() and not _dimmed(out)[:, 32:64].any()

    heat = torch.zeros(49)
    heat[0] = 1.0  # top-left of the 7×7 map over the 96×96 padded square: inside the top padding
    out = np.asarray(heatmap_overlay(img, heat, effnet.token_grid("blocks.14"), box=effnet.token_box(img.size)))
    assert out.shape == (96, 96, 3)
    ys, xs = (np.abs(out.astype(int) - 255).sum(-1) > 30).nonzero()
    assert ys.max() < 96 // 7 + 8 and xs.max() < 96 // 7 + 8


def _dimmed(arr) -> "np.ndarray":
    """Pixels of a white image that heatmap_overlay dimmed (outside the crop): 0.35·255 + 0.65·127.5 ≈ 172."""
    import numpy as np

    return (np.abs(arr.astype(int) - 172) <= 2).all(-1)
